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

Masks use global token indices: ``q_index`` for this rank's queries and ``kv_index[j]`` for the
keys held by ring rank ``j`` (plus document ids from the global ``cu_seqlens``), so the same code
serves pure ring (zigzag shards) and USP (the Ulysses-gathered token sets).

Block kernels: for the blocks the zigzag layout produces without document masks (a chunk pair
against itself: causal; other ranks' chunks: a fully visible rectangle of rows x columns, see
:func:`block_plan`) fused kernels with log-sum-exp that never hold a block's score matrix: the
Triton FlashAttention-2 ``flash_attn_fwd`` / ``flash_attn_bwd`` when the layer's kernels choose
Triton, PyTorch's fused CPU flash kernels on CPU otherwise (:func:`flash_kernels`). Blocks cut by
document boundaries take the torch path of :mod:`~lctrain.kernels.softmax_attn.block` with the
explicit mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.kernels.softmax_attn.block import attention_mask, block_attn_bwd, block_attn_fwd, merge_partial


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


def flash_kernels(use_flash: bool, device: torch.device | None = None):
    """The fused ``(fwd, bwd)`` block kernels with log-sum-exp for this device, or None.

    ``use_flash`` (the layer's kernel choice resolved for the device,
    :func:`lctrain.kernels.dispatch.use_triton`): the Triton ``flash_attn_fwd`` /
    ``flash_attn_bwd`` of :mod:`lctrain.kernels.flash_attn` (on CPU under ``TRITON_INTERPRET=1``).
    Otherwise, on CPU, PyTorch's fused CPU flash-attention kernels
    (:mod:`lctrain.kernels.softmax_attn.cpu_flash`), which never form a block's full score
    matrix; elsewhere None (the dense torch block path).
    """
    if use_flash:
        from lctrain.kernels.flash_attn import flash_attn_bwd, flash_attn_fwd

        return flash_attn_fwd, flash_attn_bwd
    if device is not None and device.type == "cpu":
        from lctrain.kernels.softmax_attn.cpu_flash import cpu_flash_attn_bwd, cpu_flash_attn_fwd

        return cpu_flash_attn_fwd, cpu_flash_attn_bwd
    return None


def block_plan(mask: torch.Tensor):
    """How to compute one (query block, key block) pair given its bool mask [Tq, Tk].

    Returns None (nothing visible: skip), ``("causal",)`` (square lower-triangular: a chunk
    against itself without documents), ``("sub", rows, cols)`` (the visible part is the full
    rectangle ``rows x cols``: the zigzag blocks of other ranks) or ``("dense",)`` (any other
    mask, e.g. document boundaries: torch path with the explicit mask).
    """
    rows, cols = mask.any(1), mask.any(0)
    if not bool(rows.any()):
        return None
    Tq, Tk = mask.shape
    if Tq == Tk and torch.equal(mask, torch.ones_like(mask).tril()):
        return ("causal",)
    if torch.equal(mask, rows[:, None] & cols[None, :]):
        return ("sub", rows.nonzero().flatten(), cols.nonzero().flatten())
    return ("dense",)


def _runs(idx: torch.Tensor) -> list[torch.Tensor]:
    """Split local positions whose global indices ``idx`` are increasing into consecutive runs."""
    if idx.numel() == 0:
        return []
    cut = (torch.diff(idx) != 1).nonzero().flatten() + 1
    pos = torch.arange(idx.numel(), device=idx.device)
    return list(torch.tensor_split(pos, cut.tolist()))


def document_pieces(mask, q_index, k_index, q_doc, k_doc):
    """Split a block whose mask is cut by document boundaries into fused-kernel pieces.

    Per document, the rank's queries and keys form runs of consecutive global indices (a zigzag
    chunk intersected with the document); every (query run, key run) pair of one document is
    then empty, fully visible or causal (the same run). Returns ``("pieces", [(rows, cols,
    causal), ...])`` with local row / column indices, or ``("dense",)`` when some pair is none of
    these (the explicit-mask path).
    """
    pieces = []
    for d in torch.unique(q_doc).tolist():
        q_pos = (q_doc == d).nonzero().flatten()
        k_pos = (k_doc == d).nonzero().flatten()
        if k_pos.numel() == 0:
            continue
        for rq in _runs(q_index[q_pos]):
            rows = q_pos[rq]
            for rk in _runs(k_index[k_pos]):
                cols = k_pos[rk]
                plan = block_plan(mask[rows][:, cols])
                if plan is None:
                    continue
                if plan[0] == "causal":
                    pieces.append((rows, cols, True))
                elif plan[0] == "sub":
                    pieces.append((rows[plan[1]], cols[plan[2]], False))
                else:
                    return ("dense",)
    return ("pieces", pieces)


def _flash_block_fwd(fwd, plan, q, k, v, scale):
    if plan[0] == "causal":
        o, lse = fwd(q, k, v, softmax_scale=scale, causal=True)
        return o, lse
    pieces = plan[1] if plan[0] == "pieces" else [(plan[1], plan[2], False)]
    o = q.new_zeros(q.shape, dtype=torch.float32)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
    for rows, cols, causal in pieces:
        o_s, lse_s = fwd(q[:, rows].contiguous(), k[:, cols].contiguous(), v[:, cols].contiguous(),
                         softmax_scale=scale, causal=causal)
        o_m, lse_m = merge_partial(o[:, rows], lse[:, :, rows], o_s, lse_s)  # a row may see several pieces
        o[:, rows] = o_m
        lse[:, :, rows] = lse_m
    return o, lse


