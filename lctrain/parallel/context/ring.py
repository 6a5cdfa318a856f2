"""Ring attention: K/V blocks rotate around the ring group while each rank attends with its queries.

Liu, Zaharia, Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite Context"
(2023), with the zigzag layout of :mod:`lctrain.parallel.context.zigzag` and any document mask.

Forward, ring of R ranks: at step ``s`` rank ``i`` holds the K/V of ring rank ``(i - s) mod R``;
it posts the send of that block to ``i + 1`` and the receive from ``i - 1``
(``batch_isend_irecv``) *before* computing on it, so the transfer overlaps the block's compute.
Each block's ``(out_b, lse_b)`` merges into the running result by log-sum-exp in fp32
(:func:`~lctrain.kernels.softmax_attn.block.merge_partial`). Blocks whose mask is empty (the
causal future of a zigzag chunk, other documents) are skipped.

Backward: the same rotation, carrying fp32 dK/dV accumulators with their K/V block; each step adds
the FlashAttention-2 style block gradient computed from the final lse, and after R hops the
accumulators are back at their owner. Both transfers overlap compute: the next K/V block and the
accumulators (which are only needed after a block's gradients are computed) travel meanwhile.

Which keys a query block sees is planned on the host, from the token runs each rank holds
(``(local start, global start, length)``: the zigzag chunks, or the Ulysses-gathered chunks under
USP) and the host record of the *global* ``cu_seqlens``
(:func:`lctrain.kernels.varlen.host_bounds`): :func:`block_pieces` cuts every (query run, key
run) pair at the document boundaries into full rectangles and causal squares (several
documents of one chunk: one causal piece with its segments, a varlen call). No ``[Tq, Tk]``
mask is ever built and nothing is read from the device; the plan is cached with the boundaries
for every layer of the micro-batch.

Block kernels (:func:`flash_kernels`): the Triton FlashAttention-2 ``flash_attn_fwd`` /
``flash_attn_bwd`` (varlen for multi-document causal pieces) when the kernel plan says Triton
(the CUDA plan), PyTorch's fused CPU flash kernels on CPU otherwise (a loop over the documents of
a causal piece), and the fp32 dense reference (:mod:`~lctrain.kernels.softmax_attn.block`, per
piece) only where neither exists (``model.kernels=torch`` on CUDA, announced at start-up).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lctrain.kernels.softmax_attn.block import block_attn_bwd, block_attn_fwd, merge_partial
from lctrain.kernels.varlen import attach_host_bounds, host_bounds, host_cache, with_host_bounds


def _start_shift(t: torch.Tensor, send_to: int, recv_from: int, group) -> tuple[torch.Tensor, list]:
    """Post send of ``t`` to ``send_to`` and receive of a same-shaped tensor from ``recv_from``."""
    buf = torch.empty_like(t)
    ops = [
        dist.P2POp(dist.isend, t, send_to, group),
        dist.P2POp(dist.irecv, buf, recv_from, group),
    ]
    return buf, dist.batch_isend_irecv(ops)


def _wait(reqs: list) -> None:
    for r in reqs:
        r.wait()


@dataclass(frozen=True)
class BlockKernels:
    """The fused block kernels ring attention calls: ``fwd(q, k, v, softmax_scale=, causal=) ->
    (out, lse [B, H, Tq])``, ``bwd(dout, q, k, v, out, lse, softmax_scale=, causal=) -> (dq, dk,
    dv)``; ``varlen``: they also take ``cu_seqlens_q/k`` and ``max_seqlen_q/k`` on packed
    ``[total, H, D]`` inputs (lse ``[H, total]``)."""

    fwd: Callable
    bwd: Callable
    varlen: bool
    name: str


def flash_kernels(use_flash: bool, device: torch.device | None = None) -> BlockKernels | None:
    """The fused block kernels with log-sum-exp for this device, or None (dense reference).

    ``use_flash`` (the kernel plan's softmax choice is Triton): the Triton ``flash_attn_fwd`` /
    ``flash_attn_bwd`` of :mod:`lctrain.kernels.flash_attn` (on CPU under ``TRITON_INTERPRET=1``).
    Otherwise, on CPU, PyTorch's fused CPU flash-attention kernels
    (:mod:`lctrain.kernels.softmax_attn.cpu_flash`), which never form a block's full score
    matrix; elsewhere None: the per-piece dense fp32 reference.
    """
    if use_flash:
        from lctrain.kernels.flash_attn import flash_attn_bwd, flash_attn_fwd

        return BlockKernels(flash_attn_fwd, flash_attn_bwd, True, "triton_flash")
    if device is not None and device.type == "cpu":
        from lctrain.kernels.softmax_attn.cpu_flash import cpu_flash_attn_bwd, cpu_flash_attn_fwd

        return BlockKernels(cpu_flash_attn_fwd, cpu_flash_attn_bwd, False, "cpu_flash")
    return None


Run = tuple[int, int, int]  # (local start, global start, length) of consecutive global tokens


@dataclass(frozen=True)
class Piece:
    """A part of one (query block, key block) pair that a fused kernel computes in one call.

    Rows ``q0:q1`` attend columns ``k0:k1`` (local positions). ``segments``: None for a fully
    visible rectangle; else the lengths of the causal squares it is made of (the same for rows
    and columns, one per document; one entry: a plain causal square).
    """

    q0: int
    q1: int
    k0: int
    k1: int
    segments: tuple[int, ...] | None = None


def _docs_overlapping(bounds, lo: int, hi: int) -> range:
    """Indices of the documents of ``bounds`` that intersect global tokens ``[lo, hi)``."""
    return range(max(bisect.bisect_right(bounds, lo) - 1, 0), min(bisect.bisect_left(bounds, hi), len(bounds) - 1))


def block_pieces(q_runs: Sequence[Run], k_runs: Sequence[Run], bounds: Sequence[int] | None,
                 causal: bool) -> list[Piece]:
    """Cut one (query block, key block) pair into fused-kernel pieces, on the host.

    Args:
        q_runs, k_runs: the runs of consecutive global tokens of the query and key blocks,
            ``(local start, global start, length)``.
        bounds: the global document boundaries (``cu_seqlens`` as ints), or None (one sequence).
        causal: key ``j`` visible to query ``i`` only if ``j <= i`` (global indices).

    Returns:
        The pieces: per (query run, key run) and document, the keys before the queries (a full
        rectangle), the shared range (a causal square) and the queries after it over the shared
        range (a full rectangle); the causal squares of consecutive documents of one run pair
        are merged into one piece with ``segments``. Empty when nothing is visible.
    """
    if bounds is None:
        hi = max([g + n for _, g, n in (*q_runs, *k_runs)], default=0)
        bounds = (0, hi)
    out: list[Piece] = []
    for lq, gq, n in q_runs:
        for lk, gk, m in k_runs:
            if n == 0 or m == 0:
                continue
            span_lo, span_hi = min(gq, gk), max(gq + n, gk + m)
            if causal and gk >= gq + n:
                continue  # every key after every query
            squares: list[tuple[int, int, int]] = []  # (q local, k local, length) of causal squares
            for d in _docs_overlapping(bounds, span_lo, span_hi):
                ds, de = bounds[d], bounds[d + 1]
                qa, qb = max(gq, ds), min(gq + n, de)
                ka, kb = max(gk, ds), min(gk + m, de)
                if qa >= qb or ka >= kb:
                    continue
                ql, kl = lq - gq, lk - gk  # global -> local offsets of the two runs
                if not causal:
                    out.append(Piece(qa + ql, qb + ql, ka + kl, kb + kl))
                    continue
                if ka < min(kb, qa):  # keys before the first query: visible to all
                    out.append(Piece(qa + ql, qb + ql, ka + kl, min(kb, qa) + kl))
                oa, ob = max(ka, qa), min(kb, qb)  # the shared range: causal
                if oa < ob:
                    squares.append((oa + ql, oa + kl, ob - oa))
                    if ob < qb:  # queries after the shared range see all of it
                        out.append(Piece(ob + ql, qb + ql, oa + kl, ob + kl))
            # merge causal squares that follow each other in rows and columns
            i = 0
            while i < len(squares):
                j = i + 1
                while (j < len(squares) and squares[j][0] == squares[j - 1][0] + squares[j - 1][2]
                       and squares[j][1] == squares[j - 1][1] + squares[j - 1][2]):
                    j += 1
                q0, k0 = squares[i][0], squares[i][1]
                segs = tuple(sq[2] for sq in squares[i:j])
                out.append(Piece(q0, q0 + sum(segs), k0, k0 + sum(segs), segs))
                i = j
    return out


def _causal_mask(segments, device) -> torch.Tensor:
    """bool [n, n]: block-diagonal causal squares (the dense reference of a causal piece)."""
    n = sum(segments)
    seg = torch.repeat_interleave(torch.arange(len(segments), device=device),
                                  torch.tensor(segments, device=device))
    idx = torch.arange(n, device=device)
    return (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])


def _varlen_cu(segments, device) -> tuple[torch.Tensor, int]:
    bounds = [0, *itertools.accumulate(segments)]
    cu = attach_host_bounds(torch.tensor(bounds, dtype=torch.int32), bounds)
    return with_host_bounds(cu, device, non_blocking=True), max(segments)


def _piece_fwd(kern: BlockKernels | None, pc: Piece, q, k, v, scale):
    """(out fp32 [B, n, Hq, D], lse fp32 [B, Hq, n]) of one piece."""
    qs, ks, vs = q[:, pc.q0:pc.q1], k[:, pc.k0:pc.k1], v[:, pc.k0:pc.k1]
    if kern is None:
        mask = None if pc.segments is None else _causal_mask(pc.segments, q.device)
        return block_attn_fwd(qs, ks, vs, mask, scale)
    if pc.segments is None or len(pc.segments) == 1:
        o, lse = kern.fwd(qs.contiguous(), ks.contiguous(), vs.contiguous(), softmax_scale=scale,
                          causal=pc.segments is not None)
        return o.float(), lse.float()
    if kern.varlen:  # one call for the documents of the piece (B == 1 with documents)
        cu, mx = _varlen_cu(pc.segments, q.device)
        o, lse = kern.fwd(qs[0], ks[0], vs[0], softmax_scale=scale, causal=True, cu_seqlens_q=cu,
                          cu_seqlens_k=cu, max_seqlen_q=mx, max_seqlen_k=mx)
        return o[None].float(), lse[None].float()
    outs, lses, a = [], [], 0  # CPU kernels without varlen: one call per document
    for n in pc.segments:
        o, lse = kern.fwd(qs[:, a:a + n].contiguous(), ks[:, a:a + n].contiguous(), vs[:, a:a + n].contiguous(),
                          softmax_scale=scale, causal=True)
        outs.append(o.float())
        lses.append(lse.float())
        a += n
    return torch.cat(outs, 1), torch.cat(lses, 2)


def _piece_bwd(kern: BlockKernels | None, pc: Piece, dout, q, k, v, out, lse, delta, scale):
    """(dq [B, n, Hq, D], dk, dv [B, m, Hkv, D]) fp32: the piece's share of the gradients."""
    rows, cols = slice(pc.q0, pc.q1), slice(pc.k0, pc.k1)
    qs, ks, vs = q[:, rows], k[:, cols], v[:, cols]
    if kern is None:
        mask = None if pc.segments is None else _causal_mask(pc.segments, q.device)
        return block_attn_bwd(dout[:, rows].float(), qs, ks, vs, lse[:, :, rows], delta[:, :, rows], mask, scale)
    d_s, o_s, l_s = dout[:, rows].contiguous(), out[:, rows].contiguous(), lse[:, :, rows].contiguous()
    if pc.segments is None or len(pc.segments) == 1:
        g = kern.bwd(d_s, qs.contiguous(), ks.contiguous(), vs.contiguous(), o_s, l_s, softmax_scale=scale,
                     causal=pc.segments is not None)
        return tuple(t.float() for t in g)
    if kern.varlen:
        cu, mx = _varlen_cu(pc.segments, q.device)
        g = kern.bwd(d_s[0], qs[0], ks[0], vs[0], o_s[0], l_s[0], softmax_scale=scale, causal=True,
                     cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx, max_seqlen_k=mx)
        return tuple(t[None].float() for t in g)
    parts, a = [], 0
    for n in pc.segments:
        sl = slice(a, a + n)
        parts.append(kern.bwd(d_s[:, sl].contiguous(), qs[:, sl].contiguous(), ks[:, sl].contiguous(),
                              vs[:, sl].contiguous(), o_s[:, sl].contiguous(), l_s[:, :, sl].contiguous(),
                              softmax_scale=scale, causal=True))
        a += n
    return tuple(torch.cat([p[i].float() for p in parts], 1) for i in range(3))


def _block_fwd(kern, pieces, q, k, v, scale):
    """Merged (out fp32 [B, Tq, Hq, D], lse fp32 [B, Hq, Tq]) of one block's pieces."""
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
    for pc in pieces:
        o_s, lse_s = _piece_fwd(kern, pc, q, k, v, scale)
        rows = slice(pc.q0, pc.q1)
        o_m, lse_m = merge_partial(o[:, rows], lse[:, :, rows], o_s, lse_s)  # a row may see several pieces
        o[:, rows] = o_m
        lse[:, :, rows] = lse_m
    return o, lse


def _block_bwd(kern, pieces, dout, q, k, v, out, lse, delta, scale):
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    for pc in pieces:  # with the final out / lse every piece's share is independent
        dq_s, dk_s, dv_s = _piece_bwd(kern, pc, dout, q, k, v, out, lse, delta, scale)
        dq[:, pc.q0:pc.q1] += dq_s
        dk[:, pc.k0:pc.k1] += dk_s
        dv[:, pc.k0:pc.k1] += dv_s
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, plans, ring, kern):
        group, i, R, ranks = ring
        nxt, prv = ranks[(i + 1) % R], ranks[(i - 1) % R]
        kv = torch.stack((k, v)).contiguous()
        out = lse = None
        for s in range(R):
            if s < R - 1:
                nxt_kv, reqs = _start_shift(kv, nxt, prv, group)
            if plans[s]:
                o_b, l_b = _block_fwd(kern, plans[s], q, kv[0], kv[1], scale)
                out, lse = merge_partial(out, lse, o_b, l_b)
            if s < R - 1:
                _wait(reqs)
                kv = nxt_kv
        if out is None:  # no visible key at all (cannot happen for causal self-attention)
            out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plans, ctx.scale, ctx.ring, ctx.kern = plans, scale, ring, kern
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, i, R, ranks = ctx.ring
        nxt, prv = ranks[(i + 1) % R], ranks[(i - 1) % R]
        kern = ctx.kern
        dout = dout.float()
        delta = (dout * out).sum(-1).transpose(1, 2) if kern is None else None  # [B, Hq, Tq]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack((k, v)).contiguous()
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        dreqs: list = []
        dout_k, out_k = (dout, out) if kern is None else (dout.to(q.dtype), out.to(q.dtype))
        for s in range(R):
            if s < R - 1:
                nxt_kv, reqs = _start_shift(kv, nxt, prv, group)
            plan = ctx.plans[s]
            if plan:
                dq_b, dk_b, dv_b = _block_bwd(kern, plan, dout_k, q, kv[0], kv[1], out_k, lse, delta, ctx.scale)
                dq += dq_b
            # the accumulators of this K/V block were in flight during the compute above
            _wait(dreqs)
            if plan:
                dkv[0] += dk_b
                dkv[1] += dv_b
            if R > 1:  # the accumulators travel with their K/V block; after R hops they are home
                dkv, dreqs = _start_shift(dkv, nxt, prv, group)
            if s < R - 1:
                _wait(reqs)
                kv = nxt_kv
        _wait(dreqs)
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)) + (None,) * 4


