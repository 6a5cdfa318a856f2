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
