"""Triton kernels of Lightning Attention-2 (forward and backward).

Qin et al., "Lightning Attention-2" (arXiv:2401.04658), Alg. 1 (forward) and Alg. 2 (backward).
Per head with ``b = -slope * log2(e)`` (so ``lambda^n = exp2(b n)``), a block of ``C`` tokens
(``C_eff <= C`` real ones in a sequence's last block), ``S`` the [K, V] state entering it and
``i, j`` positions inside it, ``M_ij = lambda^(i-j)`` for ``i >= j`` else 0::

    O     = scale (Q * lambda^(i+1)) S + scale (Q K^T * M) V                     (intra + inter)
    S'    = lambda^C_eff S + (K * lambda^(C_eff-1-j))^T V
    dQ    = scale (dO S^T * lambda^(i+1)) + scale (dO V^T * M) K
    dK    = scale (dO V^T * M)^T Q + (V dS'^T) * lambda^(C_eff-1-j)
    dV    = scale (Q K^T * M)^T dO + (K dS') * lambda^(C_eff-1-j)
    dS    = lambda^C_eff dS' + scale (Q * lambda^(i+1))^T dO                    (backward in time)

Kernels: ``_state_fwd`` walks the blocks of one sequence in order and writes the state entering
each block (fp32 [num_blocks, H, K, V]) plus the final state; ``_output_fwd`` computes O for every
block in parallel; ``_state_bwd`` walks backwards writing dS' per block and d(initial state);
``_block_bwd`` computes dQ, dK, dV per block in parallel. The forward states are recomputed in
backward instead of stored across the autograd boundary.

Layout: packed ``[total, H, D]`` tokens with int32 ``cu_seqlens``; blocks are enumerated
sequence-major and ``BLOCK_SEQ``/``BLOCK_IDX`` map a global block to (sequence, block in
sequence); ``BLOCK_OFF[n]`` is the first global block of sequence ``n``. Decay factors are
``where``-masked on padding rows so no ``0 * inf`` can appear under strong decay. Matmuls take
their operands in the input dtype (the fp32 states are cast to it, as fla does) and accumulate in
fp32; ``DOT_PREC`` is ``"ieee"`` for fp32 inputs so fp32 runs are exact, ``"tf32"`` otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _state_fwd(
    K,
    V,
    H0,
    HT,
    STATES,
    CU,
    BLOCK_OFF,
    SLOPE,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    num_heads,
    dim_k,
    dim_v,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_nh = tl.program_id(0)  # N * H on grid axis x (no 65,535 limit)
    pid_k = tl.program_id(1)
    pid_v = tl.program_id(2)
    n = pid_nh // num_heads
    h = pid_nh % num_heads
    start = tl.load(CU + n)
    seqlen = tl.load(CU + n + 1) - start
    blk0 = tl.load(BLOCK_OFF + n)
    b = -tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    offs_c = tl.arange(0, C)
    k_ok = offs_k < dim_k
    v_ok = offs_v < dim_v
    kv_mask = k_ok[:, None] & v_ok[None, :]
    state_off = offs_k[:, None] * dim_v + offs_v[None, :]
    if HAS_H0:
        s = tl.load(H0 + pid_nh.to(tl.int64) * dim_k * dim_v + state_off, mask=kv_mask, other=0.0).to(
            tl.float32
        )
    else:
        s = tl.zeros([BK, BV], tl.float32)
    num_blocks = tl.cdiv(seqlen, C)
    for c in range(num_blocks):
        blk = (blk0 + c).to(tl.int64)
        tl.store(STATES + (blk * num_heads + h) * dim_k * dim_v + state_off, s, mask=kv_mask)
        rows = c * C + offs_c
        row_ok = rows < seqlen
        c_eff = tl.minimum(seqlen - c * C, C)
        tok = (start + rows).to(tl.int64)
        # K^T tile [BK, C]
        k_t = tl.load(
            K + tok[None, :] * stride_kt + h * stride_kh + offs_k[:, None],
            mask=k_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            V + tok[:, None] * stride_vt + h * stride_vh + offs_v[None, :],
            mask=row_ok[:, None] & v_ok[None, :],
            other=0.0,
        )
        to_end = tl.where(row_ok, tl.exp2(b * tl.maximum(c_eff - 1 - offs_c, 0).to(tl.float32)), 0.0)
        k_dec = (k_t * to_end[None, :]).to(v.dtype)
        s = s * tl.exp2(b * c_eff.to(tl.float32)) + tl.dot(k_dec, v, input_precision=DOT_PREC)
    if STORE_HT:
        tl.store(HT + pid_nh.to(tl.int64) * dim_k * dim_v + state_off, s, mask=kv_mask)


@triton.jit
def _output_fwd(
    Q,
    K,
    V,
    O,
    STATES,
    CU,
    BLOCK_SEQ,
    BLOCK_IDX,
    SLOPE,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    num_heads,
    dim_k,
    dim_v,
    scale,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    blk = tl.program_id(0)  # blocks on grid axis x
    pid_v = tl.program_id(1)
    h = tl.program_id(2)
    n = tl.load(BLOCK_SEQ + blk)
    c = tl.load(BLOCK_IDX + blk)
    start = tl.load(CU + n)
    seqlen = tl.load(CU + n + 1) - start
    b = -tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    rows = c * C + offs_c
    row_ok = rows < seqlen
    k_ok = offs_k < dim_k
    v_ok = offs_v < dim_v
    tok = (start + rows).to(tl.int64)
    q = tl.load(
        Q + tok[:, None] * stride_qt + h * stride_qh + offs_k[None, :],
        mask=row_ok[:, None] & k_ok[None, :],
        other=0.0,
    )
    k = tl.load(
        K + tok[:, None] * stride_kt + h * stride_kh + offs_k[None, :],
        mask=row_ok[:, None] & k_ok[None, :],
        other=0.0,
    )
    v = tl.load(
        V + tok[:, None] * stride_vt + h * stride_vh + offs_v[None, :],
        mask=row_ok[:, None] & v_ok[None, :],
        other=0.0,
    )
    s = tl.load(
        STATES
        + (blk.to(tl.int64) * num_heads + h) * dim_k * dim_v
        + offs_k[:, None] * dim_v
        + offs_v[None, :],
        mask=k_ok[:, None] & v_ok[None, :],
        other=0.0,
    )
    # decay mask M_ij = lambda^(i-j), i >= j (the exponent is clamped at 0 above the diagonal)
    diff = offs_c[:, None] - offs_c[None, :]
    m = tl.where(diff >= 0, tl.exp2(b * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    a = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * m
    o = tl.dot(a.to(v.dtype), v, input_precision=DOT_PREC)
    q_dec = (q * tl.exp2(b * (offs_c + 1).to(tl.float32))[:, None]).to(v.dtype)
    o += tl.dot(q_dec, s.to(v.dtype), input_precision=DOT_PREC)
    tl.store(
        O + tok[:, None] * stride_ot + h * stride_oh + offs_v[None, :],
        (o * scale).to(O.dtype.element_ty),
        mask=row_ok[:, None] & v_ok[None, :],
    )


@triton.jit
def _state_bwd(
    Q,
    DO,
    DHT,
    DH0,
    DSTATES,
    CU,
    BLOCK_OFF,
    SLOPE,
    stride_qt,
    stride_qh,
    stride_dot,
    stride_doh,
    num_heads,
    dim_k,
    dim_v,
    scale,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_nh = tl.program_id(0)  # N * H on grid axis x (no 65,535 limit)
    pid_k = tl.program_id(1)
    pid_v = tl.program_id(2)
    n = pid_nh // num_heads
    h = pid_nh % num_heads
    start = tl.load(CU + n)
    seqlen = tl.load(CU + n + 1) - start
    blk0 = tl.load(BLOCK_OFF + n)
    b = -tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    offs_c = tl.arange(0, C)
    k_ok = offs_k < dim_k
    v_ok = offs_v < dim_v
    kv_mask = k_ok[:, None] & v_ok[None, :]
    state_off = offs_k[:, None] * dim_v + offs_v[None, :]
    if HAS_DHT:
        ds = tl.load(DHT + pid_nh.to(tl.int64) * dim_k * dim_v + state_off, mask=kv_mask, other=0.0).to(
            tl.float32
        )
    else:
        ds = tl.zeros([BK, BV], tl.float32)
    num_blocks = tl.cdiv(seqlen, C)
    for i in range(num_blocks):
        c = num_blocks - 1 - i
        blk = (blk0 + c).to(tl.int64)
        tl.store(DSTATES + (blk * num_heads + h) * dim_k * dim_v + state_off, ds, mask=kv_mask)
        rows = c * C + offs_c
        row_ok = rows < seqlen
        c_eff = tl.minimum(seqlen - c * C, C)
        tok = (start + rows).to(tl.int64)
        q_t = tl.load(
            Q + tok[None, :] * stride_qt + h * stride_qh + offs_k[:, None],
            mask=k_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        do = tl.load(
            DO + tok[:, None] * stride_dot + h * stride_doh + offs_v[None, :],
            mask=row_ok[:, None] & v_ok[None, :],
            other=0.0,
        )
        q_dec = (q_t * tl.exp2(b * (offs_c + 1).to(tl.float32))[None, :] * scale).to(do.dtype)
        ds = ds * tl.exp2(b * c_eff.to(tl.float32)) + tl.dot(q_dec, do, input_precision=DOT_PREC)
    if STORE_DH0:
        tl.store(DH0 + pid_nh.to(tl.int64) * dim_k * dim_v + state_off, ds, mask=kv_mask)


@triton.jit
def _block_bwd(
    Q,
    K,
    V,
    DO,
    DQ,
    DK,
    DV,
    STATES,
    DSTATES,
    CU,
    BLOCK_SEQ,
    BLOCK_IDX,
    SLOPE,
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
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    num_heads,
    dim_k,
    dim_v,
    scale,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(BLOCK_SEQ + blk)
    c = tl.load(BLOCK_IDX + blk)
    start = tl.load(CU + n)
    seqlen = tl.load(CU + n + 1) - start
    b = -tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    rows = c * C + offs_c
    row_ok = rows < seqlen
    c_eff = tl.minimum(seqlen - c * C, C)
    k_ok = offs_k < dim_k
    v_ok = offs_v < dim_v
    tok = (start + rows).to(tl.int64)
    qk_mask = row_ok[:, None] & k_ok[None, :]
    qv_mask = row_ok[:, None] & v_ok[None, :]
    q = tl.load(Q + tok[:, None] * stride_qt + h * stride_qh + offs_k[None, :], mask=qk_mask, other=0.0)
    k = tl.load(K + tok[:, None] * stride_kt + h * stride_kh + offs_k[None, :], mask=qk_mask, other=0.0)
    v = tl.load(V + tok[:, None] * stride_vt + h * stride_vh + offs_v[None, :], mask=qv_mask, other=0.0)
    do = tl.load(DO + tok[:, None] * stride_dot + h * stride_doh + offs_v[None, :], mask=qv_mask, other=0.0)
    st_off = (blk.to(tl.int64) * num_heads + h) * dim_k * dim_v + offs_k[:, None] * dim_v + offs_v[None, :]
    st_mask = k_ok[:, None] & v_ok[None, :]
    s = tl.load(STATES + st_off, mask=st_mask, other=0.0).to(v.dtype)
    ds = tl.load(DSTATES + st_off, mask=st_mask, other=0.0).to(v.dtype)
    # transposed decay mask M^T_ji = lambda^(i-j) for i >= j
    diff_t = offs_c[None, :] - offs_c[:, None]
    m_t = tl.where(diff_t >= 0, tl.exp2(b * tl.maximum(diff_t, 0).to(tl.float32)), 0.0)
    from_start = tl.exp2(b * (offs_c + 1).to(tl.float32))
    to_end = tl.where(row_ok, tl.exp2(b * tl.maximum(c_eff - 1 - offs_c, 0).to(tl.float32)), 0.0)
    # dP^T_ji = v_j . dO_i, A^T_ji = k_j . q_i, both masked by M^T
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC) * m_t
    a_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * m_t
    dq = tl.dot(tl.trans(dp_t).to(k.dtype), k, input_precision=DOT_PREC)
    dq += tl.dot(do, tl.trans(s), input_precision=DOT_PREC) * from_start[:, None]
    dk = tl.dot(dp_t.to(q.dtype), q, input_precision=DOT_PREC) * scale
    dk += tl.dot(v, tl.trans(ds), input_precision=DOT_PREC) * to_end[:, None]
    dv = tl.dot(a_t.to(do.dtype), do, input_precision=DOT_PREC) * scale
    dv += tl.dot(k, ds, input_precision=DOT_PREC) * to_end[:, None]
    tl.store(
        DQ + tok[:, None] * stride_dqt + h * stride_dqh + offs_k[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=qk_mask,
    )
    tl.store(
        DK + tok[:, None] * stride_dkt + h * stride_dkh + offs_k[None, :],
        dk.to(DK.dtype.element_ty),
        mask=qk_mask,
    )
    tl.store(
        DV + tok[:, None] * stride_dvt + h * stride_dvh + offs_v[None, :],
        dv.to(DV.dtype.element_ty),
        mask=qv_mask,
    )
