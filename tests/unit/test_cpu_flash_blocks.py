"""Ring-attention block kernels on CPU (fused flash) equal the dense fp32 block path, GQA included."""

from __future__ import annotations

import pytest
import torch

from lctrain.kernels.softmax_attn.block import block_attn_bwd, block_attn_fwd
from lctrain.kernels.softmax_attn.cpu_flash import cpu_flash_attn_bwd, cpu_flash_attn_fwd


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("causal, Tq, Tk, hq, hkv", [(True, 24, 24, 4, 2), (False, 16, 40, 4, 1), (True, 9, 9, 2, 2)])
def test_cpu_flash_block_equals_dense_block(causal, Tq, Tk, hq, hkv):
    g = torch.Generator().manual_seed(Tq + Tk)
    q = torch.randn(2, Tq, hq, 8, generator=g)
    k, v = torch.randn(2, Tk, hkv, 8, generator=g), torch.randn(2, Tk, hkv, 8, generator=g)
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril() if causal else None
    o, lse = cpu_flash_attn_fwd(q, k, v, 0.3, causal)
    o_ref, lse_ref = block_attn_fwd(q, k, v, mask, 0.3)
    assert rel(o, o_ref) < 1e-5 and rel(lse, lse_ref) < 1e-6
    # the gradient share of this block given a *different* final out / lse (as after a ring merge)
    out_final = o_ref + 0.1 * torch.randn(o_ref.shape, generator=g)
    lse_final = lse_ref + 0.2
    dout = torch.randn(o_ref.shape, generator=g)
    delta = (dout * out_final).sum(-1).transpose(1, 2)
    got = cpu_flash_attn_bwd(dout, q, k, v, out_final, lse_final, 0.3, causal)
    ref = block_attn_bwd(dout, q, k, v, lse_final, delta, mask, 0.3)
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-5


def test_ring_uses_the_fused_cpu_blocks():
    from lctrain.parallel.context.ring import flash_kernels

    kern = flash_kernels(False, torch.device("cpu"))
    assert (kern.fwd, kern.bwd, kern.varlen) == (cpu_flash_attn_fwd, cpu_flash_attn_bwd, False)
    assert flash_kernels(False, torch.device("meta")) is None


def _zigzag_runs(T, P, r):
    c = T // (2 * P)
    return [(0, r * c, c), (c, (2 * P - 1 - r) * c, c)]


CASES = [  # (T, P, global boundaries): odd offsets, a document across both chunks of a rank, empty documents
    (48, 2, [0, 5, 13, 29, 31, 48]),
    (48, 2, [0, 48]),
    (48, 3, [0, 3, 3, 20, 21, 22, 47, 48]),
    (40, 2, None),
]


@pytest.mark.parametrize("T, P, bounds", CASES)
def test_host_pieces_cover_exactly_the_mask(T, P, bounds):
    """The host planner's pieces mark every visible (query, key) pair once and nothing else."""
    from lctrain.kernels.softmax_attn import attention_mask
    from lctrain.parallel.context.ring import block_pieces
    from lctrain.parallel.context.zigzag import doc_ids, zigzag_indices

    cu = None if bounds is None else torch.tensor(bounds, dtype=torch.int32)
    for causal in (True, False):
        for qr in range(P):
            for kr in range(P):
                qi, ki = zigzag_indices(T, P, qr), zigzag_indices(T, P, kr)
                want = attention_mask(qi, ki, doc_ids(cu, qi), doc_ids(cu, ki), causal)
                cover = torch.zeros(want.shape, dtype=torch.int64)
                for pc in block_pieces(_zigzag_runs(T, P, qr), _zigzag_runs(T, P, kr), bounds, causal):
                    if pc.segments is None:
                        cover[pc.q0:pc.q1, pc.k0:pc.k1] += 1
                    else:
                        a = 0
                        for n in pc.segments:
                            cover[pc.q0 + a:pc.q0 + a + n, pc.k0 + a:pc.k0 + a + n] += torch.ones(n, n, dtype=torch.int64).tril()
                            a += n
                assert torch.equal(cover, want.long()), (qr, kr, causal)


def test_causal_pieces_of_several_documents_are_one_piece():
    """The documents of one chunk against itself are one causal piece with segments (one varlen call)."""
    from lctrain.parallel.context.ring import block_pieces

    runs = _zigzag_runs(48, 2, 0)  # chunks 0 ([0, 12)) and 3 ([36, 48))
    pieces = block_pieces(runs, runs, [0, 5, 9, 40, 48], True)
    causal = [pc for pc in pieces if pc.segments is not None]
    assert [(pc.q0, pc.q1, pc.segments) for pc in causal] == [(0, 12, (5, 4, 3)), (12, 24, (4, 8))]
    # chunk 3 over chunk 0: only document [9, 40) spans both: one rectangle
    assert [(pc.q0, pc.q1, pc.k0, pc.k1) for pc in pieces if pc.segments is None] == [(12, 16, 9, 12)]


def _kernels():
    from lctrain.kernels.dispatch import triton_interpreting
    from lctrain.parallel.context.ring import flash_kernels

    out = [("cpu_flash", flash_kernels(False, torch.device("cpu"))), ("dense", None)]
    if triton_interpreting():
        out.append(("triton_flash", flash_kernels(True, torch.device("cpu"))))
    return out


@pytest.mark.parametrize("T, P, bounds", CASES[:3])
def test_pieces_give_the_dense_masked_block(T, P, bounds):
    """Every kernel kind (CPU flash with a loop over a piece's documents, Triton flash varlen under
    the interpreter, the per-piece dense reference) gives the dense masked block's output, lse and
    gradient share."""
    from lctrain.kernels.softmax_attn import attention_mask
    from lctrain.parallel.context.ring import _block_bwd, _block_fwd, block_pieces
    from lctrain.parallel.context.zigzag import doc_ids, zigzag_indices

    cu = torch.tensor(bounds, dtype=torch.int32)
    g = torch.Generator().manual_seed(T + P)
    for qr in range(P):
        for kr in range(P):
            qi, ki = zigzag_indices(T, P, qr), zigzag_indices(T, P, kr)
            mask = attention_mask(qi, ki, doc_ids(cu, qi), doc_ids(cu, ki), True)
            pieces = block_pieces(_zigzag_runs(T, P, qr), _zigzag_runs(T, P, kr), bounds, True)
            assert bool(mask.any()) == bool(pieces)
            if not pieces:
                continue
            q = torch.randn(1, T // P, 4, 16, generator=g)
            k, v = torch.randn(1, T // P, 2, 16, generator=g), torch.randn(1, T // P, 2, 16, generator=g)
            o_ref, lse_ref = block_attn_fwd(q, k, v, mask, 0.35)
            seen = torch.isfinite(lse_ref)
            dout = torch.randn(o_ref.shape, generator=g)
            lse_fin = torch.where(seen, lse_ref + 0.1, lse_ref)
            delta = (dout * o_ref).sum(-1).transpose(1, 2)
            ref = block_attn_bwd(dout, q, k, v, lse_fin, delta, mask, 0.35)
            for name, kern in _kernels():
                o, lse = _block_fwd(kern, pieces, q, k, v, 0.35)
                assert torch.equal(torch.isfinite(lse), seen), name
                assert rel(o, o_ref) < 1e-5 and rel(lse[seen], lse_ref[seen]) < 1e-6, name
                got = _block_bwd(kern, pieces, dout, q, k, v, o_ref, lse_fin, delta, 0.35)
                for a, b in zip(got, ref):
                    assert rel(a, b) < 1e-5, name
