"""Host syncs of one forward + backward do not grow with depth or with the number of documents.

Counted: ``Tensor.tolist``, ``Tensor.item`` and every ``aten._local_scalar_dense`` (what
``int(t)``, ``float(t)``, ``bool(t)`` and ``.item()`` dispatch to). On CUDA each one stalls the
host until the GPU drains. The batch is what the collator gives the trainer: ``cu_seqlens`` with
its host record (:func:`lctrain.kernels.varlen.attach_host_bounds`), carried to the device with
:func:`lctrain.kernels.varlen.with_host_bounds`. Checked on the CPU path and under the CUDA kernel
plan (Triton kernels under the interpreter), for 4 and 8 layers and 2 and 8 documents.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lctrain.config import load_config
from lctrain.kernels.plan import apply_kernel_plan, resolve_kernel_plan
from lctrain.kernels.varlen import attach_host_bounds, with_host_bounds
from lctrain.models import HybridLM

MAX_SYNCS = 2  # per micro-batch (the bound); the count must also not depend on depth or documents


class SyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` calls and (patched) ``Tensor.tolist`` / ``Tensor.item``."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._note("_local_scalar_dense")
        return func(*args, **(kwargs or {}))

    def _note(self, what: str) -> None:
        import traceback

        self.count += 1
        frame = next((f for f in reversed(traceback.extract_stack()[:-2]) if "/lctrain/" in f.filename), None)
        self.where.append(f"{what} at {frame.filename.split('/lctrain/')[-1]}:{frame.lineno}" if frame else what)

    def __enter__(self):
        orig_tolist, orig_item = torch.Tensor.tolist, torch.Tensor.item
        counter = self

        def tolist(t, *a, **k):
            counter._note("tolist")
            return orig_tolist(t, *a, **k)

        def item(t, *a, **k):  # .item() also dispatches _local_scalar_dense: count it once
            with torch._C._DisableTorchDispatch():
                counter._note("item")
                return orig_item(t, *a, **k)

        self._orig = (orig_tolist, orig_item)
        torch.Tensor.tolist, torch.Tensor.item = tolist, item
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.item = self._orig
        return super().__exit__(*exc)


def _model(recipe: str, n_layers: int, plan_device: str):
    over = [f"recipe={recipe}", "scale=cpu", f"model.n_layers={n_layers}", "model.d_model=64", "model.vocab_size=256",
            "model.attn.num_heads=2", "model.attn.num_kv_heads=1", "model.attn.head_dim=16",
            "model.gdn.num_heads=2", "model.gdn.head_dim=16", "data.seq_len=64"]
    if recipe.endswith("_moe"):
        over += ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=32"]
    cfg = load_config(over)
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    plan = resolve_kernel_plan(cfg.model.kernels, plan_device, expert_impl=cfg.model.moe.expert_impl)
    return apply_kernel_plan(model, plan), cfg.model.vocab_size


def _batch(vocab: int, T: int, docs: int):
    g = torch.Generator().manual_seed(docs)
    cuts = sorted(torch.randperm(T - 1, generator=g)[: docs - 1].add(1).tolist())
    bounds = [0, *cuts, T]
    cu = attach_host_bounds(torch.tensor(bounds, dtype=torch.int32), bounds)  # as the collator does
    cu = with_host_bounds(cu, "cpu")
    ids = torch.randint(0, vocab, (1, T), generator=g)
    return ids, cu


def count_syncs(recipe: str, n_layers: int, docs: int, plan_device: str) -> tuple[int, list[str]]:
    model, vocab = _model(recipe, n_layers, plan_device)
    ids, cu = _batch(vocab, 64, docs)
    with SyncCounter() as c:
        loss = model(ids, cu_seqlens=cu, labels=ids)
        loss.backward()
    return c.count, c.where


@pytest.mark.parametrize("recipe", ["hybrid_gdn_3to1", "hybrid_gdn_3to1_moe", "transformer"])
def test_host_syncs_constant_cpu_path(recipe):
    counts = {(n, d): count_syncs(recipe, n, d, "cpu") for n in (4, 8) for d in (2, 8)}
    values = {k: v[0] for k, v in counts.items()}
    assert len(set(values.values())) == 1, values
    n, where = counts[(8, 8)]
    assert n <= MAX_SYNCS, where


@pytest.mark.cuda_plan
@pytest.mark.parametrize("recipe", ["hybrid_gdn_3to1", "hybrid_gdn_3to1_moe", "transformer"])
def test_host_syncs_constant_cuda_plan(recipe):
    """The CUDA plan's composition (Triton flash varlen, Triton Gated DeltaNet) on CPU tensors."""
    counts = {(n, d): count_syncs(recipe, n, d, "cuda") for n in (4, 8) for d in (2, 8)}
    values = {k: v[0] for k, v in counts.items()}
    assert len(set(values.values())) == 1, values
    n, where = counts[(8, 8)]
    assert n <= MAX_SYNCS, where


def test_counter_sees_each_kind_of_sync():
    """The counter itself: one count per tolist, item, int() and bool() on a tensor."""
    t = torch.tensor([1, 2])
    with SyncCounter() as c:
        t.tolist()
        t[0].item()
        int(t[1])
        bool(t[0] > 0)
    assert c.count == 4, c.where


def test_moh_selected_heads_path_makes_no_host_sync():
    """MoH's selected-heads projection is one grouped GEMM per weight with device offsets."""
    from lctrain.layers.moh import MoHAttention

    layer = MoHAttention(64, 4, 2, 16, num_shared_heads=1, top_k=2, path="selected", kernels="torch").train()
    x = torch.randn(1, 32, 64)
    _, cu = _batch(10, 32, 3)
    with SyncCounter() as c:
        layer(x, None, cu).sum().backward()
    assert layer.last_path_selected and c.count == 0, c.where
