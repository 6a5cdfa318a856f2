"""The CUDA kernel plan, built and run on a CPU machine.

* Every recipe at every scale preset resolves, for device ``cuda`` with ``model.kernels=auto``,
  to fused kernels only (no dense ``[Tq, Tk]`` block, no per-document loop), passes its start-up
  kernel-limit checks (with ``cp_degree=2`` too), and every sequence op of the built model follows
  the plan.
* One training step (forward, backward, AdamW) of ``hybrid_gdn_3to1``, ``hybrid_lightning_3to1``
  and ``hybrid_gdn_3to1_moe`` under the CUDA plan, with ``cp_degree=2`` (ring, and Ulysses) on 2
  gloo ranks and 3 documents whose boundaries cut the zigzag shards: the Triton kernels run under
  the interpreter (FlashAttention-2 ring blocks and varlen, Gated DeltaNet and Lightning chunk
  kernels with state passing). Loss, every parameter gradient and the parameters after the
  optimizer step equal the fp32 torch path of one process within 1e-4 relative.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lctrain.config import (
    available_recipes,
    available_scales,
    check_mixers_context_parallel,
    check_mixers_kernel_limits,
    load_config,
)
from lctrain.errors import ConfigError
from lctrain.kernels.ops import sequence_ops
from lctrain.kernels.plan import SLOW_PATHS, apply_kernel_plan, resolve_kernel_plan
from lctrain.models import HybridLM
from tests.conftest import free_port

pytestmark = pytest.mark.cuda_plan

SCALES = available_scales()
TOL = 1e-4


@pytest.mark.parametrize("recipe", available_recipes())
def test_cuda_plan_takes_fused_kernels_for_every_recipe_and_scale(recipe):
    """The recipe as shipped and at every scale preset it combines with (the MQAR recipes' 8-letter
    patterns do not tile the 4-layer cpu preset: those pairs are refused configs, not runs)."""
    checked = []
    for scale in (None, *SCALES):
        try:
            cfg = load_config([f"recipe={recipe}"] + ([f"scale={scale}"] if scale else []))
        except ConfigError as e:
            assert scale is not None and "multiple of len(model.layer_pattern)" in str(e), (recipe, scale, e)
            continue
        checked.append(scale)
        m = cfg.model
        plan = resolve_kernel_plan(m.kernels, "cuda", expert_impl=m.moe.expert_impl,
                                   loss_chunk_size=m.loss_chunk_size, compute_dtype=torch.bfloat16)
        assert plan.device == "cuda" and not plan.slow_paths(), (recipe, scale, plan.ops)
        assert not set(plan.ops.values()) & SLOW_PATHS
        assert plan.ops["ring_block"] == "triton_flash" and plan.ops["varlen_attention"] == "triton_flash_varlen"
        check_mixers_kernel_limits(m, plan.choice)  # raises ConfigError on a limit only a GPU kernel has
        if cfg.data.seq_len % 4 == 0:
            check_mixers_context_parallel(m, 2, "ring" if "M" not in m.layer_pattern else "ulysses", 1,
                                          cfg.data.seq_len)
        with torch.device("meta"):
            model = HybridLM(m)
        apply_kernel_plan(model, plan)
        ops = list(sequence_ops(model))
        assert ops, recipe
        for *_, op in ops:
            if hasattr(op, "kernel") or type(op).__name__ in ("SoftmaxAttentionOp", "MoBAAttentionOp"):
                assert op.kernels == "triton", (recipe, scale, type(op).__name__, op.kernels)
    assert None in checked and len(checked) >= 2, (recipe, checked)


def test_cpu_plan_is_the_torch_path():
    plan = resolve_kernel_plan("auto", "cpu")
    assert set(plan.choice.values()) == {"torch"}
    assert plan.ops["ring_block"] == "cpu_flash" and plan.ops["local_attention"] == "sdpa"
    dense = resolve_kernel_plan("torch", "cuda")
    assert dense.slow_paths() == {"varlen_attention": "sdpa_per_document", "ring_block": "dense_block",
                                  "ulysses_attention": "sdpa_per_document"}


# ------------------------------------------------------------------ one training step on 2 ranks

RECIPES = ("hybrid_gdn_3to1", "hybrid_lightning_3to1", "hybrid_gdn_3to1_moe")


def _cfg(recipe: str):
    over = [f"recipe={recipe}", "scale=cpu", "model.n_layers=4", "model.d_model=32", "model.vocab_size=64",
            "model.attn.num_heads=2", "model.attn.num_kv_heads=1", "model.attn.head_dim=16",
            "model.gdn.num_heads=2", "model.gdn.head_dim=16", "model.gdn.chunk_size=16",
            "model.lightning.num_heads=2", "model.lightning.head_dim=16", "model.lightning.chunk_size=16",
            "data.seq_len=64"]
    if recipe.endswith("_moe"):
        over += ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=32",
                 "model.moe.aux_loss_coeff=0.0", "model.moe.z_loss_coeff=0.0"]
    return load_config(over).model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _step(model, ids, **kwargs):
    """The summed loss of ``model(ids, **kwargs)`` after backward, and an AdamW optimizer to step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loss = model(ids, **kwargs)
    loss.backward()
    return loss, opt