def ring_plans(q_runs: Sequence[Run], kv_runs: Sequence[Sequence[Run]], cu_seqlens: torch.Tensor | None,
               ring_rank: int, causal: bool) -> list[list[Piece]]:
    """The pieces of every ring step (step ``s`` holds the keys of ring rank ``(i - s) mod R``).

    Planned on the host from the boundaries' host record and cached with it, so the layers of a
    micro-batch share one plan and nothing is read from the device.
    """
    R = len(kv_runs)
    key = ("ring_plans", tuple(q_runs), tuple(map(tuple, kv_runs)), ring_rank, causal)
    cache = host_cache(cu_seqlens) if cu_seqlens is not None else None
    if cache is not None and key in cache:
        return cache[key]
    bounds = host_bounds(cu_seqlens) if cu_seqlens is not None else None
    plans = [block_pieces(q_runs, kv_runs[(ring_rank - s) % R], bounds, causal) for s in range(R)]
    if cache is not None:
        cache[key] = plans
    return plans


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_runs: Sequence[Run],
    kv_runs: Sequence[Sequence[Run]],
    cu_seqlens: torch.Tensor | None,
    ring: tuple,
    scale: float | None = None,
    causal: bool = True,
    use_flash: bool = False,
) -> torch.Tensor:
    """Softmax attention of local queries over the K/V of every rank of a ring.

    Args:
        q: [B, Tq, Hq, Dh] this rank's queries; k, v: [B, Tk, Hkv, Dh] this rank's keys/values
            (``Hq % Hkv == 0``; every ring rank has the same shapes).
        q_runs: this rank's tokens as runs ``(local start, global start, length)`` covering ``Tq``.
        kv_runs: for each ring rank ``j``, the runs of the keys it holds.
        cu_seqlens: int32 [N + 1] *global* document boundaries (B == 1), or None; read through
            its host record (:func:`lctrain.kernels.varlen.host_bounds`).
        ring: ``(group, ring_rank, ring_degree, global_ranks)`` of the ring.
        scale: logit scale, default ``Dh ** -0.5``.
        causal: causal mask on the global indices.
        use_flash: the Triton flash block kernels (see :func:`flash_kernels`); else PyTorch's fused
            CPU kernels on CPU and the dense fp32 reference elsewhere.

    Returns:
        [B, Tq, Hq, Dh] in ``q.dtype``; differentiable w.r.t. q, k, v.

    Raises:
        ValueError: documents (``cu_seqlens``) with B != 1.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs the packed layout with B == 1, got q{tuple(q.shape)}")
    plans = ring_plans(q_runs, kv_runs, cu_seqlens, ring[1], causal)
    kern = flash_kernels(use_flash, q.device)
    return _RingAttention.apply(q, k, v, float(scale), plans, ring, kern)