def _flash_block_bwd(bwd, plan, dout, q, k, v, out, lse, scale):
    if plan[0] == "causal":
        return bwd(dout, q, k, v, out, lse, softmax_scale=scale, causal=True)
    pieces = plan[1] if plan[0] == "pieces" else [(plan[1], plan[2], False)]
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    for rows, cols, causal in pieces:  # with the final out / lse every piece's share is independent
        sub = lambda t, rows=rows: t[:, rows].contiguous()  # noqa: E731
        dq_s, dk_s, dv_s = bwd(sub(dout), sub(q), k[:, cols].contiguous(), v[:, cols].contiguous(), sub(out),
                               lse[:, :, rows].contiguous(), softmax_scale=scale, causal=causal)
        dq[:, rows] += dq_s.float()
        dk[:, cols] += dk_s.float()
        dv[:, cols] += dv_s.float()
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, q_index, q_doc, kv_index, kv_doc, ring, flash):
        group, i, R, ranks = ring
        nxt, prv = ranks[(i + 1) % R], ranks[(i - 1) % R]
        kv = torch.stack((k, v)).contiguous()
        out = lse = None
        plans = []  # per step; dense masks are rebuilt in backward rather than kept ([Tq, Tk] each)
        for s in range(R):
            src = (i - s) % R
            if s < R - 1:
                nxt_kv, reqs = _start_shift(kv, nxt, prv, group)
            mask = attention_mask(q_index, kv_index[src], q_doc, kv_doc[src], causal)
            plan = block_plan(mask)
            if plan is not None and plan[0] == "dense" and flash is not None:  # documents cut the block
                plan = document_pieces(mask, q_index, kv_index[src], q_doc, kv_doc[src])
            if plan is not None and plan[0] != "dense" and flash is not None:
                o_b, l_b = _flash_block_fwd(flash[0], plan, q, kv[0], kv[1], scale)
            elif plan is not None:
                plan = ("dense",)
                o_b, l_b = block_attn_fwd(q, kv[0], kv[1], mask, scale)
            plans.append(plan)
            del mask
            if plan is not None:
                out, lse = merge_partial(out, lse, o_b, l_b)
            if s < R - 1:
                _wait(reqs)
                kv = nxt_kv
        if out is None:  # no visible key at all (cannot happen for causal self-attention)
            out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plans, ctx.scale, ctx.ring, ctx.flash = plans, scale, ring, flash
        ctx.index = (q_index, q_doc, kv_index, kv_doc, causal)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, i, R, ranks = ctx.ring
        nxt, prv = ranks[(i + 1) % R], ranks[(i - 1) % R]
        dout = dout.float()
        delta = (dout * out).sum(-1).transpose(1, 2)  # [B, Hq, Tq]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack((k, v)).contiguous()
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        dreqs: list = []
        q_index, q_doc, kv_index, kv_doc, causal = ctx.index
        for s in range(R):
            src = (i - s) % R
            if s < R - 1:
                nxt_kv, reqs = _start_shift(kv, nxt, prv, group)
            plan = ctx.plans[s]
            if plan is not None:
                if plan[0] == "dense":
                    mask = attention_mask(q_index, kv_index[src], q_doc, kv_doc[src], causal)
                    dq_b, dk_b, dv_b = block_attn_bwd(dout, q, kv[0], kv[1], lse, delta, mask, ctx.scale)
                else:
                    dq_b, dk_b, dv_b = _flash_block_bwd(
                        ctx.flash[1], plan, dout.to(q.dtype), q, kv[0], kv[1], out.to(q.dtype), lse, ctx.scale
                    )
                dq += dq_b
            # the accumulators of this K/V block were in flight during the compute above
            _wait(dreqs)
            if plan is not None:
                dkv[0] += dk_b
                dkv[1] += dv_b
            if R > 1:  # the accumulators travel with their K/V block; after R hops they are home
                dkv, dreqs = _start_shift(dkv, nxt, prv, group)
            if s < R - 1:
                _wait(reqs)
                kv = nxt_kv
        _wait(dreqs)
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)) + (None,) * 8


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_index: torch.Tensor,
    kv_index: torch.Tensor,
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
        q_index: int64 [Tq] global token index of each query.
        kv_index: int64 [R, Tk] global token indices of the keys held by each ring rank.
        cu_seqlens: int32 [N + 1] *global* document boundaries (B == 1), or None.
        ring: ``(group, ring_rank, ring_degree, global_ranks)`` of the ring.
        scale: logit scale, default ``Dh ** -0.5``.
        causal: causal mask on the global indices.
        use_flash: block kernels from :mod:`lctrain.kernels.flash_attn` (see :func:`flash_kernels`)
            for blocks whose mask is causal or a full rectangle; blocks cut by document
            boundaries always take the torch path.

    Returns:
        [B, Tq, Hq, Dh] in ``q.dtype``; differentiable w.r.t. q, k, v.
    """
    from lctrain.parallel.context.zigzag import doc_ids

    if scale is None:
        scale = q.shape[-1] ** -0.5
    q_doc = doc_ids(cu_seqlens, q_index)
    kv_doc = doc_ids(cu_seqlens, kv_index)
    flash = flash_kernels(use_flash, q.device)
    return _RingAttention.apply(
        q, k, v, float(scale), causal, q_index, q_doc, list(kv_index), list(kv_doc), ring, flash
    )
