"""MoBA block-sparse attention (Lu et al. 2025): torch path and Triton kernels vs the references.

Ground truths, from most to least independent of the code under test:
  * hand-worked masks (T=8) typed in below, and the attended fractions counted by hand;
  * identities with ordinary attention: ``block_size * top_k >= T`` is full causal attention
    (``F.scaled_dot_product_attention(is_causal=True)`` per document) and ``top_k = 1`` is
    block-diagonal causal attention (mask built here);
  * the dense fp32 reference ``moba_attn_naive`` (explicit [T, T] mask, pairwise-rank selection)
    for everything else: odd lengths, several documents, GQA, top_k from 1 to all blocks.
The Triton kernels run under the interpreter on CPU (``TRITON_INTERPRET=1``, tests/conftest.py)
in fp32, so all paths must agree to rounding: relative RMS error <= 1e-5 on out, lse, dq, dk, dv
(observed ~3e-7); one fp16 case uses 1e-2.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lctrain.kernels.moba import (
    moba_attn_func,
    moba_attn_naive,
    moba_block_mask,
    moba_selected_fraction,
)

TOL = 1e-5
KERNELS = ["torch", "triton"]


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "non-finite entries differ"
    a, b = a[finite], b[finite]
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _check(outs, refs, tol, names):
    for name, a, b in zip(names, outs, refs):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        err = rel_rms(a, b)
        assert err <= tol, f"{name}: relative RMS error {err:.3g} > {tol}"


def _inputs(B, T, Hq, Hkv, D, dtype=torch.float32, seed=0, *, device):
    """q [B, T, Hq, D], k and v [B, T, Hkv, D], standard normal on ``device`` (leaves)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g, device=device).to(dtype).requires_grad_()
    k = torch.randn(B, T, Hkv, D, generator=g, device=device).to(dtype).requires_grad_()
    v = torch.randn(B, T, Hkv, D, generator=g, device=device).to(dtype).requires_grad_()
    return q, k, v


def _cu(lengths, device):
    """int32 cu_seqlens [N + 1] of ``lengths`` on ``device`` (None for None)."""
    if lengths is None:
        return None
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _loss_grads(out, lse, inputs, seed=1):
    """Gradients of a loss that uses both out and lse (so dlse reaches the backward too)."""
    g = torch.Generator(device=out.device).manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, device=out.device)
    dlse = torch.randn(lse.shape, generator=g, device=out.device)
    return torch.autograd.grad((out.float() * dout).sum() + (lse * dlse).sum(), inputs)


def _skip_no_triton(kernels):
    if kernels == "triton":
        pytest.importorskip("triton")


# (B, T, Hq, Hkv, D, block_size, top_k, document lengths or None)
CASES = {
    "odd_T37_B2": (2, 37, 2, 2, 16, 8, 2, None),
    "gqa_T100": (1, 100, 4, 2, 32, 16, 3, None),
    "topk1": (1, 100, 4, 2, 16, 16, 1, None),
    "topk_all_blocks": (1, 100, 2, 1, 16, 16, 7, None),
    "topk_beyond_blocks": (1, 100, 2, 1, 16, 7, 50, None),
    "partial_block_only": (1, 21, 2, 1, 16, 32, 3, None),
    "docs_unaligned_short": (1, 100, 4, 2, 16, 16, 3, [5, 35, 1, 59]),
    "docs_empty_doc": (1, 70, 2, 2, 16, 8, 2, [20, 0, 3, 47]),
}


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive(kernels, case, device):
    _skip_no_triton(kernels)
    B, T, Hq, Hkv, D, bs, top_k, lengths = CASES[case]
    cu = _cu(lengths, device)
    q, k, v = _inputs(B, T, Hq, Hkv, D, seed=T + bs + top_k, device=device)
    out, lse = moba_attn_func(q, k, v, bs, top_k, cu_seqlens=cu, kernels=kernels, return_lse=True)
    ref_out, ref_lse = moba_attn_naive(q, k, v, bs, top_k, cu_seqlens=cu)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (B, Hq, T) and lse.dtype == torch.float32
    grads = _loss_grads(out, lse, (q, k, v))
    ref_grads = _loss_grads(ref_out, ref_lse, (q, k, v))
    _check((out, lse, *grads), (ref_out, ref_lse, *ref_grads), TOL, ("out", "lse", "dq", "dk", "dv"))


