"""The kernel plan's start-up side: GPU-only limits checked from the config with the key named, the
plan applied to every sequence op, and each process's device set (also in a group made by Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lctrain.config import check_mixers_kernel_limits, load_config
from lctrain.errors import ConfigError
from lctrain.kernels.ops import sequence_ops
from lctrain.kernels.plan import apply_kernel_plan, resolve_kernel_plan

REPO = Path(__file__).resolve().parents[2]

CUDA = resolve_kernel_plan("auto", "cuda").choice
CPU = resolve_kernel_plan("auto", "cpu").choice

LIMITS = [  # (recipe, override, key named in the error)
    ("transformer", "model.attn.head_dim=512", "model.attn.head_dim"),
    ("hybrid_gdn_3to1", "model.gdn.head_dim=512", "model.gdn.head_dim"),
    ("hybrid_gdn_3to1", "model.gdn.value_head_dim=8192", "model.gdn.value_head_dim"),
    ("hybrid_lightning_3to1", "model.lightning.head_dim=256", "model.lightning.head_dim"),
    ("hybrid_lightning_3to1", "model.lightning.chunk_size=48", "model.lightning.chunk_size"),
    ("hybrid_lightning_3to1", "model.lightning.chunk_size=8", "model.lightning.chunk_size"),
    ("hybrid_gdn_moba", "model.moba.head_dim=512", "model.moba.head_dim"),
    ("hybrid_gdn_3to1_moh", "model.moh.head_dim=512", "model.moh.head_dim"),
    ("hybrid_gdn_3to1_moa", "model.moa.head_dim=512", "model.moa.head_dim"),
]


@pytest.mark.parametrize("recipe, override, key", LIMITS)
def test_gpu_only_limits_stop_at_start_up_with_the_key(recipe, override, key):
    m = load_config([f"recipe={recipe}", override]).model
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("*", r"\*")):
        check_mixers_kernel_limits(m, CUDA)
    check_mixers_kernel_limits(m, CPU)  # the torch paths have no such limit


def test_gpu_limit_through_the_launcher_one_error_line(tmp_path):
    """``launch/train.py`` with the CUDA plan (``model.kernel_plan_device=cuda``) on a CPU machine:
    exit 2, one ``error:`` line naming the key, before any data is read."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "recipe=hybrid_lightning_3to1", "scale=cpu", "model.kernel_plan_device=cuda",
         "model.lightning.head_dim=256", f"train.out_dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and "model.lightning.head_dim=256" in err[0] and "128" in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_plan_is_written_into_every_sequence_op():
    from lctrain.models import HybridLM

    m = load_config(["recipe=hybrid_gdn_moba", "scale=cpu"]).model
    model = HybridLM(m)
    assert {op.kernels for *_, op in sequence_ops(model)} == {"auto"}
    apply_kernel_plan(model, resolve_kernel_plan("auto", "cuda"))
    kinds = {type(op).__name__: op.kernels for *_, op in sequence_ops(model)}
    assert kinds["GatedDeltaRuleOp"] == kinds["MoBAAttentionOp"] == kinds["SoftmaxAttentionOp"] == "triton"
    apply_kernel_plan(model, resolve_kernel_plan("auto", "cpu"))  # re-resolving is allowed (tests, eval)
    # a layer built with an explicit per-layer choice other than the plan's keeps it
    op = next(op for *_, op in sequence_ops(model) if type(op).__name__ == "GatedDeltaRuleOp")
    assert op.kernels == "triton"


def test_every_process_sets_its_device(monkeypatch):
    """A group made by a launcher (Ray Train) and one made here both set ``cuda:LOCAL_RANK`` as the
    current device, and ``init_process_group`` gets ``device_id`` (eager NCCL init)."""
    import torch.distributed as dist

    from lctrain.config import ParallelConfig
    from lctrain.parallel import mesh

    set_to: list = []
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_to.append(d))
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    # 1) the group exists already (Ray Train)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 6)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 8)
    monkeypatch.setenv("LOCAL_RANK", "2")
    env = mesh.init_distributed(ParallelConfig())
    assert env.device == torch.device("cuda", 2) and set_to == [torch.device("cuda", 2)]
    # 2) torchrun: this process creates the group
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = mesh.init_distributed(ParallelConfig())
    assert env.device == torch.device("cuda", 1) and set_to[-1] == torch.device("cuda", 1)
    assert calls[-1]["device_id"] == torch.device("cuda", 1) and calls[-1]["backend"] == "nccl"
