"""MoBA block-sparse attention in plain torch (vectorised, autograd backward), plus the block
table, top-k block selection and (query, key block) pair layout shared with the Triton path.

Algorithm: Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs"
(arXiv:2502.13189); the exact semantics are in :mod:`lctrain.kernels.moba.naive`.

How it is computed (no [T, T] matrix anywhere):

1. **Block table.** Every batch row is cut into blocks per document (``cu_seqlens``); block ``g``
   of the flattened ``B * T`` tokens has a start and a length <= ``block_size``.
2. **Selection** (:func:`select_blocks`, ``no_grad``, fp32): block means ``[B, nb, Hkv, D]``,
   gate scores ``q . mean`` ``[B, Hq, T, nb]`` (processed in query chunks), non-past blocks set
   to ``-inf``, a *stable* descending sort (ties -> lower block index), the first
   ``K1 = top_k - 1`` columns kept where the query has that many past blocks. Result ``sel``
   int32 ``[B, Hq, T, K1]`` of global block ids, ``-1`` for unused slots.
3. **Own block**: causal attention inside each block, one ``[G * bs, D] x [D, bs]`` matmul per
   (block, kv head) with the GQA query heads stacked as rows (memory O(Hq T bs)).
4. **Selected past blocks**, key-block-major (the "transposed" view): every valid
   (query, head, slot) pair is sorted by its (kv head, key block) group, and each group is cut
   into segments of ``S`` pairs (:func:`pair_layout`). A segment holds up to ``S`` query rows
   (any tokens, any query heads of one GQA group) that all read the *same* key block, so one
   batched matmul ``[NSEG, S, D] x [NSEG, D, bs]`` scores them. Memory O(P (bs + D)) for
   ``P = B Hq T K1`` pairs, plus the gathered key blocks ``O((P / S + Hkv nb) bs D)``; no K/V
   is repeated per query.
5. **Merge**: every part keeps its unnormalised ``o = exp(s - m) v``, ``l = sum exp(s - m)``
   with a detached row maximum ``m``; per query ``M = max m_p``, ``L = sum_p e^{m_p - M} l_p``,
   ``lse = M + log L`` and ``out = sum_p e^{m_p - M} o_p / L`` (pair parts scattered back with
   ``index_add``). The result does not depend on the constants ``m``, so gradients are exact.

Backward is torch autograd through steps 3-5; the selection (step 2) is a constant, so the gate
scores get no gradient, as in MoBA's reference implementation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from lctrain.kernels.moba.naive import check_moba_inputs

__all__ = ["BlockTable", "block_table", "moba_attn_chunk", "pair_layout", "select_blocks"]

# pairs per segment in the torch path (rows of one batched matmul against a key block)
TORCH_SEGMENT = 128
# query chunk of the gate-score computation: at most this many score entries at a time
_SCORE_CHUNK = 1 << 24


@dataclass
class BlockTable:
    """Blocks of the flattened ``B * T`` tokens (block ``g = b * nb + j`` is row b's j-th).

    Attributes:
        B, T, block_size: the input's batch, length and block size.
        nb: blocks per batch row (same for every row).
        start_local, len_local: int64 [nb] first token (within the row) and length of block j.
        tok_blk: int64 [T] local block of each token; tok_first: int64 [T] first local block of
            the token's document (past blocks of token t are ``tok_first[t] <= j < tok_blk[t]``).
        start: int32 [B * nb] flattened first token of block g; length: int32 [B * nb].
    """

    B: int
    T: int
    block_size: int
    nb: int
    start_local: torch.Tensor
    len_local: torch.Tensor
    tok_blk: torch.Tensor
    tok_first: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor

    @property
    def total(self) -> int:
        return self.B * self.nb


def block_table(spans: list[tuple[int, int]], B: int, T: int, block_size: int, device) -> BlockTable:
    """Block table for documents ``spans`` (``[(start, end)]`` per row, as returned by
    :func:`lctrain.kernels.moba.naive.check_moba_inputs`) repeated over B rows."""
    bs = block_size
    doc_start = torch.tensor([s for s, _ in spans], dtype=torch.long)
    doc_len = torch.tensor([e - s for s, e in spans], dtype=torch.long)
    nbd = (doc_len + bs - 1) // bs
    nb = int(nbd.sum())
    doc_of_blk = torch.repeat_interleave(torch.arange(len(spans)), nbd)
    first_blk = torch.cumsum(nbd, 0) - nbd
    rank = torch.arange(nb) - first_blk[doc_of_blk]
    start_local = doc_start[doc_of_blk] + rank * bs
    len_local = torch.clamp(doc_len[doc_of_blk] - rank * bs, max=bs)
    tok_blk = torch.repeat_interleave(torch.arange(nb), len_local)
    tok_first = torch.repeat_interleave(first_blk[doc_of_blk], len_local)
    start = (torch.arange(B)[:, None] * T + start_local[None, :]).reshape(-1)
    length = len_local.repeat(B)
    return BlockTable(
        B=B,
        T=T,
        block_size=bs,
        nb=nb,
        start_local=start_local.to(device),
        len_local=len_local.to(device),
        tok_blk=tok_blk.to(device),
        tok_first=tok_first.to(device),
        start=start.to(device, torch.int32),
        length=length.to(device, torch.int32),
    )


def num_slots(T: int, block_size: int, top_k: int) -> int:
    """K1: selected past blocks stored per query, ``min(top_k - 1, ceil(T / bs) - 1)``, >= 0."""
    return max(0, min(top_k - 1, -(-T // block_size) - 1))


@torch.no_grad()
def select_blocks(q: torch.Tensor, k: torch.Tensor, tab: BlockTable, top_k: int) -> torch.Tensor:
    """Top-(top_k - 1) past key blocks per query by ``q . mean(K_block)`` in fp32 (MoBA gate).

    Args:
        q: [B, T, Hq, D]; k: [B, T, Hkv, D]; tab: their :class:`BlockTable`; top_k >= 1.

    Returns:
        int32 [B, Hq, T, K1] (K1 = :func:`num_slots`): global block ids (``b * nb + j``) in
        descending score order, ties to the lower block index; ``-1`` where the query has fewer
        than K1 past blocks in its document.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    K1 = num_slots(T, tab.block_size, top_k)
    sel = torch.full((B, Hq, T, K1), -1, dtype=torch.int32, device=q.device)
    if K1 == 0 or T == 0:
        return sel
    nb = tab.nb
    sums = torch.zeros(B, nb, Hkv, D, device=q.device, dtype=torch.float32)
    sums.index_add_(1, tab.tok_blk, k.float())
    means = sums / tab.len_local.to(torch.float32)[None, :, None, None]
    qf = q.float().view(B, T, Hkv, G, D)
    blk = torch.arange(nb, device=q.device)
    slot = torch.arange(K1, device=q.device)
    offset = (torch.arange(B, device=q.device) * nb).view(B, 1, 1, 1)
    step = max(1, _SCORE_CHUNK // max(1, B * Hq * nb))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        sc = torch.einsum("btkgd,bnkd->bkgtn", qf[:, t0:t1], means).reshape(B, Hq, t1 - t0, nb)
        own, first = tab.tok_blk[t0:t1], tab.tok_first[t0:t1]
        past = (blk[None, :] >= first[:, None]) & (blk[None, :] < own[:, None])  # [t, nb]
        sc = sc.masked_fill(~past, float("-inf"))
        idx = torch.sort(sc, dim=-1, descending=True, stable=True).indices[..., :K1]
        ok = slot[None, :] < (own - first)[:, None]  # [t, K1]
        sel[:, :, t0:t1] = torch.where(ok, idx + offset, -1).to(torch.int32)
    return sel


@dataclass
class PairLayout:
    """Valid (query, head, slot) pairs grouped by (kv head, key block), cut into segments.

    A pair id is the flat index into ``sel [B, Hq, T, K1]``. Group ``hkv * NBt + g`` holds the
    pairs of kv head ``hkv`` reading global block ``g`` (``NBt = B * nb``).

    Attributes:
        seg: pairs per segment (S).
        nseg: number of segments.
        seg_group: int32 [nseg] group of each segment.
        lane_pair: int32 [nseg * S] pair id per segment lane, ``-1`` for padding.
        inv: int64 [P] flat lane (``segment * S + lane``) of each pair, ``nseg * S`` if invalid.
        group_start, group_count: int32 [Hkv * NBt] range of each group in ``sorted_pairs``.
        sorted_pairs: int32 [n_valid] valid pair ids in group order.
    """

    seg: int
    nseg: int
    seg_group: torch.Tensor
    lane_pair: torch.Tensor
    inv: torch.Tensor
    group_start: torch.Tensor
    group_count: torch.Tensor
    sorted_pairs: torch.Tensor


@torch.no_grad()
def pair_layout(sel: torch.Tensor, Hkv: int, n_blocks: int, seg: int) -> PairLayout:
    """Key-block-major layout of the selected pairs (see :class:`PairLayout`).

    Args:
        sel: int32 [B, Hq, T, K1] from :func:`select_blocks`; Hkv: kv heads;
        n_blocks: global blocks ``B * nb``; seg: pairs per segment.
    """
    _, Hq, T, K1 = sel.shape
    dev = sel.device
    G = Hq // Hkv
    flat = sel.reshape(-1).long()
    P = flat.numel()
    if P >= 2**31:
        raise ValueError(f"too many (query, head, block) pairs for int32 indices: {P}")
    ids = torch.arange(P, device=dev)
    hkv = (ids // (T * K1)) % Hq // G
    NG = Hkv * n_blocks
    grp = torch.where(flat >= 0, hkv * n_blocks + flat, NG)
    order = torch.argsort(grp, stable=True)
    sgrp = grp[order]
    counts = torch.zeros(NG + 1, dtype=torch.long, device=dev).scatter_add_(0, grp, torch.ones_like(grp))
    gstart = torch.cumsum(counts, 0) - counts
    n_valid = int(gstart[NG])
    nseg_g = (counts[:NG] + seg - 1) // seg
    soff = torch.cumsum(nseg_g, 0) - nseg_g
    nseg = int(nseg_g.sum())
    order, sgrp = order[:n_valid], sgrp[:n_valid]
    rank = torch.arange(n_valid, device=dev) - gstart[sgrp]
    lane = (soff[sgrp] + rank // seg) * seg + rank % seg
    lane_pair = torch.full((nseg * seg,), -1, dtype=torch.int32, device=dev)
    lane_pair[lane] = order.to(torch.int32)
    seg_group = torch.zeros(nseg, dtype=torch.int32, device=dev)
    seg_group[lane // seg] = sgrp.to(torch.int32)
    inv = torch.full((P,), nseg * seg, dtype=torch.long, device=dev)
    inv[order] = lane
    return PairLayout(
        seg=seg,
        nseg=nseg,
        seg_group=seg_group,
        lane_pair=lane_pair,
        inv=inv,
        group_start=gstart[:NG].to(torch.int32),
        group_count=counts[:NG].to(torch.int32),
        sorted_pairs=order.to(torch.int32),
    )


def merge_parts(o_own, lse_own, o_pair, lse_pair):
    """Merge normalised partial softmaxes (the Triton path's parts) of every query.

    Args:
        o_own [B, Hq, T, D], lse_own [B, Hq, T]; o_pair [B, Hq, T, K1, D],
        lse_pair [B, Hq, T, K1] (``-inf`` for unused slots, whose ``o_pair`` must be finite).

    Returns:
        (out [B, Hq, T, D], lse [B, Hq, T]), fp32: ``lse = logsumexp_p lse_p``,
        ``out = sum_p exp(lse_p - lse) o_p``.
    """
    lse_parts = torch.cat([lse_own[..., None], lse_pair], -1)
    lse = torch.logsumexp(lse_parts, -1)
    w = torch.exp(lse_parts - lse[..., None])
    out = w[..., 0, None] * o_own + (w[..., 1:, None] * o_pair).sum(-2)
    return out, lse


def _softmax_parts(s, v):
    """Unnormalised softmax of scores ``s`` [N, R, C] against ``v`` [N, C, D] -> (o, m, l):
    ``m`` the (detached) row maxima, ``l = sum exp(s - m)``, ``o = exp(s - m) @ v``."""
    m = s.detach().amax(-1, keepdim=True)
    e = s.sub_(m).exp_()  # in place: bmm/baddbmm backward does not need its output
    return torch.bmm(e, v), m[..., 0], e.sum(-1)


def _own_block(qs, kf, vf, tab: BlockTable):
    """Causal attention inside each block, GQA heads stacked as rows of one matmul per block.

    qs: scaled fp32 q [B, T, Hq, D]. Returns unnormalised (o [B, T, Hq, D], m, l [B, T, Hq]).
    """
    B, T, Hq, D = qs.shape
    Hkv = kf.shape[2]
    G = Hq // Hkv
    bs, nb = tab.block_size, tab.nb
    dev = qs.device
    ar = torch.arange(bs, device=dev)
    # padding slots of a partial block read the row's last token: as keys they are causally
    # masked for every real row, and padding rows are dropped at the end
    idx = torch.clamp(tab.start_local[:, None] + ar[None, :], max=T - 1)  # [nb, bs]
    # [B, nb, bs, Hkv, G, D] -> [B * Hkv * nb, G * bs, D]
    qo = qs.view(B, T, Hkv, G, D)[:, idx].permute(0, 3, 1, 4, 2, 5).reshape(B * Hkv * nb, G * bs, D)
    ko = kf[:, idx].permute(0, 3, 1, 2, 4).reshape(B * Hkv * nb, bs, D)
    vo = vf[:, idx].permute(0, 3, 1, 2, 4).reshape(B * Hkv * nb, bs, D)
    bias = torch.zeros(bs, bs, device=dev).masked_fill_(ar[None, :] > ar[:, None], float("-inf"))
    s = torch.baddbmm(bias.repeat(G, 1), qo, ko.transpose(1, 2))  # [B Hkv nb, G bs, bs]
    o, m, l = _softmax_parts(s, vo)
    slot = tab.tok_blk * bs + (torch.arange(T, device=dev) - tab.start_local[tab.tok_blk])

    def tokens(x):  # [B * Hkv * nb, G * bs, ...] -> [B, T, Hq, ...]
        x = x.reshape(B, Hkv, nb, G, bs, *x.shape[2:]).permute(0, 2, 4, 1, 3, *range(5, x.dim() + 3))
        return x.reshape(B, nb * bs, Hq, *x.shape[5:])[:, slot]

    return tokens(o), tokens(m), tokens(l)


def _pairs(qs, kf, vf, tab: BlockTable, sel, seg: int):
    """Attention of every (query, slot) pair to its whole selected block, key-block-major.

    qs: scaled fp32 q [B, T, Hq, D]. Returns, per segment lane (``NL = nseg * S`` lanes),
    unnormalised ``o`` [NL, D], ``m``, ``l`` [NL], the lane's row ``qrow`` [NL] in
    ``q.reshape(B * T * Hq, D)``, its pair id ``pair`` [NL] (``-1`` for padding) and the layout.
    """
    _, T, Hq, D = qs.shape
    Hkv = kf.shape[2]
    K1 = sel.shape[-1]
    bs = tab.block_size
    lay = pair_layout(sel, Hkv, tab.total, seg)
    dev = qs.device
    pair = lay.lane_pair.long()
    lp = pair.clamp(min=0)  # padding lanes read pair 0; their weight is 0
    h = (lp // (T * K1)) % Hq
    b = lp // (T * K1 * Hq)
    t = (lp // K1) % T
    qrow = (b * T + t) * Hq + h
    qg = qs.reshape(-1, D)[qrow.view(lay.nseg, seg)]  # [NSEG, S, D]
    grp = lay.seg_group.long()
    hkv, g = grp // tab.total, grp % tab.total
    tok = tab.start.long()[g][:, None] + torch.arange(bs, device=dev)[None, :]  # selected blocks are full
    krow = tok * Hkv + hkv[:, None]  # [NSEG, bs]
    kg = kf.reshape(-1, D)[krow]
    vg = vf.reshape(-1, D)[krow]
    o, m, l = _softmax_parts(torch.bmm(qg, kg.transpose(1, 2)), vg)  # [NSEG, S, D], [NSEG, S]
    return o.reshape(-1, D), m.reshape(-1), l.reshape(-1), qrow, pair, lay


def moba_attn_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    top_k: int,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA attention, torch path: ``(out, lse)``, differentiable with torch autograd.

    Args:
        q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with ``Hq % Hkv == 0`` (GQA: query head ``h``
            reads kv head ``h // (Hq // Hkv)``); any float dtype (computed in fp32).
        block_size: key block length (>= 1); blocks restart at every document start.
        top_k: selected blocks per query including its own (>= 1).
        cu_seqlens: optional int32 [N + 1] document boundaries of a packed row (B == 1).
        scale: logit scale, default ``D ** -0.5``.

    Returns:
        ``out`` [B, T, Hq, D] in q's dtype and ``lse`` fp32 natural-log [B, Hq, T].

    Raises:
        ValueError: as :func:`lctrain.kernels.moba.naive.check_moba_inputs`.

    Reference: Lu et al. 2025, MoBA (arXiv:2502.13189); the selection has no gradient.
    """
    spans = check_moba_inputs(q, k, v, block_size, top_k, cu_seqlens)
    if spans is None:  # torch.compile tracing with cu_seqlens: read the boundaries (graph break)
        bounds = cu_seqlens.tolist()
        spans = list(itertools.pairwise(bounds))
    B, T, Hq, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    if T == 0:
        return torch.empty_like(q), q.new_empty((B, Hq, 0), dtype=torch.float32)
    tab = block_table(spans, B, T, block_size, q.device)
    sel = select_blocks(q, k, tab, top_k)
    return moba_attn_chunk_selected(q, k, v, tab, sel, scale)


def moba_attn_chunk_selected(
    q, k, v, tab: BlockTable, sel: torch.Tensor, scale: float, seg: int = TORCH_SEGMENT
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of :func:`moba_attn_chunk` for a given selection ``sel`` [B, Hq, T, K1]
    (from :func:`select_blocks`); returns ``(out [B, T, Hq, D] in q's dtype, lse fp32)``."""
    B, T, Hq, D = q.shape
    K1 = sel.shape[-1]
    qs, kf, vf = q.float() * scale, k.float(), v.float()
    o_own, m_own, l_own = _own_block(qs, kf, vf, tab)  # [B, T, Hq, (D)]
    if K1 == 0:
        out, lse = o_own / l_own[..., None], m_own + torch.log(l_own)
        return out.to(q.dtype), lse.transpose(1, 2)
    o_lane, m_lane, l_lane, qrow, pair, lay = _pairs(qs, kf, vf, tab, sel, seg)
    # merge the 1 + K1 parts of every query: per-part scalars in the pair layout [B, Hq, T, K1]
    m_pair = torch.cat([m_lane, m_lane.new_full((1,), float("-inf"))])[lay.inv].view(B, Hq, T, K1)
    l_pair = torch.cat([l_lane, l_lane.new_zeros(1)])[lay.inv].view(B, Hq, T, K1)
    m_parts = torch.cat([m_own.transpose(1, 2)[..., None], m_pair], -1)  # [B, Hq, T, 1 + K1]
    m = m_parts.amax(-1, keepdim=True)  # finite (own block), a constant: gradients stay exact
    a = torch.exp(m_parts - m)  # 0 for unused slots
    big_l = a[..., 0] * l_own.transpose(1, 2) + (a[..., 1:] * l_pair).sum(-1)  # [B, Hq, T]
    lse = m[..., 0] + torch.log(big_l)
    w_own = (a[..., 0] / big_l).transpose(1, 2)  # [B, T, Hq]
    w_pair = (a[..., 1:] / big_l[..., None]).reshape(-1)  # [P]
    w_lane = torch.where(pair >= 0, w_pair[pair.clamp(min=0)], 0.0)
    out = (o_own * w_own[..., None]).reshape(B * T * Hq, D)
    out = out.index_add(0, qrow, o_lane * w_lane[:, None])
    return out.view(B, T, Hq, D).to(q.dtype), lse
