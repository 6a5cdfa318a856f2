"""Chunked gated delta rule (WY form) against the token-by-token fp32 reference.

Every comparison checks the output, the final state and the gradients of q, k, v, g, beta and
initial_state with the relative RMS error ``rms(a - b) / rms(b)``.

Tolerances (measured worst case on this CPU is ~1e-6 for fp32, all decay regimes):
    TOL_FP32 = 1e-5   fp32 chunked vs fp32 naive
    TOL_BF16 = 2e-2   bf16 inputs (the output is rounded to bf16)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lctrain.kernels.gated_delta_rule as gdr_pkg
from lctrain.kernels.gated_delta_rule import chunk as chunk_mod
from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule, naive_recurrent_gated_delta_rule

TOL_FP32 = 1e-5
TOL_BF16 = 2e-2


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make_inputs(B, T, H, K, V, decay="normal", seed=0, dtype=torch.float32):
    """q, k (L2-normalised), v, g, beta as fp32 leaves; decay in {"zero", "normal", "strong"}."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    if decay == "zero":
        g = torch.zeros(B, T, H)
    elif decay == "normal":
        g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2.0)
    elif decay == "strong":
        g = -(5.0 + 15.0 * torch.rand(B, T, H, generator=gen))  # g in [-20, -5]
    else:
        raise AssertionError(decay)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    return [x.to(dtype).requires_grad_() for x in (q, k, v, g, beta)]


def run_with_grads(fn, inputs, h0, weights, **kwargs):
    """Run fn, backprop a fixed random projection of (o, final_state); return outputs + grads."""
    leaves = list(inputs) + ([h0] if h0 is not None else [])
    o, s = fn(*inputs, initial_state=h0, **kwargs)
    loss = (o.double() * weights[0]).sum()
    if s is not None:
        loss = loss + (s.double() * weights[1]).sum()
    grads = torch.autograd.grad(loss, leaves)
    return o, s, grads


def assert_close(name, a, b, tol):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = rel_rms(a, b)
    assert err < tol, f"{name}: relative RMS error {err:.2e} >= {tol:.0e}"


def compare_to_naive(
    B, T, H, K, V, decay, with_h0, chunk_size=64, output_final_state=True, scale=None, seed=0
):
    inputs = make_inputs(B, T, H, K, V, decay, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    h0 = torch.randn(B, H, K, V, generator=gen).requires_grad_() if with_h0 else None
    weights = (
        torch.randn(B, T, H, V, generator=gen).double(),
        torch.randn(B, H, K, V, generator=gen).double(),
    )
    kw = {"output_final_state": output_final_state, "scale": scale}
    o, s, grads = run_with_grads(chunk_gated_delta_rule, inputs, h0, weights, chunk_size=chunk_size, **kw)
    o_ref, s_ref, grads_ref = run_with_grads(naive_recurrent_gated_delta_rule, inputs, h0, weights, **kw)
    assert o.dtype == torch.float32
    assert_close("o", o, o_ref, TOL_FP32)
    if output_final_state:
        assert s.dtype == torch.float32
        assert_close("final_state", s, s_ref, TOL_FP32)
    else:
        assert s is None and s_ref is None
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, grads_ref):
        assert_close(name, a, b, TOL_FP32)


@pytest.mark.parametrize(
    "B,T,H,K,V,decay,with_h0,chunk_size,output_final_state,scale",
    [
        (2, 63, 2, 32, 32, "normal", False, 64, True, None),
        (2, 100, 3, 32, 64, "normal", True, 64, True, None),
        (2, 300, 2, 32, 32, "strong", True, 64, True, None),
        (2, 100, 2, 32, 64, "zero", True, 64, True, 0.3),
        (2, 63, 2, 32, 32, "normal", True, 16, False, None),
    ],
    ids=["T63", "T100-V64-h0", "T300-strong-h0", "T100-zero-decay-scale", "T63-C16-no-final"],
)
def test_matches_naive(B, T, H, K, V, decay, with_h0, chunk_size, output_final_state, scale):
    compare_to_naive(B, T, H, K, V, decay, with_h0, chunk_size, output_final_state, scale)


