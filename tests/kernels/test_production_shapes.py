"""Every Triton kernel at the scale presets' head dims with the CUDA tiles, against fp32 references.

The other kernel tests run small head dims with the interpreter's own tiles. Here each kernel runs
the shapes of ``lctrain/recipes/scale/{cpu,340m,1.3b}.yaml`` and, inside
:func:`lctrain.kernels.tiles.force_cuda_tiles` ("bf16": the tiles a bf16 GPU run takes), the
CUDA tile configuration, with fp32 data so the result must match the fp32 reference (``naive.py``
of each kernel) to rounding. Short sequences (128-2048 tokens) keep the interpreter fast; the
documents are placed so they cut the tiles.

* FlashAttention, head dims 64 (cpu, 340m) and 128 (1.3b): forward BLOCK_M=128 / BLOCK_N=64,
  backward 64 / 64. Causal bands with unequal tiles, packed documents whose boundaries cut the
  bands, a ring-attention block pair (unequal query/key lengths, bottom-right causal) and a
  sliding window; out, lse and dq, dk, dv (the loss also uses lse).
* Gated DeltaNet: K = V = 128 (340m) and K = V = 256 (1.3b), grouped value heads: several
  64-wide V blocks, accumulated in ``_bwd_main`` and ``_prep``; o, final state and dq, dk, dv,
  dg, dbeta, dh0. (Its tiles are the same on CUDA and under the interpreter.)
* Lightning Attention, head dims 64 and 128 with the CUDA 64-wide state tiles (2 x 2 state
  blocks at 128), packed documents and initial states; o, final state, dq, dk, dv, dh0.
* MoBA at the presets' block sizes: 512 (340m, 1.3b; 8 query tiles of 64 per block, top-3 of
  3 past blocks) with head dims 64 and 128, and 64 (cpu); out, lse, dq, dk, dv.

Bounds (relative RMS error, fp32): 1e-5 for the attention kernels, 2e-5 for Gated DeltaNet (its
in-chunk decay is fp32 where the reference accumulates per token); measured <= 7e-7 everywhere.
All run under the ``production_shapes`` marker: ``pytest -m production_shapes`` (about 40 s on
2 CPU cores; on a GPU they run natively through the ``device`` fixture, with the same tiles).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from lctrain.kernels.flash_attn import flash_attn_bwd, flash_attn_fwd, interface, naive_attention
from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule_triton, naive_recurrent_gated_delta_rule
from lctrain.kernels.lightning_attn import chunk_lightning_attn_triton, naive_recurrent_lightning_attn
from lctrain.kernels.moba import interface as moba_interface
from lctrain.kernels.moba import moba_attn_func, moba_attn_naive
from lctrain.kernels.tiles import force_cuda_tiles

pytestmark = pytest.mark.production_shapes

TOL = 1e-5
TOL_GDN = 2e-5


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "non-finite entries differ"
    a, b = a[finite], b[finite]
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _check(names, got, ref, tol):
    errs = {n: rel_rms(a, b) for n, a, b in zip(names, got, ref, strict=True)}
    bad = {n: e for n, e in errs.items() if e > tol}
    assert not bad, f"relative RMS error above {tol}: {bad} (all: {errs})"


def _cu(lengths, device):
    """int32 cu_seqlens [N + 1] of ``lengths`` on ``device``."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _randn(g, *shape, device):
    return torch.randn(*shape, generator=g, device=device)


@pytest.fixture
def cuda_tiles():
    """Run inside force_cuda_tiles('bf16'): the tiles of a bf16 GPU run, on fp32 data."""
    with force_cuda_tiles("bf16"):
        yield


# ---------------------------------------------------------------------------------------------
# FlashAttention


