"""FSDP2 under bf16 training all-gathers bf16 parameters and reduces fp32 gradients into fp32 shards."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from lctrain.config import load_config
from lctrain.models import HybridLM
from lctrain.parallel import parallelize
from lctrain.parallel.mesh import DistEnv, ParallelDims
from tests.conftest import free_port


def _gathered_dtypes(dtype: str) -> tuple[set, torch.dtype, torch.dtype]:
    cfg = load_config(["recipe=hybrid_gdn_3to1", "model.d_model=32", "model.vocab_size=64", "model.attn.num_heads=2",
                       "model.attn.num_kv_heads=1", "model.attn.head_dim=16", "model.gdn.num_heads=2",
                       "model.gdn.head_dim=16", "parallel.dp_impl=fsdp", f"train.dtype={dtype}"])
    env = DistEnv(0, 1, 0, torch.device("cpu"), "gloo")
    dims = ParallelDims(1, 1, 1)
    model = HybridLM(cfg.model)
    seen = set()
    attn = model.layers[3].mixer
    attn.q_proj.register_forward_pre_hook(lambda m, a: seen.add(m.weight.dtype))
    par = parallelize(model, dims, dims.build_meshes(env), cfg, env)
    ids = torch.randint(0, 64, (1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        par.model(ids).float().sum().backward()
    w = attn.q_proj.weight
    return seen, w.dtype, w.grad.dtype


def test_fsdp_bf16_policy_gathers_bf16_and_keeps_fp32_master():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        seen, master, grad = _gathered_dtypes("bf16")
        assert seen == {torch.bfloat16}, seen  # what the layer computes with
        assert master == torch.float32 and grad == torch.float32  # fp32 shards and reduced gradients
        seen, master, _ = _gathered_dtypes("fp32")
        assert seen == {torch.float32} and master == torch.float32
    finally:
        dist.destroy_process_group()