@pytest.mark.parametrize("top_k", [2, 3])
def test_triton_several_tiles_per_block(monkeypatch, top_k, device):
    """16-row tiles inside 40-token blocks: three query tiles and three key chunks per block
    (the last ones partial), documents cutting blocks short."""
    pytest.importorskip("triton")
    from lctrain.kernels.moba import interface

    monkeypatch.setitem(interface.BLOCK_OVERRIDE, "BLOCK_M", 16)
    monkeypatch.setitem(interface.BLOCK_OVERRIDE, "BLOCK_N", 16)
    cu = _cu([90, 17, 53], device)
    q, k, v = _inputs(1, 160, 4, 2, 32, seed=top_k, device=device)
    out, lse = moba_attn_func(q, k, v, 40, top_k, cu_seqlens=cu, kernels="triton", return_lse=True)
    ref_out, ref_lse = moba_attn_naive(q, k, v, 40, top_k, cu_seqlens=cu)
    grads = _loss_grads(out, lse, (q, k, v))
    ref_grads = _loss_grads(ref_out, ref_lse, (q, k, v))
    _check((out, lse, *grads), (ref_out, ref_lse, *ref_grads), TOL, ("out", "lse", "dq", "dk", "dv"))


# ---------------------------------------------------------------------------------------------
# identities with ordinary attention (oracles independent of MoBA's code)


def _dense_reference(q, k, v, allowed):
    """Softmax attention with a bool mask [T, T] (shared by heads); GQA by repeating K/V here."""
    G = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, kr) * q.shape[-1] ** -0.5
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), vr), lse


@pytest.mark.parametrize("kernels", KERNELS)
def test_enough_blocks_is_full_causal_attention(kernels, device):
    _skip_no_triton(kernels)
    lengths = [30, 3, 67]
    cu = _cu(lengths, device)
    q, k, v = _inputs(1, 100, 4, 2, 16, seed=21, device=device)
    bs, top_k = 16, 7  # 16 * 7 >= 100: every past block of every document is selected
    out, lse = moba_attn_func(q, k, v, bs, top_k, cu_seqlens=cu, kernels=kernels, return_lse=True)
    # independent oracle: torch SDPA with is_causal per document, plus logsumexp of its scores
    ref_out, ref_lse = [], []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kr, vr = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)  # GQA 4 / 2
        qd, kd, vd = (x[:, s:e].transpose(1, 2) for x in (q, kr, vr))
        ref_out.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(1, 2))
        sc = (qd @ kd.transpose(-1, -2)) * 16**-0.5
        sc = sc.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool, device=device).triu(1), float("-inf"))
        ref_lse.append(torch.logsumexp(sc, -1))
    ref_out, ref_lse = torch.cat(ref_out, 1), torch.cat(ref_lse, 2)
    grads = _loss_grads(out, lse, (q, k, v))
    ref_grads = _loss_grads(ref_out, ref_lse, (q, k, v))
    _check((out, lse, *grads), (ref_out, ref_lse, *ref_grads), TOL, ("out", "lse", "dq", "dk", "dv"))


@pytest.mark.parametrize("kernels", KERNELS)
def test_top1_is_block_diagonal_causal_attention(kernels, device):
    _skip_no_triton(kernels)
    lengths, bs = [45, 7, 48], 10
    cu = _cu(lengths, device)
    T = sum(lengths)
    q, k, v = _inputs(1, T, 2, 1, 16, seed=22, device=device)
    out, lse = moba_attn_func(q, k, v, bs, 1, cu_seqlens=cu, kernels=kernels, return_lse=True)
    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
    )
    local = torch.arange(T, device=device) - cu[:-1].long()[doc]
    blk = doc * 1000 + local // bs  # block identity
    i, j = torch.arange(T, device=device)[:, None], torch.arange(T, device=device)[None, :]
    allowed = (blk[:, None] == blk[None, :]) & (j <= i)
    ref_out, ref_lse = _dense_reference(q, k, v, allowed)
    grads = _loss_grads(out, lse, (q, k, v))
    ref_grads = _loss_grads(ref_out, ref_lse, (q, k, v))
    _check((out, lse, *grads), (ref_out, ref_lse, *ref_grads), TOL, ("out", "lse", "dq", "dk", "dv"))


# ---------------------------------------------------------------------------------------------
# hand-worked masks (T = 8, block 2, top_k 2, D = 2, one head)

