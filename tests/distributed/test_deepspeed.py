"""DeepSpeed ZeRO backend (``parallel.dp_impl=deepspeed``) against DDP on 2 gloo ranks.

One pair of spawned ranks runs every training job in sequence (DDP, ZeRO-1/2/3, ZeRO-2 crash +
resume, ZeRO-2/3 with CPU offload), so the start-up cost is paid once; the tests then compare
the summaries and the checkpoints the jobs left behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lctrain.config import ConfigError, load_config
from tests.conftest import free_port, tiny_overrides

pytestmark = pytest.mark.distributed

STEPS = 5
COMMON = {"train.max_steps": STEPS, "train.checkpoint_every": 2, "train.eval_every": 0, "train.keep_last": 2}
DS = {"parallel.dp_impl": "deepspeed"}
# stage 3 with a zero persistence threshold: every parameter of the tiny model is partitioned
Z3 = {**DS, "parallel.zero_stage": 3, "parallel.zero_param_persistence_threshold": 0,
      "parallel.zero_prefetch_bucket_size": 10_000}
JOBS: dict[str, dict] = {
    "ddp": {},
    "zero1": {**DS, "parallel.zero_stage": 1},
    "zero2": {**DS, "parallel.zero_stage": 2, "parallel.zero_reduce_bucket_size": 20_000},
    "zero3": Z3,
    "zero2_offload": {**DS, "parallel.zero_stage": 2, "parallel.offload_optimizer": True},
    "zero3_offload": {**Z3, "parallel.offload_optimizer": True, "parallel.offload_params": True},
    # MoE FFNs without expert parallelism (experts replicated, then partitioned by ZeRO like any weight)
    "moe_ddp": {"model.moe.num_experts": 4, "model.moe.top_k": 2},
    "moe_zero3": {**Z3, "model.moe.num_experts": 4, "model.moe.top_k": 2},
    # a model Qwen3-Next can express (qk-norm, partial RoPE, MoE with a gated shared expert): the export test
    "qwen3_zero3": {**Z3, "model.attn.qk_norm": True, "model.attn.partial_rotary_factor": 0.5,
                    "model.moe.num_experts": 4, "model.moe.top_k": 2, "model.moe.num_shared_experts": 1,
                    "model.moe.shared_expert_gate": True},
}
CRASH_AT = 2  # the resume job crashes after step 2 (checkpointed), then resumes with train.resume=auto
POISON_AT = 3  # the nan_policy=skip jobs get a NaN loss (and NaN gradients) at step 3


def _jobs_worker(rank: int, world: int, port: int, jobs: list, out_file: str) -> None:
    """Spawned gloo rank: run each ``(name, args, hook)`` job; rank 0 writes ``{name: summary}``.

    ``hook``: None, ``("crash", step)`` (KeyboardInterrupt once ``step`` steps are done; the summary
    is None) or ``("poison", step)`` (the loss of optimizer step ``step`` is NaN).
    """
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from lctrain.train.trainer import Trainer

    results = {}
    real_step, real_loss = Trainer.train_step, Trainer.forward_loss_sum
    for name, args, hook in jobs:
        kind, at = hook if hook is not None else (None, None)
        if kind == "crash":
            def crashing(self, _at=at):
                if self.state.step == _at:
                    raise KeyboardInterrupt("simulated crash")
                return real_step(self)

            Trainer.train_step = crashing
        elif kind == "poison":
            def poisoned(self, batch, _at=at):
                loss = real_loss(self, batch)
                return loss * float("nan") if self.state.step == _at - 1 and self.model.training else loss

            Trainer.forward_loss_sum = poisoned
        try:
            results[name] = Trainer(load_config(args)).fit()
        except KeyboardInterrupt:
            results[name] = None
        finally:
            Trainer.train_step, Trainer.forward_loss_sum = real_step, real_loss
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    """``(root, cache, {job: summary})`` of every job, run by one pair of gloo ranks."""
    import deepspeed  # noqa: F401  (in the test extra: a missing DeepSpeed fails here instead of skipping)

    root = tmp_path_factory.mktemp("ds")
    cache = root / "cache"
    jobs = [(name, tiny_overrides(root / name, small_corpus, cache, **COMMON, **extra), None)
            for name, extra in JOBS.items()]
    resume = tiny_overrides(root / "zero2_resume", small_corpus, cache, **COMMON, **JOBS["zero2"])
    jobs.append(("zero2_crash", resume, ("crash", CRASH_AT)))
    jobs.append(("zero2_resume", resume + ["train.resume=auto"], None))
    for name in ("ddp", "zero2", "zero3"):
        args = tiny_overrides(root / f"{name}_skip", small_corpus, cache, **COMMON, **JOBS[name],
                              **{"train.nan_policy": "skip"})
        jobs.append((f"{name}_skip", args, ("poison", POISON_AT)))
    out = root / "summaries.json"
    mp.start_processes(_jobs_worker, args=(2, free_port(), jobs, str(out)), nprocs=2, start_method="spawn")
    return root, cache, json.loads(out.read_text())


def _close(a, b, atol):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------- config
def _cfg(tmp_path, small_corpus, **extra):
    return load_config(tiny_overrides(tmp_path / "run", small_corpus, tmp_path / "cache", **extra))


def test_generated_deepspeed_config_matches_lctrain_batch(tmp_path, small_corpus):
    from lctrain.parallel.deepspeed import deepspeed_config

    cfg = _cfg(tmp_path, small_corpus, **{"train.global_batch_size": 16, "train.micro_batch_size": 2,
                                          "optim.grad_clip": 0.5, **Z3, "parallel.offload_optimizer": True})
    ds = deepspeed_config(cfg, dp_size=2)
    assert ds["train_batch_size"] == 16 == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 0 and z["stage3_prefetch_bucket_size"] == 10_000
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": False} and "offload_param" not in z
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    json.dumps(ds)  # a plain JSON config, generated, never hand-written
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size"):
        deepspeed_config(cfg, dp_size=3)


def test_config_refuses_bad_deepspeed_combinations(tmp_path, small_corpus):
    moe = {"model.moe.num_experts": 4, "model.moe.top_k": 2, "parallel.ep_degree": 2}
    with pytest.raises(ConfigError, match="parallel.dp_impl=ddp"):
        _cfg(tmp_path, small_corpus, **moe, **DS)
    with pytest.raises(ConfigError, match="parallel.zero_stage=3"):
        _cfg(tmp_path, small_corpus, **DS, **{"parallel.zero_stage": 2, "parallel.offload_params": True})
    with pytest.raises(ConfigError, match="dp_impl=deepspeed"):
        _cfg(tmp_path, small_corpus, **{"parallel.offload_optimizer": True})
    with pytest.raises(ConfigError, match="allowed values are 1, 2, 3"):
        _cfg(tmp_path, small_corpus, **DS, **{"parallel.zero_stage": 4})
    with pytest.raises(ConfigError, match="context parallelism"):
        _cfg(tmp_path, small_corpus, **DS, **{"parallel.cp_degree": 2})


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("job", ["zero1", "zero2", "zero3"])
def test_zero_stage_losses_equal_ddp(runs, job):
    _, _, s = runs
    ref, got = s["ddp"], s[job]
    assert len(got["losses"]) == STEPS and got["world_size"] == 2
    _close(got["losses"], ref["losses"], 1e-4)
    _close(got["final_val_loss"], ref["final_val_loss"], 1e-4)


def test_moe_without_expert_parallelism_under_zero3_equals_ddp(runs):
    _, _, s = runs
    _close(s["moe_zero3"]["losses"], s["moe_ddp"]["losses"], 1e-4)
    assert s["moe_zero3"]["moe"] is not None


@pytest.mark.parametrize("job", ["zero2_offload", "zero3_offload"])
def test_cpu_offload_losses_equal_ddp(runs, job):
    _, _, s = runs
    _close(s[job]["losses"], s["ddp"]["losses"], 1e-4)


def test_zero2_resume_equals_uninterrupted(runs):
    root, _, s = runs
    assert s["zero2_crash"] is None  # crashed after the step-2 checkpoint
    resumed = s["zero2_resume"]
    assert resumed["steps"] == STEPS and len(resumed["losses"]) == STEPS
    _close(resumed["losses"], s["zero2"]["losses"], 1e-6)
    _close(resumed["final_val_loss"], s["zero2"]["final_val_loss"], 1e-6)
    ckpts = sorted(p.name for p in (root / "zero2_resume" / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000005"]  # keep_last=2, no .tmp left over
    last = root / "zero2_resume" / "checkpoints" / "step_00000005"
    assert json.loads((last / "COMPLETE").read_text())["engine"] == "deepspeed"
    assert (last / "deepspeed" / "zero").is_dir() and (last / "rng_rank1.pt").is_file()
    assert not (last / ".metadata").exists()  # DeepSpeed's files, not DCP's


def test_consolidated_zero3_checkpoint_is_the_trained_model(runs, small_corpus, tmp_path):
    """ZeRO-3 shards -> one plain state dict: same weights as DDP's, same validation loss; export round trip."""
    from lctrain.checkpoint import consolidate_checkpoint, export_checkpoint, load_checkpoint
    from lctrain.models import HybridLM
    from lctrain.train.trainer import Trainer

    root, cache, s = runs
    z3 = root / "zero3" / "checkpoints" / "step_00000005"
    state = consolidate_checkpoint(z3)
    cfg = load_config(tiny_overrides(tmp_path / "eval", small_corpus, cache, **COMMON))
    assert set(state) == set(HybridLM(cfg.model).state_dict())
    ddp_model = HybridLM(cfg.model)
    load_checkpoint(root / "ddp" / "checkpoints" / "step_00000005", ddp_model, None)
    for name, ref in ddp_model.state_dict().items():
        assert (state[name] - ref).abs().max() < 1e-4, name

    tr = Trainer(cfg)  # one process, plain model: the DeepSpeed checkpoint loads as consolidated weights
    load_checkpoint(z3, tr.model, None)
    _close(tr.evaluate(), s["zero3"]["final_val_loss"], 1e-5)
    with pytest.raises(ConfigError, match="deepspeed"):  # resuming ZeRO state under DDP is refused
        load_checkpoint(z3, tr.model, tr.optimizer, dp=tr.dp)

    from safetensors.torch import load_file

    out = export_checkpoint(z3, tmp_path / "model.safetensors")
    fresh = HybridLM(cfg.model)
    fresh.load_state_dict(load_file(out), strict=True)
    for name, v in fresh.state_dict().items():
        assert torch.equal(v, state[name]), name


