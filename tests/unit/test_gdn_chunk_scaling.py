"""The blocked, hand-differentiated chunked gated delta rule against the fp32 token-by-token reference.

``lctrain.kernels.gated_delta_rule.chunk`` runs its sequential passes block by block (a block is
a run of chunks in the step-major varlen layout, so one chunk step can be split across blocks)
and has a custom backward that recomputes the in-chunk WY terms from the saved chunk states.
These tests force tiny blocks so that many blocks, split steps and the carried state / state
gradient between blocks are exercised at sizes where the naive reference is quick, and check
outputs, final states and the gradients of q, k, v, g, beta and initial_state with the relative
RMS error (tolerance as in ``test_gated_delta_rule.py``). Correctness only, no timing.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lctrain.kernels.gated_delta_rule import chunk as chunk_mod
from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule, naive_recurrent_gated_delta_rule

TOL_FP32 = 1e-5


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(name: str, a: torch.Tensor, b: torch.Tensor, tol: float = TOL_FP32) -> None:
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = rel_rms(a, b)
    assert err < tol, f"{name}: relative RMS error {err:.2e} >= {tol:.0e}"


def inputs(T, H, K, V, seed, HV=None, strong=False):
    """fp32 leaves q, k (L2-normalised) [1, T, H, K], v [1, T, HV, V], g, beta [1, T, HV]."""
    HV = HV or H
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, K, generator=gen)
    k = F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1)
    v = torch.randn(1, T, HV, V, generator=gen)
    if strong:
        g = -(5.0 + 15.0 * torch.rand(1, T, HV, generator=gen))
    else:
        g = F.logsigmoid(torch.randn(1, T, HV, generator=gen) + 2.0)
    beta = torch.sigmoid(torch.randn(1, T, HV, generator=gen))
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def outputs_and_grads(fn, xs, h0, cu, w_o, w_s, use_o=True, **kw):
    """Run fn with final state; backprop sum(w_o * o) (if use_o) + sum(w_s * final_state)."""
    leaves = list(xs) + ([h0] if h0 is not None else [])
    o, s = fn(*xs, initial_state=h0, output_final_state=True, cu_seqlens=cu, **kw)
    loss = (s.double() * w_s).sum()
    if use_o:
        loss = loss + (o.double() * w_o).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return o, s, grads


def compare(lengths, H=2, K=16, V=16, C=16, seed=0, with_h0=True, use_o=True, HV=None, strong=False):
    T = sum(lengths)
    N = len(lengths)
    HV = HV or H
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    xs = inputs(T, H, K, V, seed, HV=HV, strong=strong)
    gen = torch.Generator().manual_seed(seed + 1)
    h0 = torch.randn(N, HV, K, V, generator=gen).requires_grad_() if with_h0 else None
    w_o = torch.randn(1, T, HV, V, generator=gen).double()
    w_s = torch.randn(N, HV, K, V, generator=gen).double()
    o, s, grads = outputs_and_grads(chunk_gated_delta_rule, xs, h0, cu, w_o, w_s, use_o, chunk_size=C)
    o_r, s_r, grads_r = outputs_and_grads(naive_recurrent_gated_delta_rule, xs, h0, cu, w_o, w_s, use_o)
    assert_close("o", o, o_r)
    assert_close("final_state", s, s_r)
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, grads_r):
        if b is None:  # q does not reach the final state: no gradient when o is unused
            assert a is None, f"{name}: expected no gradient"
            continue
        assert_close(name, a, b)


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of ``n`` chunks for the tests' H, C, K, V (set with the returned function)."""

    def set_chunks(n: int, H: int = 2, C: int = 16, D: int = 16) -> None:
        monkeypatch.setattr(chunk_mod, "_BLOCK_ELEMS_CPU", n * H * C * max(C, D))
        assert chunk_mod._block_chunks(H, C, D, D, torch.device("cpu")) == n

    return set_chunks


@pytest.mark.parametrize("block", [1, 3, 1000])
def test_many_chunks_one_sequence(tiny_blocks, block):
    # 30 chunks of 16: one block per chunk, blocks that end mid-run, one block for everything
    tiny_blocks(block)
    compare([480], seed=1)


