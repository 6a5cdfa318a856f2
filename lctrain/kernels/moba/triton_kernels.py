"""Triton kernels of MoBA block-sparse attention (Lu et al. 2025, arXiv:2502.13189).

Work is split the way :mod:`lctrain.kernels.moba.chunk` splits it, so that no tile ever mixes
rows that need different keys:

* **Own block** (``_own_fwd_kernel``, ``_own_dq_kernel``): one program per (tile of
  ``BLOCK_M`` query rows inside one MoBA block, query head). A block of ``block_size`` rows has
  ``cdiv(block_size, BLOCK_M)`` tiles; tiles never straddle two MoBA blocks. Keys are the
  block's own, causal, in ``BLOCK_N`` chunks.
* **Selected past blocks** (``_pair_fwd_kernel``, ``_pair_dq_kernel``): one program per
  *segment*, i.e. up to ``BLOCK_M`` (query token, query head, slot) pairs that all selected the
  same key block of the same kv head (built in torch by
  :func:`lctrain.kernels.moba.chunk.pair_layout`). Its rows are gathered per lane (any tokens,
  any query heads of one GQA group), the key block is read once in ``BLOCK_N`` chunks. Every
  pair writes its own normalised partial output and log-sum-exp (forward) or partial dq
  (backward) to a per-pair fp32 buffer; torch merges the ``1 + K1`` parts per query.
  This is the transposed (key-block-major) view of the per-query selection: a tile never
  iterates over the union of its rows' selections, so the work stays ``O(T top_k bs)`` even
  when neighbouring queries choose different blocks.
* **dK/dV** (``_dkdv_kernel``): one program per (``BLOCK_N`` keys of one MoBA block, kv head)
  accumulates in registers over the block's own queries (causal, all query heads of the group)
  and then over all pairs that selected this block (a contiguous range of the group-sorted
  pair list), so every key row is written by exactly one program: no atomics, deterministic.

FlashAttention-2 numerics (Dao 2023, Alg. 1 and 2): online softmax in base 2
(``s2 = q . k * scale * log2 e``), fp32 accumulation, lse stored in natural log; the backward
recomputes ``P = exp(s - lse)`` with the *final* (merged) lse of the query and uses
``delta = rowsum(dO * O) - dlse``, so each part's contribution to dq/dk/dv is exact.
Token tensors are the flattened ``[B * T, H, D]`` layout; a pair id ``p`` is the flat index of
``[B, Hq, T, K1]`` and is decoded in-kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

# host-side constant; the kernels spell it out (the compiler rejects non-constexpr globals)
LOG2E = 1.4426950408889634


@triton.jit
def _decode_pair(pid, T, Hq, K1):
    """pair id -> (flattened token b * T + t, query head h)."""
    rest = pid // K1
    t = rest % T
    rest = rest // T
    h = rest % Hq
    b = rest // Hq
    return b * T + t, h


@triton.jit
def _own_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    BLK_START,
    BLK_LEN,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lh,
    scale_log2,
    head_dim,
    tiles_per_block,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    g = pid // tiles_per_block
    start_m = (pid % tiles_per_block) * BLOCK_M
    blk_start = tl.load(BLK_START + g)
    blk_len = tl.load(BLK_LEN + g)
    if start_m >= blk_len:
        return
    hk = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = rows < blk_len
    tok = (blk_start + rows).to(tl.int64)
    q = tl.load(
        Q + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, blk_len)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < blk_len
        ktok = (blk_start + cols).to(tl.int64)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + ktok[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        mask = (cols[None, :] <= rows[:, None]) & col_ok[None, :]
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + ktok[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows; every real row sees its diagonal
    acc = acc / l_safe[:, None]
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(
        O + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        acc.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + h * stride_lh + tok, lse, mask=row_ok)


@triton.jit
def _pair_fwd_kernel(
    Q,
    K,
    V,
    OP,
    LSEP,
    SEG_GROUP,
    LANE_PAIR,
    BLK_START,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_op,
    T,
    Hq,
    K1,
    n_blocks,
    block_size,
    scale_log2,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    sid = tl.program_id(0)
    grp = tl.load(SEG_GROUP + sid)
    hk = grp // n_blocks
    blk_start = tl.load(BLK_START + grp % n_blocks)
    lanes = sid * BLOCK_M + tl.arange(0, BLOCK_M)
    pid = tl.load(LANE_PAIR + lanes)
    row_ok = pid >= 0
    pid = tl.where(row_ok, pid, 0)
    tok, h = _decode_pair(pid, T, Hq, K1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q = tl.load(
        Q + tok.to(tl.int64)[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, block_size, BLOCK_N):  # a selected past block is always full
        cols = start_n + offs_n
        col_ok = cols < block_size
        ktok = (blk_start + cols).to(tl.int64)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + ktok[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + ktok[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    prow = pid.to(tl.int64)
    tl.store(OP + prow[:, None] * stride_op + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSEP + prow, lse, mask=row_ok)


@triton.jit
def _own_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    BLK_START,
    BLK_LEN,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    stride_lh,
    scale,
    scale_log2,
    head_dim,
    tiles_per_block,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    g = pid // tiles_per_block
    start_m = (pid % tiles_per_block) * BLOCK_M
    blk_start = tl.load(BLK_START + g)
    blk_len = tl.load(BLK_LEN + g)
    if start_m >= blk_len:
        return
    hk = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = rows < blk_len
    tok = (blk_start + rows).to(tl.int64)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + tok[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + h * stride_lh + tok, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + h * stride_lh + tok, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, blk_len)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < blk_len
        ktok = (blk_start + cols).to(tl.int64)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + ktok[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + ktok[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        mask = (cols[None, :] <= rows[:, None]) & col_ok[None, :] & row_ok[:, None]
        p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * scale
    tl.store(DQ + tok[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq, mask=q_mask)


@triton.jit
def _pair_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQP,
    SEG_GROUP,
    LANE_PAIR,
    BLK_START,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqp,
    stride_lh,
    T,
    Hq,
    K1,
    n_blocks,
    block_size,
    scale,
    scale_log2,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    sid = tl.program_id(0)
    grp = tl.load(SEG_GROUP + sid)
    hk = grp // n_blocks
    blk_start = tl.load(BLK_START + grp % n_blocks)
    lanes = sid * BLOCK_M + tl.arange(0, BLOCK_M)
    pid = tl.load(LANE_PAIR + lanes)
    row_ok = pid >= 0
    pid = tl.where(row_ok, pid, 0)
    tok, h = _decode_pair(pid, T, Hq, K1)
    tok = tok.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_ptr = Q + tok[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :]
    do_ptr = DO + tok[:, None] * stride_dot + h[:, None] * stride_doh + offs_d[None, :]
    q = tl.load(q_ptr, mask=q_mask, other=0.0)
    do = tl.load(do_ptr, mask=q_mask, other=0.0)
    lse = tl.load(LSE + h * stride_lh + tok, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + h * stride_lh + tok, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, block_size, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < block_size
        ktok = (blk_start + cols).to(tl.int64)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + ktok[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + ktok[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        p = tl.where(col_ok[None, :] & row_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * scale
    tl.store(DQP + pid.to(tl.int64)[:, None] * stride_dqp + offs_d[None, :], dq, mask=q_mask)


@triton.jit
def _dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    BLK_START,
    BLK_LEN,
    GROUP_START,
    GROUP_COUNT,
    SORTED_PAIRS,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_lh,
    T,
    Hq,
    K1,
    n_blocks,
    scale,
    scale_log2,
    head_dim,
    tiles_per_block,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    g = pid // tiles_per_block
    start_n = (pid % tiles_per_block) * BLOCK_N
    blk_start = tl.load(BLK_START + g)
    blk_len = tl.load(BLK_LEN + g)
    if start_n >= blk_len:
        return
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    col_ok = cols < blk_len
    ktok = (blk_start + cols).to(tl.int64)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + ktok[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + ktok[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # (a) the block's own queries, causal (rows >= cols), every query head of the GQA group
    lo = (start_n // BLOCK_M) * BLOCK_M
    for gi in range(GROUP):
        h = hk * GROUP + gi
        for start_m in range(lo, blk_len, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < blk_len
            tok = (blk_start + rows).to(tl.int64)
            q_mask = row_ok[:, None] & d_ok[None, :]
            q_ptr = Q + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
            do_ptr = DO + tok[:, None] * stride_dot + h * stride_doh + offs_d[None, :]
            q = tl.load(q_ptr, mask=q_mask, other=0.0)
            do = tl.load(do_ptr, mask=q_mask, other=0.0)
            lse = tl.load(LSE + h * stride_lh + tok, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + h * stride_lh + tok, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2  # [BLOCK_N, BLOCK_M]
            mask_t = (cols[:, None] <= rows[None, :]) & col_ok[:, None] & row_ok[None, :]
            p_t = tl.where(mask_t, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    # (b) every (query, head, slot) pair that selected this block (contiguous in SORTED_PAIRS)
    grp = hk * n_blocks + g
    p_lo = tl.load(GROUP_START + grp)
    p_hi = p_lo + tl.load(GROUP_COUNT + grp)
    for start_p in range(p_lo, p_hi, BLOCK_M):
        idx = start_p + offs_m
        row_ok = idx < p_hi
        pair = tl.load(SORTED_PAIRS + idx, mask=row_ok, other=0)
        tok, h = _decode_pair(pair, T, Hq, K1)
        tok = tok.to(tl.int64)
        q_mask = row_ok[:, None] & d_ok[None, :]
        q_ptr = Q + tok[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :]
        do_ptr = DO + tok[:, None] * stride_dot + h[:, None] * stride_doh + offs_d[None, :]
        q = tl.load(q_ptr, mask=q_mask, other=0.0)
        do = tl.load(do_ptr, mask=q_mask, other=0.0)
        lse = tl.load(LSE + h * stride_lh + tok, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + h * stride_lh + tok, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2
        mask_t = col_ok[:, None] & row_ok[None, :]
        p_t = tl.where(mask_t, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * scale
    dk_ptr = DK + ktok[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :]
    dv_ptr = DV + ktok[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :]
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=kv_mask)
