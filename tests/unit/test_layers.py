"""Layers against independent references: outputs and every gradient (relative RMS error).

Tolerances: fp32 everywhere; ``REL_TOL = 1e-5`` where the reference does the same arithmetic in a
different order, ``1e-4`` where it differs more (explicit softmax vs SDPA, recurrence vs kernel).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lctrain.kernels.gated_delta_rule import naive_recurrent_gated_delta_rule
from lctrain.layers import (
    Attention,
    GatedDeltaNet,
    GatedRMSNorm,
    RMSNorm,
    RotaryEmbedding,
    ShortConvolution,
    SwiGLU,
    default_ffn_hidden_size,
    position_ids_from_cu_seqlens,
    softmax_attention,
)

REL_TOL = 1e-5
REL_TOL_LOOSE = 1e-4


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_rms / ||b||_rms (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
    assert b.abs().max() > 0, f"{what}: reference is all zeros, the comparison would be vacuous"
    err = rel_rms(a, b)
    assert err < tol, f"{what}: relative RMS error {err:.2e} >= {tol:.0e}"


def grads_of(module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    out["input"] = x.grad.clone()
    return out


def packed_cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


# ----------------------------------------------------------------------------------------- norms


def test_rmsnorm_and_gated_rmsnorm_match_torch_rms_norm():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 16, requires_grad=True)
    gate = torch.randn(2, 5, 3, 16, requires_grad=True)
    norm, gnorm = RMSNorm(16, eps=1e-5), GatedRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        gnorm.weight.uniform_(0.5, 1.5)
    dy = torch.randn(2, 5, 3, 16)

    for module, args, ref_fn in [
        (norm, (x,), lambda w: F.rms_norm(x, (16,), w, 1e-5)),
        (gnorm, (x, gate), lambda w: F.rms_norm(x, (16,), w, 1e-5) * F.silu(gate)),
    ]:
        x.grad = gate.grad = None
        module.zero_grad()
        (module(*args) * dy).sum().backward()
        got = [module.weight.grad.clone()] + [t.grad.clone() for t in args]
        x.grad = gate.grad = None
        w = module.weight.detach().clone().requires_grad_(True)
        y_ref = ref_fn(w)
        assert_close(module(*args), y_ref, REL_TOL, f"{type(module).__name__} output")
        (y_ref * dy).sum().backward()
        want = [w.grad] + [t.grad for t in args]
        for name, g, r in zip(["weight", "x", "gate"], got, want):
            assert_close(g, r, REL_TOL, f"{type(module).__name__} grad {name}")


# ------------------------------------------------------------------------------------------ RoPE


def rope_complex(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Independent RoPE: pair (x[i], x[i + Dh/2]) as a complex number times exp(i pos theta^(-2i/Dh))."""
    Dh = x.shape[-1]
    freqs = theta ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    rot = torch.polar(torch.ones_like(freqs), pos.double()[..., None] * freqs)  # [B, T, Dh/2]
    z = torch.complex(x[..., : Dh // 2].double(), x[..., Dh // 2 :].double()) * rot[:, :, None, :]
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def test_rope_matches_complex_formula_and_preserves_norms():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, theta=500.0)
    q, k = torch.randn(2, 9, 3, 16), torch.randn(2, 9, 1, 16)
    pos = torch.stack([torch.arange(9) + 40, torch.randperm(9)])
    q2, k2 = rope(q, k, pos)
    assert_close(q2, rope_complex(q, pos, 500.0), REL_TOL, "rope q vs complex formula")
    assert_close(k2, rope_complex(k, pos, 500.0), REL_TOL, "rope k vs complex formula")
    torch.testing.assert_close(q2.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # the rotation is not the identity away from position 0
    assert rel_rms(q2, q) > 0.1


def test_rope_dot_product_depends_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(32, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(m: int, n: int) -> float:
        qm, _ = rope(q, q, torch.tensor([[m]]))
        kn, _ = rope(k, k, torch.tensor([[n]]))
        return float((qm * kn).sum())

    base = score(5, 2)
    for m, n in [(3, 0), (105, 102), (1003, 1000)]:
        assert abs(score(m, n) - base) < 1e-4 * (1 + abs(base)), (m, n)
    assert abs(score(7, 2) - base) > 1e-3  # a different offset gives a different score


def test_rope_rejects_odd_head_dim_and_bad_positions():
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(15)
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match="position_ids"):
        rope(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.arange(5)[None])


def test_position_ids_from_cu_seqlens():
    cu = torch.tensor([0, 3, 3, 8, 10], dtype=torch.int32)  # includes an empty document
    pos = position_ids_from_cu_seqlens(cu, 10)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    with pytest.raises(ValueError, match="must equal the packed length"):
        position_ids_from_cu_seqlens(cu, 11)
    with pytest.raises(ValueError, match="start at 0"):
        position_ids_from_cu_seqlens(torch.tensor([1, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        position_ids_from_cu_seqlens(torch.tensor([0, 5, 4], dtype=torch.int32))


# ------------------------------------------------------------------------------ short convolution


def conv_reference(x: torch.Tensor, weight: torch.Tensor, silu: bool) -> torch.Tensor:
    """F.conv1d on one document [1, T, C] with K-1 zeros of left padding."""
    T, C, K = x.shape[1], x.shape[2], weight.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None, :], padding=K - 1, groups=C)[..., :T].transpose(1, 2)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("silu", [True, False])
def test_short_conv_packed_equals_conv1d_per_document(silu):
    torch.manual_seed(0)
    lengths = [5, 2, 9, 1]  # shorter and longer than the kernel
    cu = packed_cu(lengths)
    conv = ShortConvolution(6, kernel_size=4, activation="silu" if silu else None)
    x = torch.randn(1, sum(lengths), 6, requires_grad=True)
    dy = torch.randn(1, sum(lengths), 6)
    y = conv(x, position_ids_from_cu_seqlens(cu))
    (y * dy).sum().backward()

    w = conv.weight.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    bounds = cu.tolist()
    y_ref = torch.cat([conv_reference(xr[:, s:e], w, silu) for s, e in itertools.pairwise(bounds)], 1)
    (y_ref * dy).sum().backward()
    assert_close(y, y_ref, REL_TOL, "conv output")
    assert_close(x.grad, xr.grad, REL_TOL, "conv grad x")
    assert_close(conv.weight.grad, w.grad, REL_TOL, "conv grad weight")


def test_short_conv_never_leaks_across_documents():
    torch.manual_seed(0)
    cu = packed_cu([7, 6])
    pos = position_ids_from_cu_seqlens(cu)
    conv = ShortConvolution(4, kernel_size=4)
    x = torch.randn(1, 13, 4)
    x_perturbed = x.clone()
    x_perturbed[:, :7] += torch.randn(1, 7, 4)  # change document 1 only
    y, y_p = conv(x, pos), conv(x_perturbed, pos)
    assert torch.equal(y[:, 7:], y_p[:, 7:]), "document 2 output changed when document 1 changed"
    assert not torch.allclose(y[:, :7], y_p[:, :7])
    # without position_ids the same input does mix the documents (the mask is what separates them)
    assert not torch.allclose(conv(x)[:, 7:], conv(x_perturbed)[:, 7:])


def test_short_conv_cache_continues_a_split_sequence():
    torch.manual_seed(0)
    conv = ShortConvolution(5, kernel_size=4)
    x = torch.randn(2, 12, 5)
    pos = torch.arange(12).expand(2, 12)
    full = conv(x, pos)
    tail = conv(x[:, 8:], pos[:, 8:], cache=x[:, 5:8])
    assert_close(tail, full[:, 8:], REL_TOL, "conv with cache vs unsplit")


# ------------------------------------------------------------------------------------- attention


def attention_reference(layer: Attention, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Explicit fp32 softmax(QK^T/sqrt(d) + causal mask) V with repeat_interleave GQA and complex RoPE."""
    B, T, _ = x.shape
    H, Hkv, Dh = layer.num_heads, layer.num_kv_heads, layer.head_dim
    theta = layer.rope.theta
    q = rope_complex((x @ layer.q_proj.weight.T).view(B, T, H, Dh), pos, theta)
    k = rope_complex((x @ layer.k_proj.weight.T).view(B, T, Hkv, Dh), pos, theta)
    v = (x @ layer.v_proj.weight.T).view(B, T, Hkv, Dh)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(Dh)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    o = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    if layer.g_proj is not None:
        o = o * torch.sigmoid(x @ layer.g_proj.weight.T).view(B, T, H, Dh)
    return o.reshape(B, T, H * Dh) @ layer.o_proj.weight.T


def run_with_grads(fn, module, x, dy):
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * dy).sum().backward()
    return y.detach(), grads_of(module, x)


@pytest.mark.parametrize("num_kv_heads,gate", [(1, True), (2, True), (4, True), (2, False)])
def test_attention_matches_explicit_reference(num_kv_heads, gate):
    torch.manual_seed(0)
    layer = Attention(
        32, num_heads=4, num_kv_heads=num_kv_heads, head_dim=8, rope_theta=1000.0, output_gate=gate
    )
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)  # large enough that softmax is far from uniform
    x = torch.randn(2, 21, 32)
    pos = torch.stack([torch.arange(21), torch.arange(21) + 13])  # explicit, offset positions
    dy = torch.randn(2, 21, 32)
    y, g = run_with_grads(lambda t: layer(t, pos), layer, x, dy)
    y_ref, g_ref = run_with_grads(lambda t: attention_reference(layer, t, pos), layer, x, dy)
    assert_close(y, y_ref, REL_TOL_LOOSE, "attention output")
    assert set(g) == set(g_ref)
    for name in g_ref:
        assert_close(g[name], g_ref[name], REL_TOL_LOOSE, f"attention grad {name}")


def per_document(module, x: torch.Tensor, lengths: list[int], dy: torch.Tensor):
    """Run each document of a packed [1, T, D] input alone; return concatenated output and summed grads."""
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    bounds = packed_cu(lengths).tolist()
    outs = []
    for s, e in itertools.pairwise(bounds):
        y = module(x[:, s:e], torch.arange(e - s)[None], None)
        (y * dy[:, s:e]).sum().backward()
        outs.append(y.detach())
    return torch.cat(outs, 1), grads_of(module, x)


def packed(module, x: torch.Tensor, lengths: list[int], dy: torch.Tensor):
    cu = packed_cu(lengths)
    return run_with_grads(lambda t: module(t, None, cu), module, x, dy)


def test_attention_packed_equals_per_document():
    torch.manual_seed(0)
    lengths = [7, 13, 11]
    layer = Attention(32, num_heads=4, num_kv_heads=2, head_dim=8, output_gate=True)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, dy = torch.randn(1, sum(lengths), 32), torch.randn(1, sum(lengths), 32)
    y, g = packed(layer, x, lengths, dy)
    y_ref, g_ref = per_document(layer, x, lengths, dy)
    assert_close(y, y_ref, REL_TOL, "packed attention output")
    for name in g_ref:
        assert_close(g[name], g_ref[name], REL_TOL, f"packed attention grad {name}")
    # the same tokens as one document give different outputs: packing is what separates them
    assert rel_rms(layer(x, None, None).detach(), y_ref) > 1e-2


def test_softmax_attention_errors():
    q = torch.randn(2, 4, 3, 8)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        softmax_attention(q, torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8))
    with pytest.raises(ValueError, match="batch size 1"):
        softmax_attention(q, q, q, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="must divide"):
        Attention(32, num_heads=4, num_kv_heads=3, head_dim=8)
    with pytest.raises(ValueError, match="allowed values"):
        Attention(32, 4, 2, 8, kernels="cuda")
    assert Attention(32, 4, 2, 8, kernels="triton").kernels == "triton"  # wired to the flash kernel


# --------------------------------------------------------------------------------- Gated DeltaNet


def gdn_reference(layer: GatedDeltaNet, x: torch.Tensor) -> torch.Tensor:
    """Gated DeltaNet from the same weights: F.conv1d convs, explicit gates, naive recurrence."""
    B, T, _ = x.shape
    H, K, V = layer.num_heads, layer.head_dim, layer.head_v_dim

    def conv(h, module):
        return torch.cat([conv_reference(h[b : b + 1], module.weight, silu=True) for b in range(B)], 0)

    def l2(t):
        return t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6)

    q = l2(conv(x @ layer.q_proj.weight.T, layer.q_conv).view(B, T, H, K))
    k = l2(conv(x @ layer.k_proj.weight.T, layer.k_conv).view(B, T, H, K))
    v = conv(x @ layer.v_proj.weight.T, layer.v_conv).view(B, T, H, V)
    beta = torch.sigmoid(x @ layer.b_proj.weight.T)
    g = -torch.exp(layer.A_log) * F.softplus(x @ layer.a_proj.weight.T + layer.dt_bias)
    o, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=K**-0.5)
    gate = (x @ layer.g_proj.weight.T).view(B, T, H, V)
    o = F.rms_norm(o, (V,), layer.o_norm.weight, layer.o_norm.eps) * F.silu(gate)
    return o.reshape(B, T, H * V) @ layer.o_proj.weight.T


def make_gdn(expand_v: float = 1.0) -> GatedDeltaNet:
    layer = GatedDeltaNet(32, num_heads=2, head_dim=8, expand_v=expand_v, conv_size=4)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("proj.weight"):
                torch.nn.init.normal_(p, std=0.3)
            elif name == "o_norm.weight":
                p.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("expand_v", [1.0, 2.0])
def test_gated_deltanet_matches_reference(expand_v):
    torch.manual_seed(0)
    layer = make_gdn(expand_v)
    x, dy = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    y, g = run_with_grads(lambda t: layer(t, None, None), layer, x, dy)
    y_ref, g_ref = run_with_grads(lambda t: gdn_reference(layer, t), layer, x, dy)
    assert_close(y, y_ref, REL_TOL_LOOSE, "GDN output")
    assert set(g) == set(g_ref) and "A_log" in g and "dt_bias" in g
    for name in g_ref:
        assert_close(g[name], g_ref[name], REL_TOL_LOOSE, f"GDN grad {name}")


def test_gated_deltanet_packed_equals_per_document():
    torch.manual_seed(0)
    lengths = [9, 17, 13]
    layer = make_gdn()
    x, dy = torch.randn(1, sum(lengths), 32), torch.randn(1, sum(lengths), 32)
    y, g = packed(layer, x, lengths, dy)
    y_ref, g_ref = per_document(layer, x, lengths, dy)
    assert_close(y, y_ref, REL_TOL, "packed GDN output")
    for name in g_ref:
        assert_close(g[name], g_ref[name], REL_TOL, f"packed GDN grad {name}")
    assert rel_rms(layer(x, None, None).detach(), y_ref) > 1e-2


def test_gated_deltanet_decay_init_ranges_and_errors():
    torch.manual_seed(0)
    layer = GatedDeltaNet(32, num_heads=64, head_dim=4)
    a = layer.A_log.exp()
    dt = F.softplus(layer.dt_bias)
    assert a.min() >= 1.0 and a.max() <= 16.0 and a.std() > 1.0
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    # log-uniform: about half of the samples below the geometric mean 1e-2
    assert 0.25 < (dt < 1e-2).float().mean() < 0.75
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay
    with pytest.raises(ValueError, match="integer"):
        GatedDeltaNet(32, 2, 8, expand_v=0.3)
    assert GatedDeltaNet(32, 2, 8, kernels="triton").kernels == "triton"  # wired to the Triton GDN kernel


# ------------------------------------------------------------------------------------------- FFN


def test_swiglu_and_hidden_size():
    assert default_ffn_hidden_size(64) == 192  # 8/3 * 64 = 170.7 -> 192
    assert default_ffn_hidden_size(256) == 704  # 682.7 -> 704
    assert default_ffn_hidden_size(64, 100) == 100
    torch.manual_seed(0)
    ffn = SwiGLU(16, 40)
    x = torch.randn(3, 16)
    ref = (F.silu(x @ ffn.gate_proj.weight.T) * (x @ ffn.up_proj.weight.T)) @ ffn.down_proj.weight.T
    assert_close(ffn(x), ref, REL_TOL, "SwiGLU output")