# block means of k: block0 (1, 0), block1 (0, 1), block2 (-1, 0), block3 never a past block
HAND_K = [[1, 1], [1, -1], [0, 2], [0, 0], [-2, 0], [0, 0], [5, 5], [5, 5]]
# q4 prefers block1, q5 block0, q6 block2 (scores 0: -1, 1: 0, 2: 1), q7 ties everywhere -> block0
HAND_Q = [[1, 0], [1, 0], [0, 1], [0, 1], [0, 1], [1, 0], [-1, 0], [0, 0]]
HAND_MASK = [
    [1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0],  # block1: own causal + the only past block 0
    [1, 1, 1, 1, 0, 0, 0, 0],
    [0, 0, 1, 1, 1, 0, 0, 0],  # block2: own causal + block1
    [1, 1, 0, 0, 1, 1, 0, 0],  # block2: own + block0
    [0, 0, 0, 0, 1, 1, 1, 0],  # block3: own + block2
    [1, 1, 0, 0, 0, 0, 1, 1],  # block3: all scores tie -> lowest index, block0
]

# two documents [0, 3) and [3, 8): blocks {0,1},{2} and {3,4},{5,6},{7}; doc0's keys point at
# q7, so a selection leaking across the boundary (or blocks aligned to T) would pick them
HAND_DOC_K = [[0, 10], [0, 10], [0, 10], [1, 0], [1, 0], [0, 1], [0, 1], [0, 0]]
HAND_DOC_Q = [[1, 0], [1, 0], [1, 0], [1, 0], [1, 0], [1, 0], [1, 0], [0, 3]]
HAND_DOC_MASK = [
    [1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0],  # doc0 block1 (partial): own + block0
    [0, 0, 0, 1, 0, 0, 0, 0],
    [0, 0, 0, 1, 1, 0, 0, 0],
    [0, 0, 0, 1, 1, 1, 0, 0],
    [0, 0, 0, 1, 1, 1, 1, 0],
    [0, 0, 0, 0, 0, 1, 1, 1],  # doc1 block2: own + block {5,6} (score 3 vs 0)
]


def _hand(qs, ks, device):
    q = torch.tensor(qs, dtype=torch.float32, device=device).view(1, 8, 1, 2)
    k = torch.tensor(ks, dtype=torch.float32, device=device).view(1, 8, 1, 2)
    return q, k


@pytest.mark.parametrize("which", ["single", "two_docs"])
def test_block_mask_hand_worked(which, device):
    if which == "single":
        q, k = _hand(HAND_Q, HAND_K, device)
        cu, expected = None, HAND_MASK
    else:
        q, k = _hand(HAND_DOC_Q, HAND_DOC_K, device)
        cu, expected = _cu([3, 5], device), HAND_DOC_MASK
    mask = moba_block_mask(q, k, 2, 2, cu_seqlens=cu)
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == expected


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("which", ["single", "two_docs"])
def test_hand_worked_selection_in_fast_paths(kernels, which, device):
    """The torch and Triton paths select the hand-worked blocks (exact ties included)."""
    _skip_no_triton(kernels)
    if which == "single":
        q, k = _hand(HAND_Q, HAND_K, device)
        cu, expected = None, HAND_MASK
    else:
        q, k = _hand(HAND_DOC_Q, HAND_DOC_K, device)
        cu, expected = _cu([3, 5], device), HAND_DOC_MASK
    v = torch.randn(1, 8, 1, 2, generator=torch.Generator(device=device).manual_seed(3), device=device)
    out, lse = moba_attn_func(q, k, v, 2, 2, cu_seqlens=cu, kernels=kernels, return_lse=True)
    s = (q[0, :, 0] @ k[0, :, 0].T) * 2**-0.5
    s = s.masked_fill(~torch.tensor(expected, dtype=torch.bool, device=device), float("-inf"))
    ref_out = torch.softmax(s, -1) @ v[0, :, 0]
    _check((out[0, :, 0], lse[0, 0]), (ref_out, torch.logsumexp(s, -1)), TOL, ("out", "lse"))


def test_selected_fraction_hand_counted():
    # T=8, block 2, top_k 2 (HAND_MASK): blocks per query 1,1,2,2,2,2,2,2 of 1,1,2,2,3,3,4,4
    assert moba_selected_fraction(8, 2, 2, unit="blocks") == pytest.approx(14 / 20)
    # keys per query 1,2,3,4,3,4,3,4 (row sums of HAND_MASK) of 1..8
    assert sum(map(sum, HAND_MASK)) == 24
    assert moba_selected_fraction(8, 2, 2, unit="keys") == pytest.approx(24 / 36)
    assert moba_selected_fraction(8, 2, 4, unit="keys") == pytest.approx(1.0)


