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

    assert flash_kernels(False, torch.device("cpu")) == (cpu_flash_attn_fwd, cpu_flash_attn_bwd)
    assert flash_kernels(False, torch.device("meta")) is None


def test_document_cut_blocks_split_into_fused_pieces():
    """Zigzag blocks cut by documents (odd offsets, a document across both chunks of a rank) become
    causal / rectangle pieces; the fused pieces give the dense masked block's output, lse and grads."""
    from lctrain.kernels.softmax_attn import attention_mask
    from lctrain.parallel.context.ring import _flash_block_bwd, _flash_block_fwd, block_plan, document_pieces
    from lctrain.parallel.context.zigzag import doc_ids, zigzag_indices

    T, P = 48, 2
    cu = torch.tensor([0, 5, 13, 29, 31, 48], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    flash = (cpu_flash_attn_fwd, cpu_flash_attn_bwd)
    for qr in range(P):
        for kr in range(P):
            qi, ki = zigzag_indices(T, P, qr), zigzag_indices(T, P, kr)
            qd, kd = doc_ids(cu, qi), doc_ids(cu, ki)
            mask = attention_mask(qi, ki, qd, kd, True)
            if block_plan(mask) is None:
                continue
            plan = document_pieces(mask, qi, ki, qd, kd)
            assert plan[0] == "pieces" and plan[1], (qr, kr)
            q = torch.randn(1, T // P, 4, 8, generator=g)
            k, v = torch.randn(1, T // P, 2, 8, generator=g), torch.randn(1, T // P, 2, 8, generator=g)
            o, lse = _flash_block_fwd(flash[0], plan, q, k, v, 0.35)
            o_ref, lse_ref = block_attn_fwd(q, k, v, mask, 0.35)
            seen = torch.isfinite(lse_ref)
            assert torch.equal(torch.isfinite(lse), seen)
            assert rel(o, o_ref) < 1e-5 and rel(lse[seen], lse_ref[seen]) < 1e-6
            dout = torch.randn(o_ref.shape, generator=g)
            lse_fin = torch.where(seen, lse_ref + 0.1, lse_ref)
            delta = (dout * o_ref).sum(-1).transpose(1, 2)
            got = _flash_block_bwd(flash[1], plan, dout, q, k, v, o_ref, lse_fin, 0.35)
            ref = block_attn_bwd(dout, q, k, v, lse_fin, delta, mask, 0.35)
            for a, b in zip(got, ref):
                assert rel(a, b) < 1e-5