def _checks(rank: int, P: int) -> dict[str, float]:
    from lctrain.kernels.varlen import attach_host_bounds
    from lctrain.parallel.context import apply_context_parallel, build_context_parallel, shard_sequence

    T = 64
    bounds = [0, 13, 40, 64]  # 3 documents; 13 and 40 cut the zigzag chunks of 16 tokens
    res: dict[str, float] = {}
    handles = {impl: build_context_parallel([list(range(P))], impl) for impl in ("ring", "ulysses")}
    for recipe in RECIPES:
        mcfg = _cfg(recipe)
        ids = torch.randint(0, mcfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(11))
        labels = torch.roll(ids, -1, 1)
        torch.manual_seed(0)
        ref_model = HybridLM(mcfg)
        state = {k: v.clone() for k, v in ref_model.state_dict().items()}
        apply_kernel_plan(ref_model, resolve_kernel_plan("torch", "cpu"))
        cu = attach_host_bounds(torch.tensor(bounds, dtype=torch.int32), bounds)
        ref_loss, ref_opt = _step(ref_model, ids, cu_seqlens=cu, labels=labels)
        ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
        ref_opt.step()
        for impl, h in handles.items():
            model = HybridLM(mcfg)
            model.load_state_dict(state)
            apply_kernel_plan(model, resolve_kernel_plan("auto", "cuda"))
            apply_context_parallel(model, h)
            cu = attach_host_bounds(torch.tensor(bounds, dtype=torch.int32), bounds)
            pos = _positions(bounds, T)
            loss, opt = _step(model, shard_sequence(ids, P, rank), position_ids=shard_sequence(pos, P, rank),
                              cu_seqlens=cu, labels=shard_sequence(labels, P, rank))
            total = loss.detach().clone()
            dist.all_reduce(total)
            name = f"{recipe}_{impl}"
            res[f"{name}/loss"] = _rel(total, ref_loss)
            for n, p in model.named_parameters():
                dist.all_reduce(p.grad)  # the cp ranks' shares of the gradient (the trainer's DDP/FSDP does this)
                res[f"{name}/grad/{n}"] = _rel(p.grad, ref_grads[n])
            opt.step()
            ref_params = dict(ref_model.named_parameters())
            for n, p in model.named_parameters():
                res[f"{name}/param/{n}"] = _rel(p, ref_params[n])
    res.update(_lightning_13b_dims(rank, P, handles["ring"], bounds, T))
    return res


def _lightning_13b_dims(rank, P, cp, bounds, T) -> dict[str, float]:
    """Lightning at the 1.3b preset's head dim (128) under cp=2 with the Triton kernel: the state
    pass carries 128 + 128 value columns, more than the kernel's 128, and runs in two column blocks."""
    from lctrain.kernels.lightning_attn import chunk_lightning_attn
    from lctrain.kernels.ops import LightningAttnOp
    from lctrain.kernels.varlen import attach_host_bounds
    from lctrain.layers.lightning import alibi_slopes
    from lctrain.parallel.context import context_parallel_op, shard_sequence

    g = torch.Generator().manual_seed(3)
    H, D = 2, 128
    full = [torch.randn(1, T, H, D, generator=g) * 0.3 for _ in range(3)]
    slope = torch.tensor(alibi_slopes(H))
    cu = attach_host_bounds(torch.tensor(bounds, dtype=torch.int32), bounds)
    ref_in = [x.clone().requires_grad_(True) for x in full]
    ref = chunk_lightning_attn(*ref_in, slope, cu_seqlens=cu, chunk_size=16)[0]
    w = torch.randn(ref.shape, generator=g)
    (ref * w).sum().backward()
    def sh(x):
        return shard_sequence(x, P, rank, dim=1)

    loc = [sh(x).detach().clone().requires_grad_(True) for x in full]
    op = context_parallel_op(LightningAttnOp("triton", chunk_size=16), cp)
    out = op(*loc, slope, cu_seqlens=cu)
    (out * sh(w)).sum().backward()
    res = {"lightning_head_dim_128_ring/out": _rel(out, sh(ref))}
    for i, (a, b) in enumerate(zip(loc, ref_in)):
        res[f"lightning_head_dim_128_ring/grad{i}"] = _rel(a.grad, sh(b.grad))
    return res


def _positions(bounds, T):
    from lctrain.kernels.varlen import position_ids_from_cu_seqlens

    return position_ids_from_cu_seqlens(torch.tensor(bounds, dtype=torch.int32), T)


def _worker(rank: int, world: int, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = _checks(rank, world)
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        if rank == 0:
            merged: dict[str, float] = {}
            for r in gathered:
                for k, v in r.items():
                    merged[k] = max(merged.get(k, 0.0), v)
            with open(out_file, "w") as f:
                json.dump(merged, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_cuda_plan_training_step_cp2_equals_fp32_one_process(tmp_path):
    out = tmp_path / "cuda_plan.json"
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    res = json.loads(out.read_text())
    for recipe in RECIPES:
        for impl in ("ring", "ulysses"):
            grads = [k for k in res if k.startswith(f"{recipe}_{impl}/grad/")]
            assert len(grads) > 10, (recipe, impl)
            assert f"{recipe}_{impl}/loss" in res
    assert "lightning_head_dim_128_ring/grad2" in res
    bad = {k: v for k, v in res.items() if not v < TOL}
    assert not bad, bad
