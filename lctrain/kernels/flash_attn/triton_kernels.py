"""Triton kernels of FlashAttention-2 with log-sum-exp output (forward, dK/dV, dQ).

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(2023), Algorithm 1 (forward with online softmax, Milakov & Gimelshein 2018) and Algorithm 2
(backward, recomputing ``P = exp(S - L)`` from the saved log-sum-exp ``L`` and using
``D_i = rowsum(dO_i * O_i)``), split into a key-block-parallel dK/dV kernel and a
query-block-parallel dQ kernel so no atomics are needed.

Every kernel works on the packed layout ``[total, H, D]`` with int32 ``cu_seqlens`` (a dense
batch is packed by the caller with uniform boundaries). Grid: (blocks of the longest sequence,
number of sequences, heads). Scores are formed in base 2: ``s2 = (q . k) * scale * log2(e)``,
so ``exp`` becomes ``exp2``; ``lse`` is stored in natural-log units.

Masking (FlashAttention >= 2.1 convention): with ``off = seqlen_k - seqlen_q``, query ``i``
sees key ``j`` iff ``i + off - left <= j <= i + off + right``; ``HAS_LEFT``/``HAS_RIGHT`` are
compile-time switches for finite bounds (``causal`` is ``right = 0``). Key (query) blocks
entirely outside the band are skipped by the loop bounds, and tiles entirely inside it skip the
mask (:func:`_interior`); only boundary tiles build and apply it. Rows without any visible key give
``out = 0``, ``lse = -inf``; the backward treats ``lse = -inf`` as ``+inf`` so such rows have
``P = 0``. All products accumulate in fp32; ``P`` and ``dS`` are cast to the input dtype before
their matmuls (as FlashAttention does for fp16/bf16).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _band_mask(
    rows,
    cols,
    seqlen_q,
    seqlen_k,
    off,
    window_left,
    window_right,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
):
    """[len(rows), len(cols)] validity mask: in range and inside the (causal/window) band."""
    mask = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    if HAS_RIGHT:
        mask = mask & (cols[None, :] <= rows[:, None] + off + window_right)
    if HAS_LEFT:
        mask = mask & (cols[None, :] >= rows[:, None] + off - window_left)
    return mask


@triton.jit
def _interior(
    start_m,
    start_n,
    seqlen_q,
    seqlen_k,
    off,
    window_left,
    window_right,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Whether the (query block, key block) tile is fully in range and inside the band: no mask needed.

    Only boundary tiles (the diagonal of a causal band, window edges, partial last blocks) pay
    for the mask; the interior of the band skips it.
    """
    inside = (start_m + BLOCK_M <= seqlen_q) & (start_n + BLOCK_N <= seqlen_k)
    if HAS_RIGHT:  # every key j <= every query i + off + right: the largest j against the smallest i
        inside = inside & (start_n + BLOCK_N - 1 <= start_m + off + window_right)
    if HAS_LEFT:  # every key j >= every query i + off - left: the smallest j against the largest i
        inside = inside & (start_n >= start_m + BLOCK_M - 1 + off - window_left)
    return inside


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    CU_Q,
    CU_K,
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
    window_left,
    window_right,
    head_dim,
    GROUP: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    seq = tl.program_id(0)  # sequences on grid axis x (no 65,535 limit)
    pid_m = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CU_Q + seq)
    k_start = tl.load(CU_K + seq)
    seqlen_q = tl.load(CU_Q + seq + 1) - q_start
    seqlen_k = tl.load(CU_K + seq + 1) - k_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    off = seqlen_k - seqlen_q
    hk = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = rows < seqlen_q
    q = tl.load(
        Q + (q_start + rows)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = 0
    hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(start_m + off - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(start_m + BLOCK_M + off + window_right, seqlen_k)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        kv_off = (k_start + cols)[:, None].to(tl.int64)
        k = tl.load(
            K + kv_off * stride_kt + hk * stride_kh + offs_d[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        if not _interior(start_m, start_n, seqlen_q, seqlen_k, off, window_left, window_right, HAS_LEFT, HAS_RIGHT,
                         BLOCK_M, BLOCK_N):
            mask = _band_mask(rows, cols, seqlen_q, seqlen_k, off, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with nothing visible yet keep m = -inf; subtract 0 there instead (avoids -inf - -inf)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + kv_off * stride_vt + hk * stride_vh + offs_d[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(
        O + (q_start + rows)[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :],
        acc.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + h * stride_lh + q_start + rows, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    CU_Q,
    CU_K,
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
    scale,
    scale_log2,
    window_left,
    window_right,
    head_dim,
    GROUP: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    seq = tl.program_id(0)  # sequences on grid axis x
    pid_n = tl.program_id(1)
    hk = tl.program_id(2)
    q_start = tl.load(CU_Q + seq)
    k_start = tl.load(CU_K + seq)
    seqlen_q = tl.load(CU_Q + seq + 1) - q_start
    seqlen_k = tl.load(CU_K + seq + 1) - k_start
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    off = seqlen_k - seqlen_q
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    col_ok = cols < seqlen_k
    kv_off = (k_start + cols)[:, None].to(tl.int64)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    hi = seqlen_q
    if HAS_RIGHT:  # queries i with j <= i + off + right, i.e. i >= j - off - right
        lo = tl.maximum(start_n - off - window_right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:  # queries i with j >= i + off - left, i.e. i <= j - off + left
        hi = tl.minimum(start_n + BLOCK_N - off + window_left, seqlen_q)
    for g in range(GROUP):
        h = hk * GROUP + g
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < seqlen_q
            q_off = (q_start + rows)[:, None].to(tl.int64)
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + q_off * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + q_off * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            delta = tl.load(DELTA + h * stride_lh + q_start + rows, mask=row_ok, other=0.0)
            # transposed scores [BLOCK_N, BLOCK_M] so dK/dV accumulate without transposing them
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2
            p_t = tl.exp2(s_t - lse[None, :])
            if not _interior(start_m, start_n, seqlen_q, seqlen_k, off, window_left, window_right, HAS_LEFT,
                             HAS_RIGHT, BLOCK_M, BLOCK_N):
                mask_t = tl.trans(
                    _band_mask(
                        rows, cols, seqlen_q, seqlen_k, off, window_left, window_right, HAS_LEFT, HAS_RIGHT
                    )
                )
                p_t = tl.where(mask_t, p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * scale
    tl.store(
        DK + kv_off * stride_dkt + hk * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask
    )
    tl.store(
        DV + kv_off * stride_dvt + hk * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask
    )


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    CU_Q,
    CU_K,
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
    window_left,
    window_right,
    head_dim,
    GROUP: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    seq = tl.program_id(0)  # sequences on grid axis x (no 65,535 limit)
    pid_m = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CU_Q + seq)
    k_start = tl.load(CU_K + seq)
    seqlen_q = tl.load(CU_Q + seq + 1) - q_start
    seqlen_k = tl.load(CU_K + seq + 1) - k_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    off = seqlen_k - seqlen_q
    hk = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = rows < seqlen_q
    q_off = (q_start + rows)[:, None].to(tl.int64)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + q_off * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + h * stride_lh + q_start + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = 0
    hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(start_m + off - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(start_m + BLOCK_M + off + window_right, seqlen_k)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        kv_off = (k_start + cols)[:, None].to(tl.int64)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        p = tl.exp2(s - lse[:, None])
        if not _interior(start_m, start_n, seqlen_q, seqlen_k, off, window_left, window_right, HAS_LEFT, HAS_RIGHT,
                         BLOCK_M, BLOCK_N):
            mask = _band_mask(rows, cols, seqlen_q, seqlen_k, off, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(mask, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * scale
    tl.store(
        DQ + q_off * stride_dqt + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask
    )