def test_extreme_decay_is_finite_and_exact():
    # g = -20 over a whole 64-token chunk gives gamma_i - gamma_j = +1260 above the diagonal;
    # exponentiating before masking would give inf in forward and NaN in backward.
    B, T, H, K, V = 1, 128, 2, 16, 16
    q, k, v, g, beta = make_inputs(B, T, H, K, V, "normal", seed=3)
    g_data = torch.full((B, T, H), -20.0)
    g_data[:, ::5] = 0.0  # mix no-decay and strong-decay tokens inside each chunk
    g = g_data.requires_grad_()
    h0 = torch.randn(B, H, K, V).requires_grad_()
    weights = (torch.randn(B, T, H, V).double(), torch.randn(B, H, K, V).double())
    out = run_with_grads(chunk_gated_delta_rule, [q, k, v, g, beta], h0, weights, output_final_state=True)
    ref = run_with_grads(
        naive_recurrent_gated_delta_rule, [q, k, v, g, beta], h0, weights, output_final_state=True
    )
    for name, a, b in zip(["o", "final_state"], out[:2], ref[:2]):
        assert_close(name, a, b, TOL_FP32)
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], out[2], ref[2]):
        assert_close(name, a, b, TOL_FP32)


def test_chunk_size_invariance():
    # chunk boundaries must not change the result (C = 1 is the pure recurrence, C > T one chunk)
    inputs = make_inputs(2, 45, 2, 8, 8, "normal", seed=4)
    h0 = torch.randn(2, 2, 8, 8)
    o_ref, s_ref = chunk_gated_delta_rule(*inputs, initial_state=h0, output_final_state=True, chunk_size=64)
    for C in (1, 7, 16, 45, 128):
        o, s = chunk_gated_delta_rule(*inputs, initial_state=h0, output_final_state=True, chunk_size=C)
        assert_close(f"o[C={C}]", o, o_ref, TOL_FP32)
        assert_close(f"final_state[C={C}]", s, s_ref, TOL_FP32)


def test_padding_tokens_leave_state_unchanged():
    # the chunked path pads with q = k = v = 0, g = 0, beta = 0: such tokens must be no-ops
    B, T, P, H, K, V = 2, 50, 30, 2, 16, 16
    q, k, v, g, beta = (x.detach() for x in make_inputs(B, T, H, K, V, "normal", seed=5))
    h0 = torch.randn(B, H, K, V)
    q_p = torch.cat([q, torch.randn(B, P, H, K)], 1)  # arbitrary q/v on padding: still no-ops
    k_p = torch.cat([k, torch.zeros(B, P, H, K)], 1)
    v_p = torch.cat([v, torch.randn(B, P, H, V)], 1)
    g_p = torch.cat([g, torch.zeros(B, P, H)], 1)
    b_p = torch.cat([beta, torch.zeros(B, P, H)], 1)
    for fn in (naive_recurrent_gated_delta_rule, chunk_gated_delta_rule):
        o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        o_p, s_p = fn(q_p, k_p, v_p, g_p, b_p, initial_state=h0, output_final_state=True)
        assert_close(f"{fn.__name__} final_state", s_p, s, 1e-6)
        assert_close(f"{fn.__name__} o", o_p[:, :T], o, 1e-6)


def test_varlen_matches_naive_and_per_sequence():
    lengths = [37, 0, 1, 130, 64, 77]  # odd, empty, single token, multi-chunk, exact chunk
    T, H, K, V = sum(lengths), 2, 32, 64
    N = len(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    inputs = make_inputs(1, T, H, K, V, "normal", seed=6)
    h0 = torch.randn(N, H, K, V).requires_grad_()
    weights = (torch.randn(1, T, H, V).double(), torch.randn(N, H, K, V).double())
    o, s, grads = run_with_grads(
        chunk_gated_delta_rule, inputs, h0, weights, output_final_state=True, cu_seqlens=cu
    )
    o_ref, s_ref, grads_ref = run_with_grads(
        naive_recurrent_gated_delta_rule, inputs, h0, weights, output_final_state=True, cu_seqlens=cu
    )
    assert_close("o", o, o_ref, TOL_FP32)
    assert_close("final_state", s, s_ref, TOL_FP32)
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, grads_ref):
        assert_close(name, a, b, TOL_FP32)

    # each sequence run alone through the chunked path gives the same output and state
    with torch.no_grad():
        for n in range(N):
            start, end = int(cu[n]), int(cu[n + 1])
            if start == end:
                torch.testing.assert_close(s[n], h0[n], rtol=0, atol=0)
                continue
            seg = [x[:, start:end] for x in inputs]
            o_n, s_n = chunk_gated_delta_rule(*seg, initial_state=h0[n : n + 1], output_final_state=True)
            assert_close(f"o[seq {n}]", o[:, start:end], o_n, TOL_FP32)
            assert_close(f"final_state[seq {n}]", s[n : n + 1], s_n, TOL_FP32)