def test_selected_fraction_matches_mask(device):
    lengths, bs, top_k = [50, 6, 44], 8, 3
    cu = _cu(lengths, device)
    T = sum(lengths)
    q, k, _ = _inputs(1, T, 2, 1, 16, seed=31, device=device)
    mask = moba_block_mask(q, k, bs, top_k, cu_seqlens=cu)[0]  # [H, T, T]
    causal_keys, blocks_got, blocks_all = 0, 0, 0
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        L = e - s
        causal_keys += L * (L + 1) // 2
        m = mask[:, s:e, s:e]
        for j in range(0, L, bs):  # attended blocks: any key of the block visible
            blocks_got += m[:, :, j : j + bs].any(-1).sum().item()
        blocks_all += mask.shape[0] * sum(i // bs + 1 for i in range(L))
    assert moba_selected_fraction(T, bs, top_k, cu, unit="keys") == pytest.approx(
        mask.sum().item() / (mask.shape[0] * causal_keys)
    )
    assert moba_selected_fraction(T, bs, top_k, cu, unit="blocks") == pytest.approx(blocks_got / blocks_all)


# ---------------------------------------------------------------------------------------------
# Triton specifics: raw ops, torch.compile, fp16


def test_triton_raw_fwd_bwd(device):
    pytest.importorskip("triton")
    from lctrain.kernels.moba import moba_attn_bwd, moba_attn_fwd

    cu = _cu([33, 31], device)
    q, k, v = _inputs(1, 64, 2, 1, 16, seed=41, device=device)
    out, lse, sel = moba_attn_fwd(q, k, v, 8, 3, cu_seqlens=cu)
    assert sel.dtype == torch.int32 and sel.shape == (1, 2, 64, 2)
    # doc 1 starts at token 33 = block 5 (doc 0 has blocks 0..4); its first block has no past
    assert torch.all(sel[:, :, 33:41] == -1) and torch.all(sel[:, :, 41:49, 0] == 5)
    assert torch.all(sel[:, :, 41:49, 1] == -1)
    dout = torch.randn_like(out)
    dq, dk, dv = moba_attn_bwd(dout, q, k, v, out.detach(), lse.detach(), sel, 8, cu_seqlens=cu)
    ref_out, _ = moba_attn_naive(q, k, v, 8, 3, cu_seqlens=cu)
    ref = torch.autograd.grad(ref_out, (q, k, v), dout)
    _check((dq, dk, dv), ref, TOL, ("dq", "dk", "dv"))


def test_triton_torch_compile_fullgraph_and_opcheck(device):
    pytest.importorskip("triton")
    cu = _cu([13, 27], device)
    q, k, v = _inputs(1, 40, 2, 1, 16, seed=43, device=device)

    def f(q, k, v):
        out, lse = moba_attn_func(q, k, v, 8, 2, cu_seqlens=cu, kernels="triton", return_lse=True)
        return (out * out).sum() + lse.sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_out, ref_lse = moba_attn_naive(q, k, v, 8, 2, cu_seqlens=cu)
    ref_loss = (ref_out * ref_out).sum() + ref_lse.sum()
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    _check((loss, *grads), (ref_loss, *ref_grads), TOL, ("loss", "dq", "dk", "dv"))
    # schema, fake tensor and autograd registration of the custom op
    args = (*(x.detach().requires_grad_() for x in (q, k, v)), cu, 8, 2, 0.25)
    torch.library.opcheck(torch.ops.lctrain.moba_attn_fwd.default, args)


def test_triton_fp16(device):
    pytest.importorskip("triton")
    q, k, v = _inputs(1, 64, 2, 2, 32, dtype=torch.float16, seed=47, device=device)
    out, lse = moba_attn_func(q, k, v, 16, 2, kernels="triton", return_lse=True)
    assert out.dtype == torch.float16
    ref_out, ref_lse = moba_attn_naive(q, k, v, 16, 2)
    dout = torch.randn(out.shape, device=device)
    grads = torch.autograd.grad(out, (q, k, v), dout.half())
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    assert all(g.dtype == torch.float16 for g in grads)
    _check((out, lse, *grads), (ref_out, ref_lse, *ref_grads), 1e-2, ("out", "lse", "dq", "dk", "dv"))


def test_torch_path_bf16_output_dtype(device):
    q, k, v = _inputs(1, 40, 2, 1, 16, dtype=torch.bfloat16, seed=53, device=device)
    out = moba_attn_func(q, k, v, 8, 2)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref_out, _ = moba_attn_naive(q, k, v, 8, 2)
    assert rel_rms(out, ref_out) < 1e-2


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("kernels", KERNELS)
def test_bad_inputs(kernels, device):
    q = torch.randn(1, 8, 4, 16, device=device)
    k = torch.randn(1, 8, 2, 16, device=device)
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        moba_attn_func(q[0], k[0], k[0], 2, 2, kernels=kernels)
    with pytest.raises(ValueError, match="k.shape == v.shape"):
        moba_attn_func(q, k, k[:, :4], 2, 2, kernels=kernels)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        moba_attn_func(q[:, :, :3], k, k, 2, 2, kernels=kernels)
    with pytest.raises(ValueError, match="block_size"):
        moba_attn_func(q, k, k, 0, 2, kernels=kernels)
    with pytest.raises(ValueError, match="top_k"):
        moba_attn_func(q, k, k, 2, 0, kernels=kernels)
    with pytest.raises(ValueError, match="cu_seqlens"):
        moba_attn_func(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), 2, 2,
                       cu_seqlens=_cu([8], device), kernels=kernels)  # fmt: skip
    with pytest.raises(ValueError, match="cu_seqlens"):
        moba_attn_func(q, k, k, 2, 2, cu_seqlens=_cu([3, 4], device), kernels=kernels)
    with pytest.raises(ValueError, match="dtype"):
        moba_attn_func(q, k.double(), k, 2, 2, kernels=kernels)


