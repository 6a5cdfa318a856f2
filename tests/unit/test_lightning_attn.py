"""Chunked Lightning Attention against the token-by-token fp32 reference.

Checks the output, the final state and the gradients of q, k, v, slope and initial_state with the
relative RMS error ``rms(a - b) / rms(b)``; TOL = 1e-5 (fp32 chunked vs fp32 naive; measured
worst case ~2e-7), except d(slope), TOL_SLOPE = 5e-5: with strong decay (slope 12) that head's
gradient is ~1e-5 of the other's and is a sum of fp32 terms with cancellation in both paths
(measured up to 4e-6).
"""

from __future__ import annotations

import pytest
import torch

from lctrain.kernels.lightning_attn import chunk_lightning_attn, naive_recurrent_lightning_attn

TOL = 1e-5
TOL_SLOPE = 5e-5
SLOPES = {"zero": [0.0, 0.0], "normal": [0.01, 0.3], "strong": [4.0, 12.0]}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make(B, T, H, K, V, decay, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen) / K**0.5
    v = torch.randn(B, T, H, V, generator=gen)
    slope = torch.tensor((SLOPES[decay] * H)[:H])
    return [x.requires_grad_() for x in (q, k, v, slope)]


def outputs_and_grads(fn, inputs, h0, seed=1, **kw):
    leaves = list(inputs) + ([h0] if h0 is not None else [])
    o, s = fn(*inputs, initial_state=h0, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (s * torch.randn(s.shape, generator=gen)).sum()
    return [o, s, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("T", [63, 100, 257])
@pytest.mark.parametrize("decay", ["zero", "normal", "strong"])
def test_chunk_matches_naive(T, decay):
    inputs = make(2, T, 2, 32, 16, decay)
    h0 = torch.randn(2, 2, 32, 16, generator=torch.Generator().manual_seed(T)).requires_grad_()
    ref = outputs_and_grads(naive_recurrent_lightning_attn, inputs, h0)
    got = outputs_and_grads(chunk_lightning_attn, inputs, h0, chunk_size=32)
    names = ["o", "final_state", "dq", "dk", "dv", "dslope", "dh0"]
    for name, a, b in zip(names, got, ref):
        assert rel_rms(a, b) < (TOL_SLOPE if name == "dslope" else TOL), f"{name} T={T} {decay}: rel rms {rel_rms(a, b):.2e}"


def test_varlen_equals_per_document_runs():
    T, H, K, V = 150, 2, 16, 16
    q, k, v, slope = make(1, T, H, K, V, "normal")
    cu = torch.tensor([0, 40, 41, 107, 150], dtype=torch.int32)
    h0 = torch.randn(4, H, K, V, generator=torch.Generator().manual_seed(2))
    o, s = chunk_lightning_attn(q, k, v, slope, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=16)
    for n in range(4):
        a, b = int(cu[n]), int(cu[n + 1])
        o_ref, s_ref = naive_recurrent_lightning_attn(
            q[:, a:b], k[:, a:b], v[:, a:b], slope, initial_state=h0[n : n + 1], output_final_state=True
        )
        assert rel_rms(o[:, a:b], o_ref) < TOL, f"document {n}"
        assert rel_rms(s[n : n + 1], s_ref) < TOL, f"final state {n}"


def test_state_carries_across_calls():
    """Running two halves with the first half's final state equals one run (what CP relies on)."""
    q, k, v, slope = make(1, 130, 2, 16, 16, "normal")
    o, s = chunk_lightning_attn(q, k, v, slope, output_final_state=True)
    o1, s1 = chunk_lightning_attn(q[:, :70], k[:, :70], v[:, :70], slope, output_final_state=True)
    o2, s2 = chunk_lightning_attn(q[:, 70:], k[:, 70:], v[:, 70:], slope, initial_state=s1, output_final_state=True)
    assert rel_rms(torch.cat([o1, o2], 1), o) < TOL
    assert rel_rms(s2, s) < TOL


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(slope=torch.zeros(3)), "slope must be"),
        (dict(cu_seqlens=torch.tensor([0, 5, 40])), "packed length T=32"),
        (dict(initial_state=torch.zeros(1, 2, 8, 8)), "initial_state"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_input_errors(kwargs, match):
    q, k, v = torch.randn(1, 32, 2, 8), torch.randn(1, 32, 2, 8), torch.randn(1, 32, 2, 4)
    args = dict(slope=torch.zeros(2))
    args.update(kwargs)
    slope = args.pop("slope")
    with pytest.raises(ValueError, match=match):
        chunk_lightning_attn(q, k, v, slope, **args)


def test_layer_varlen_and_slopes():
    """The layer never mixes documents, and its slopes follow ALiBi times the layer factor."""
    from lctrain.layers.lightning import LightningAttention, alibi_slopes

    torch.manual_seed(0)
    layer = LightningAttention(32, num_heads=4, head_dim=8, layer_idx=1, n_layers=3, chunk_size=16)
    assert torch.allclose(layer.slope, torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]) * (0.5 + 1e-5))
    assert len(alibi_slopes(6)) == 6 and alibi_slopes(6)[:4] == alibi_slopes(4)
    x = torch.randn(1, 50, 32, requires_grad=True)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    y = layer(x, None, cu)
    parts = [layer(x[:, a:b], None, None) for a, b in ((0, 20), (20, 50))]
    assert rel_rms(y, torch.cat(parts, 1)) < TOL
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_hybrid_model_with_lightning_layers_trains_a_step():
    from lctrain.config import load_config
    from lctrain.models import HybridLM

    cfg = load_config(["recipe=hybrid_lightning_3to1", "model.d_model=64", "model.attn.num_heads=2",
                       "model.attn.num_kv_heads=1", "model.attn.head_dim=32", "model.lightning.num_heads=2",
                       "model.lightning.head_dim=32", "model.vocab_size=128"]).model
    model = HybridLM(cfg)
    assert model.layer_types == "LLLA"
    ids = torch.randint(0, 128, (2, 40))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