def test_float64_inputs_and_gradcheck():
    # fp64 inputs are computed in fp64 (outputs and final state in fp64)
    inputs32 = make_inputs(1, 70, 2, 16, 24, "normal", seed=7)
    inputs64 = [x.detach().double() for x in inputs32]
    h0 = torch.randn(1, 2, 16, 24)
    o64, s64 = chunk_gated_delta_rule(*inputs64, initial_state=h0.double(), output_final_state=True)
    assert o64.dtype == torch.float64 and s64.dtype == torch.float64
    o_ref, s_ref = naive_recurrent_gated_delta_rule(*inputs32, initial_state=h0, output_final_state=True)
    assert_close("o fp64", o64, o_ref, TOL_FP32)
    assert_close("final_state fp64", s64, s_ref, TOL_FP32)

    # finite differences through the varlen + padding + initial-state path
    gen = torch.Generator().manual_seed(8)
    T, H, K, V = 11, 1, 3, 2
    q = torch.randn(1, T, H, K, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(1, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(1, T, H, V, generator=gen, dtype=torch.float64)
    g = -torch.rand(1, T, H, generator=gen, dtype=torch.float64) * 3
    beta = torch.rand(1, T, H, generator=gen, dtype=torch.float64)
    h = torch.randn(3, H, K, V, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 5, 5, 11], dtype=torch.int32)
    args = [x.requires_grad_() for x in (q, k, v, g, beta, h)]

    def fn(q, k, v, g, beta, h):
        o, s = chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=h, output_final_state=True, cu_seqlens=cu, chunk_size=4
        )
        return o, s

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_bf16_inputs():
    inputs = make_inputs(2, 40, 2, 16, 16, "normal", seed=9)
    bf = [x.detach().bfloat16() for x in inputs]
    o, s = chunk_gated_delta_rule(*bf, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, s_ref = naive_recurrent_gated_delta_rule(*bf, output_final_state=True)
    assert_close("o bf16", o, o_ref, TOL_BF16)
    assert_close("final_state bf16", s, s_ref, TOL_BF16)


def test_package_exports_chunked_function():
    assert gdr_pkg.chunk_gated_delta_rule is chunk_mod.chunk_gated_delta_rule
    assert gdr_pkg.chunk_gated_delta_rule is not gdr_pkg.naive_recurrent_gated_delta_rule


def _base(B=1, T=10, H=2, K=4, V=3):
    return {
        "q": torch.randn(B, T, H, K),
        "k": torch.randn(B, T, H, K),
        "v": torch.randn(B, T, H, V),
        "g": -torch.rand(B, T, H),
        "beta": torch.rand(B, T, H),
    }


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(k=torch.randn(1, 10, 2, 5)), "shape mismatch"),
        (lambda a: a.update(v=torch.randn(1, 9, 2, 3)), "shape mismatch"),
        (lambda a: a.update(g=torch.randn(1, 10, 3)), "shape mismatch"),
        (lambda a: a.update(beta=torch.randn(1, 10)), "shape mismatch"),
        (lambda a: a.update(q=torch.randn(10, 2, 4), k=torch.randn(10, 2, 4)), r"q must be \[B, T, H, K\]"),
        (lambda a: a.update(q=torch.ones(1, 10, 2, 4, dtype=torch.long)), "floating-point"),
        (lambda a: a.update(chunk_size=0), "chunk_size"),
        (lambda a: a.update(initial_state=torch.zeros(2, 2, 4, 3)), r"initial_state must be \[N=1"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)), "packed length T=10"),
        (lambda a: a.update(cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32)), "start at 0"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "non-decreasing"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0.0, 10.0])), "integer"),
        (lambda a: a.update(cu_seqlens=torch.tensor([[0, 10]], dtype=torch.int32)), "1-D"),
        (
            lambda a: a.update(
                cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), initial_state=torch.zeros(1, 2, 4, 3)
            ),
            r"initial_state must be \[N=2",
        ),
    ],
)
def test_invalid_inputs_raise(mutate, match):
    args = _base()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        chunk_gated_delta_rule(**args)


def test_cu_seqlens_requires_batch_one():
    args = _base(B=2)
    with pytest.raises(ValueError, match="batch size 1"):
        chunk_gated_delta_rule(**args, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