@pytest.mark.parametrize("block", [2, 5])
def test_varlen_many_documents_steps_split_across_blocks(tiny_blocks, block):
    # 23 documents (empty, 1-token, exact-chunk, multi-chunk): the first chunk steps hold more
    # chunks than a block, so steps are split between blocks and the state batch is updated in pieces
    rnd = random.Random(7)
    lengths = [0, 1, 16, 17, 50, 3, 0, 33, 64] + [rnd.randint(1, 40) for _ in range(14)]
    tiny_blocks(block)
    compare(lengths, seed=2)


def test_initial_state_only_final_state_used(tiny_blocks):
    # only the final state enters the loss: the backward runs with no output gradient
    tiny_blocks(2)
    compare([70, 5, 90], seed=3, use_o=False)


def test_strong_decay_no_initial_state_grouped_heads(tiny_blocks):
    tiny_blocks(3)
    compare([100, 60], seed=4, with_h0=False, strong=True, HV=4, C=8)


def test_block_size_does_not_change_results(monkeypatch):
    # blocks change only how the work is split: results agree to rounding at any block size
    lengths = [130, 7, 64, 1, 99]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    xs = inputs(sum(lengths), 2, 16, 16, seed=5)
    h0 = torch.randn(len(lengths), 2, 16, 16).requires_grad_()
    results = []
    for n in (1, 4, 10_000):
        monkeypatch.setattr(chunk_mod, "_BLOCK_ELEMS_CPU", n * 2 * 16 * 16)
        o, s = chunk_gated_delta_rule(
            *xs, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=16
        )
        results.append([o, s, *torch.autograd.grad(o.sum() + s.sum(), [*xs, h0])])
    for res in results[1:]:
        for name, a, b in zip(["o", "s", "dq", "dk", "dv", "dg", "dbeta", "dh0"], res, results[0]):
            assert_close(f"{name} vs block=1", a, b, 1e-6)


def test_blocks_cover_every_step_once_in_order():
    rnd = random.Random(0)
    for _ in range(200):
        n_seq = rnd.randint(1, 6)
        active = sorted((rnd.randint(0, n_seq) for _ in range(rnd.randint(1, 8))), reverse=True)
        active = [a for a in active if a > 0] or [1]
        NC = sum(active)
        block = rnd.randint(1, NC + 2)
        blocks = chunk_mod._blocks(active, block)
        assert [b0 for b0, _, _ in blocks] == list(range(0, NC, block))
        seen = []  # (chunk, step, sequence) in processing order
        for b0, b1, pieces in blocks:
            assert 0 < b1 - b0 <= block
            for p0, p1, r0, r1 in pieces:
                assert p1 - p0 == r1 - r0 > 0 and b0 + p1 <= b1
                seen += [(b0 + p0 + i, r0 + i) for i in range(p1 - p0)]
        expected, lo = [], 0
        for a in active:
            expected += [(lo + r, r) for r in range(a)]
            lo += a
        assert seen == expected


def test_saved_for_backward_is_linear_and_small():
    # saved tensors: the 5 inputs (not copied), one [K, V] state per chunk and head, index maps
    T, H, K, V, C = 1000, 2, 16, 16, 16
    xs = inputs(T, H, K, V, seed=6)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, _ = chunk_gated_delta_rule(*xs, chunk_size=C)
    n_chunks = -(-T // C)
    bound = sum(x.numel() * 4 for x in xs) + n_chunks * H * K * V * 4 + 2 * (n_chunks * C + T) * 8
    assert sum(saved) <= bound, f"saved {sum(saved)} bytes > {bound}"
    o.sum().backward()  # the saved tensors are enough for backward
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)


def test_bf16_inputs_gradient_dtypes():
    xs = inputs(40, 2, 16, 16, seed=8)
    xs = [x.detach().bfloat16().requires_grad_() if x.dim() == 4 else x for x in xs]
    o, s = chunk_gated_delta_rule(*xs, output_final_state=True)
    grads = torch.autograd.grad(o.float().sum() + s.sum(), xs)
    assert [gr.dtype for gr in grads] == [x.dtype for x in xs]
    assert all(torch.isfinite(gr.float()).all() for gr in grads)


def test_not_twice_differentiable():
    xs = inputs(20, 1, 4, 4, seed=9)
    o, _ = chunk_gated_delta_rule(*xs)
    (dq,) = torch.autograd.grad(o.sum(), xs[0], create_graph=True)
    with pytest.raises(RuntimeError):
        dq.sum().backward()