@pytest.mark.parametrize("job", ["zero2_skip", "zero3_skip"])
def test_non_finite_step_is_skipped_as_with_ddp(runs, job):
    """A NaN loss under train.nan_policy=skip: ZeRO drops the step's gradients and leaves the weights alone."""
    _, _, s = runs
    ref, got = s["ddp_skip"], s[job]
    assert got["skipped_steps"] == ref["skipped_steps"] == [POISON_AT]
    finite = [i for i in range(STEPS) if i != POISON_AT - 1]
    _close([got["losses"][i] for i in finite], [ref["losses"][i] for i in finite], 1e-4)
    _close(got["final_val_loss"], ref["final_val_loss"], 1e-4)


_ONE_PROCESS = r"""
import json, sys
import torch
torch.set_num_threads(1)
from lctrain.config import load_config
from lctrain.train.trainer import train
summary = train(load_config(json.loads(sys.argv[1])))
print(json.dumps(summary["losses"]))
"""


def test_one_process_zero3_with_offload_equals_two_rank_ddp(runs, small_corpus, tmp_path):
    """No launcher (one GPU with offload, here CPU): the engine runs on a one-rank group, same losses."""
    import subprocess
    import sys

    from tests.conftest import REPO

    _, cache, s = runs
    args = tiny_overrides(tmp_path / "one", small_corpus, cache, **COMMON, **JOBS["zero3_offload"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-c", _ONE_PROCESS, json.dumps(args)], check=False, capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _close(json.loads(proc.stdout.strip().splitlines()[-1]), s["ddp"]["losses"], 1e-4)


def test_zero3_checkpoint_exports_to_hugging_face(runs, tmp_path):
    """The ZeRO-3 run exports (consolidated) to a Qwen3-Next directory whose logits are the trained model's."""
    from transformers import Qwen3NextForCausalLM

    from lctrain.checkpoint import consolidate_checkpoint, read_run_config
    from lctrain.export.cli import export_run
    from lctrain.models import HybridLM

    root, _, _ = runs
    z3 = root / "qwen3_zero3" / "checkpoints" / "step_00000005"
    export_run(root / "qwen3_zero3", tmp_path / "hf", checkpoint=str(z3))
    cfg = read_run_config(root / "qwen3_zero3")
    model = HybridLM(cfg.model).eval()
    model.load_state_dict(consolidate_checkpoint(z3), strict=True)
    hf = Qwen3NextForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ((ours - theirs).abs().max() / ours.abs().max()).item() <= 1e-4