@pytest.mark.parametrize("D", [64, 128])
def test_flash_cuda_tiles_are_the_production_ones(D, cuda_tiles):
    fwd = interface._config(D, backward=False, dtype=torch.float32)
    bwd = interface._config(D, backward=True, dtype=torch.float32)
    assert (fwd["BLOCK_M"], fwd["BLOCK_N"], fwd["num_warps"]) == (128, 64, 4 if D == 64 else 8)
    assert (bwd["BLOCK_M"], bwd["BLOCK_N"]) == (64, 64)


# (q document lengths, k document lengths, causal, window): None = the same as q
FLASH_CASES = {
    "causal_T256": ([256], None, True, (-1, -1)),
    "documents_cut_bands": ([37, 128, 1, 90], None, True, (-1, -1)),
    "ring_pair_unequal": ([100, 60], [200, 60], True, (-1, -1)),
    "ring_pair_full": ([100, 60], [130, 70], False, (-1, -1)),
    "window_80": ([200], None, True, (80, -1)),
}


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_flash_attention(case, D, device, cuda_tiles, monkeypatch):
    """Packed [total, H, D], Hq = 4, Hkv = 2 (GQA), the CUDA tiles; out, lse, dq, dk, dv."""
    launched = []
    config = interface._config

    def spy(*args, **kwargs):
        cfg = config(*args, **kwargs)
        launched.append((cfg["BLOCK_M"], cfg["BLOCK_N"]))
        return cfg

    monkeypatch.setattr(interface, "_config", spy)
    lq, lk, causal, window = FLASH_CASES[case]
    lk = lk or lq
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    g = torch.Generator(device=device).manual_seed(D + sum(lq))
    q = _randn(g, sum(lq), 4, D, device=device).requires_grad_()
    k = _randn(g, sum(lk), 2, D, device=device).requires_grad_()
    v = _randn(g, sum(lk), 2, D, device=device).requires_grad_()
    kw = dict(causal=causal, window_size=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out, lse = flash_attn_fwd(q, k, v, max_seqlen_q=max(lq), max_seqlen_k=max(lk), **kw)
    ref_out, ref_lse = naive_attention(q, k, v, **kw)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    ref_loss = (ref_out * dout).sum() + (ref_lse * dlse).sum()
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v), retain_graph=True)
    _check(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (ref_out, ref_lse, *ref_grads), TOL)
    # the raw backward of a ring step (given out / lse, no dlse) at the same tiles
    raw = flash_attn_bwd(dout, q, k, v, out.detach(), lse.detach(), **kw)
    ref_raw = torch.autograd.grad(ref_out, (q, k, v), dout)
    _check(("raw dq", "raw dk", "raw dv"), raw, ref_raw, TOL)
    assert set(launched) == {(128, 64), (64, 64)}, launched  # forward and backward tiles ran


# ---------------------------------------------------------------------------------------------
# Gated DeltaNet