def test_bad_kernels_and_fraction_args(device):
    q = torch.randn(1, 8, 2, 16, device=device)
    with pytest.raises(ValueError, match="kernels"):
        moba_attn_func(q, q, q, 2, 2, kernels="gpu")
    with pytest.raises(ValueError, match="unit"):
        moba_selected_fraction(8, 2, 2, unit="tokens")
    with pytest.raises(ValueError, match="top_k"):
        moba_selected_fraction(8, 2, 0)
    with pytest.raises(ValueError, match="block_size"):
        moba_block_mask(q, q, 0, 2)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile for sm90: the interpreter accepts code the compiler rejects

H100_SHARED_BYTES = 232448


def _sm90_compile_all() -> int:
    """Compile every MoBA kernel for ``GPUTarget("cuda", 90, 32)`` with the CUDA launch configs
    (bf16 and fp32, D = 64 and 128, block_size 512); print one line each; 1 on too much shared
    memory. Needs only the triton wheel (ships ptxas); run with TRITON_INTERPRET=0."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lctrain.kernels.moba import interface
    from lctrain.kernels.moba import triton_kernels as tk

    ptr_in = {"Q", "K", "V", "DO", "DK", "DV"}
    ptr_f32 = {"O", "LSE", "OP", "LSEP", "DELTA", "DQ", "DQP"}
    ptr_i32 = {"BLK_START", "BLK_LEN", "SEG_GROUP", "LANE_PAIR", "GROUP_START", "GROUP_COUNT", "SORTED_PAIRS"}
    kernels = [
        (tk._own_fwd_kernel, False),
        (tk._pair_fwd_kernel, False),
        (tk._own_dq_kernel, True),
        (tk._pair_dq_kernel, True),
        (tk._dkdv_kernel, True),
    ]
    for dtype, tdt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for head_dim in (64, 128):
            for fn, backward in kernels:
                cfg = interface._config(head_dim, 512, backward, tdt)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                params = list(inspect.signature(fn.fn).parameters)
                consts = dict(cfg, DOT_PREC=interface._dot_precision(tdt))
                if "GROUP" in params:
                    consts["GROUP"] = 2
                sig = {}
                for p in params:
                    if p in consts:
                        sig[p] = "constexpr"
                    elif p in ptr_in:
                        sig[p] = "*" + dtype
                    elif p in ptr_f32:
                        sig[p] = "*fp32"
                    elif p in ptr_i32:
                        sig[p] = "*i32"
                    else:
                        sig[p] = "fp32" if p in ("scale", "scale_log2") else "i32"
                src = ASTSource(fn, sig, constexprs={(params.index(n),): c for n, c in consts.items()})
                target = GPUTarget("cuda", 90, 32)  # host: a compile target, not a tensor device
                kernel = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
                shared = kernel.metadata.shared
                print(f"{fn.fn.__name__} {dtype} D={head_dim}: shared={shared}", flush=True)
                if shared > H100_SHARED_BYTES:
                    print(f"FAIL: {shared} bytes of shared memory > {H100_SHARED_BYTES}")
                    return 1
    return 0


def test_triton_kernels_compile_for_sm90():
    """Every kernel compiles for H100/H200 (sm90) and fits its shared memory (~30 s cold)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(repo))
    res = subprocess.run(
        [sys.executable, __file__, "sm90"],
        check=False,
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("shared=") == 20, res.stdout


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["sm90"]:
        sys.exit(_sm90_compile_all())