def _gdn_case(T, H, HV, K, V, N, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    q = _randn(g, 1, T, H, K, device=device)
    k = F.normalize(_randn(g, 1, T, H, K, device=device), dim=-1)
    v = _randn(g, 1, T, HV, V, device=device)
    gate = F.logsigmoid(_randn(g, 1, T, HV, device=device) + 2.0)
    beta = torch.sigmoid(_randn(g, 1, T, HV, device=device))
    h0 = _randn(g, N, HV, K, V, device=device)
    weights = (_randn(g, 1, T, HV, V, device=device), _randn(g, N, HV, K, V, device=device))
    return [q, k, v, gate, beta, h0], weights


def _gdn_run(fn, leaves, weights, cu):
    xs = [x.detach().requires_grad_() for x in leaves]
    o, s = fn(*xs[:5], initial_state=xs[5], output_final_state=True, cu_seqlens=cu)
    grads = torch.autograd.grad((o * weights[0]).sum() + (s * weights[1]).sum(), xs)
    return (o, s, *grads)


@pytest.mark.parametrize(
    "preset,T,H,HV,K,V,lengths",
    [
        ("340m", 192, 1, 2, 128, 128, [70, 122]),  # K = V = 128, 2 V blocks, grouped value heads
        ("1.3b", 160, 1, 1, 256, 256, [160]),  # K = V = 256: 4 V blocks, full-width 256 K tiles
    ],
)
def test_gated_delta_rule(preset, T, H, HV, K, V, lengths, device):
    cu = _cu(lengths, device)
    leaves, weights = _gdn_case(T, H, HV, K, V, len(lengths), seed=K + T, device=device)
    got = _gdn_run(chunk_gated_delta_rule_triton, leaves, weights, cu)
    ref = _gdn_run(naive_recurrent_gated_delta_rule, leaves, weights, cu)
    _check(("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"), got, ref, TOL_GDN)


# ---------------------------------------------------------------------------------------------
# Lightning Attention


@pytest.mark.parametrize("D", [64, 128])
def test_lightning_attention(D, device, cuda_tiles):
    """H = 2 (slopes 0.02 and 0.5), chunk 64, two documents (100 + 156 tokens), initial states."""
    lengths = [100, 156]
    T, H = sum(lengths), 2
    cu = _cu(lengths, device)
    g = torch.Generator(device=device).manual_seed(D)
    q, k = (_randn(g, 1, T, H, D, device=device).requires_grad_() for _ in range(2))
    v = _randn(g, 1, T, H, D, device=device).requires_grad_()
    h0 = _randn(g, len(lengths), H, D, D, device=device).requires_grad_()
    slope = torch.tensor([0.02, 0.5], device=device)
    dout, dht = _randn(g, 1, T, H, D, device=device), _randn(g, len(lengths), H, D, D, device=device)

    def run(fn):
        o, ht = fn(q, k, v, slope, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        return (o, ht, *torch.autograd.grad((o * dout).sum() + (ht * dht).sum(), (q, k, v, h0)))

    from lctrain.kernels.lightning_attn.triton_chunk import _state_tiles

    assert _state_tiles(D, D) == (64, 64)  # the CUDA state tiles (full width under the interpreter)
    got = run(lambda *a, **kw: chunk_lightning_attn_triton(*a, chunk_size=64, **kw))
    ref = run(naive_recurrent_lightning_attn)
    _check(("o", "final_state", "dq", "dk", "dv", "dh0"), got, ref, TOL)


# ---------------------------------------------------------------------------------------------
# MoBA


def test_moba_cuda_tiles_are_the_production_ones(cuda_tiles):
    for backward in (False, True):
        cfg = moba_interface._config(128, 512, backward, torch.float32)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (64, 64)  # 8 tiles per 512-token block


@pytest.mark.parametrize(
    "preset,D,block_size,top_k,lengths",
    [
        ("cpu_preset", 64, 64, 3, [100, 156]),
        ("340m", 64, 512, 3, [2048]),
        ("1.3b", 128, 512, 3, [300, 1748]),
    ],
)
def test_moba(preset, D, block_size, top_k, lengths, device, cuda_tiles):
    """Hq = 2, Hkv = 1; out, lse, dq, dk, dv against the dense fp32 reference."""
    T = sum(lengths)
    cu = _cu(lengths, device) if len(lengths) > 1 else None
    g = torch.Generator(device=device).manual_seed(D + T)
    q = _randn(g, 1, T, 2, D, device=device).requires_grad_()
    k = _randn(g, 1, T, 1, D, device=device).requires_grad_()
    v = _randn(g, 1, T, 1, D, device=device).requires_grad_()
    out, lse = moba_attn_func(q, k, v, block_size, top_k, cu_seqlens=cu, kernels="triton", return_lse=True)
    ref_out, ref_lse = moba_attn_naive(q, k, v, block_size, top_k, cu_seqlens=cu)
    dout, dlse = _randn(g, *out.shape, device=device), _randn(g, *lse.shape, device=device)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), (q, k, v))
    _check(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (ref_out, ref_lse, *ref_grads), TOL)
