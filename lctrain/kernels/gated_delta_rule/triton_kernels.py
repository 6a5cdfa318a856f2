"""Triton kernels of the chunked gated delta rule (forward, backward) and the token recurrence.

This module imports triton at import time; import it lazily (``triton_chunk`` and
``fused_recurrent`` do so inside the op bodies) so that ``import lctrain`` works without triton.

Math (per value head, chunk of BT = 64 tokens, ``S`` the [K, V] state entering the chunk; see
``chunk.py`` for the derivation; Gated DeltaNet, arXiv:2412.06464, with the WY/UT form of
arXiv:2406.06484)::

    gamma = cumsum(g)                          D_ij = exp(gamma_i - gamma_j) (i >= j)
    M     = strict_lower(diag(beta) K K^T * D) X = (I + M)^-1
    W     = X (beta * K * exp(gamma))          U = X (beta * V)
    nv    = U - W S                            O = scale (Q exp(gamma)) S + tril(scale Q K^T * D) nv
    S'    = exp(gamma_last) S + (K exp(gamma_last - gamma))^T nv

Backward, with ``dS'`` the gradient of the state leaving the chunk (reverse sequential pass)::

    dnv = tril(scale Q K^T * D)^T dO + (K exp(gamma_last - gamma)) dS'
    dS  = exp(gamma_last) dS' + (scale Q exp(gamma))^T dO - W^T dnv

and every other gradient is chunk-local, in three kernels whose tiles are at most [64, 64] (K and
V are looped in blocks of 64, so that they stay within the sm90 register budget at K = 256):
``_bwd_wy_v_kernel`` (dv, dAqk, the V half of dX), ``_bwd_dqk_kernel`` per K tile (dq, dk
through Aqk and S', dW) and ``_bwd_wy_kernel`` (dk through W and M, dg, dbeta); the dgamma terms
go through a small per-part buffer summed by the last. ``X`` is inverted by forward
substitution inside each 16 x 16 diagonal block followed by the exact block-Neumann product
``(I + A)^-1 = (I - N)(I + N^2) Dinv`` with ``N = Dinv A_offdiag`` (N^4 = 0 for 4 blocks).

Layout: every token tensor is packed ``[T_all, heads, dim]`` (contiguous); chunk tables give
each chunk its first token and the end of its sequence (varlen). Value head ``hv`` reads q/k
head ``hv // G``. Accumulation is fp32; the dot operands are cast to the constexpr ``DT``:
bf16 (fp16) for bf16 (fp16) inputs (tensor cores; the state is rounded for those dots, as in fla),
fp32 with ``PREC="ieee"`` for fp32 inputs. ``K K^T`` takes the same operands (exact products for
bf16/fp16 keys). The fp32 dots of the WY inverse (the block-Neumann product) and of
``dM = -X^T dX X^T`` use ``WPREC``: IEEE for fp32 inputs, 3xTF32 (fp32-level accuracy on tensor
cores; FMA dots spill kilobytes of registers on sm90) for bf16/fp16.

Sums and the in-chunk cumsum are written as ``tl.reduce`` / ``tl.associative_scan`` with the sum
combine function (what ``tl.sum`` / ``tl.cumsum`` expand to): identical code on GPU, but it
avoids the interpreter's per-call re-patching of nested ``@jit`` helpers (~1.5 ms per call).
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # the combine function of tl.sum / tl.cumsum: the interpreter maps it onto numpy directly
    from triton.language.standard import _sum_combine as _add
except ImportError:  # pragma: no cover - other triton versions

    @triton.jit
    def _add(a, b):
        return a + b


@triton.jit
def _prep_kernel(
    k, v, g, beta, gamma_out, x_out, w_out, u_out, chunk_bos, chunk_eos,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    WPREC: tl.constexpr,
):
    """Per (chunk, value head): gamma, X = (I + M)^-1, W, U (K and V looped in tiles of BK, BV)."""
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(chunk_eos + i_c).to(tl.int64)
    o_t = tl.arange(0, BT)
    t = bos + o_t
    m_t = t < eos

    b_g = tl.load(g + t * HV + i_hv, mask=m_t, other=0.0).to(tl.float32)
    b_gam = tl.associative_scan(b_g, 0, _add)
    tl.store(gamma_out + t * HV + i_hv, b_gam, mask=m_t)
    b_beta = tl.load(beta + t * HV + i_hv, mask=m_t, other=0.0).to(tl.float32)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = tl.load(k + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
        b_kk += tl.dot((b_k).to(DT), (tl.trans(b_k)).to(DT), input_precision=PREC)  # exact products

    row = o_t[:, None]
    col = o_t[None, :]
    strict = row > col
    b_d = tl.exp(tl.where(strict, b_gam[:, None] - b_gam[None, :], float("-inf")))
    b_a = b_kk * b_beta[:, None] * b_d  # M: zero on and above the diagonal

    # inverse of the 16 x 16 diagonal blocks by forward substitution (all 4 blocks at once)
    same_blk = (row // 16) == (col // 16)
    eye = tl.where(row == col, 1.0, 0.0)
    b_ad = tl.where(same_blk, b_a, 0.0)
    b_x = eye
    for i in range(1, 16):
        sel = (o_t % 16) == i
        a_sel = tl.reduce(tl.where(sel[:, None], b_ad, 0.0), 0, _add)  # a_sel[j] = A[r(j), j]
        t_row = tl.reduce(a_sel[:, None] * b_x, 0, _add)  # t_row[c] = sum_j A[r(c), j] X[j, c]
        b_x = tl.where(sel[:, None] & same_blk, eye - t_row[None, :], b_x)
    # block-Neumann product for the off-diagonal blocks
    b_ao = tl.where(same_blk, 0.0, b_a)
    b_n = tl.dot(b_x, b_ao, input_precision=WPREC)
    b_n2 = tl.dot(b_n, b_n, input_precision=WPREC)
    b_p = tl.dot(eye - b_n, eye + b_n2, input_precision=WPREC)
    b_x = tl.dot(b_p, b_x, input_precision=WPREC)
    tl.store(x_out + (t[:, None] * HV + i_hv) * BT + o_t[None, :], b_x, mask=m_t[:, None])

    b_xd = b_x.to(DT)
    b_bg = b_beta * tl.exp(b_gam)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_tk = (t[:, None] * HV + i_hv) * K + o_k[None, :]
        b_k = tl.load(k + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_w = tl.dot(b_xd, (b_k * b_bg[:, None]).to(DT), input_precision=PREC)
        tl.store(w_out + p_tk, b_w.to(w_out.dtype.element_ty), mask=m_tk)
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_v = (t[:, None] * HV + i_hv) * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_u = tl.dot(b_xd, (b_v * b_beta[:, None]).to(DT), input_precision=PREC)
        tl.store(u_out + p_v, b_u.to(u_out.dtype.element_ty), mask=m_tv)


@triton.jit
def _fwd_h_kernel(
    k, w, u, gamma, h0, h_out, vnew_out, ht_out, seq_bos, seq_eos, seq_chunk0,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Sequential pass over the chunks of one sequence: states entering each chunk and nv."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)  # N * HV on grid axis x (no 65,535 limit)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(seq_bos + i_n).to(tl.int64)
    eos = tl.load(seq_eos + i_n).to(tl.int64)
    c0 = tl.load(seq_chunk0 + i_n).to(tl.int64)
    n_chunks = (eos - bos + BT - 1) // BT
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = (i_nh * K + o_k[:, None]) * V + o_v[None, :]

    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_s += tl.load(h0 + p_state, mask=m_kv, other=0.0).to(tl.float32)
    for i_c in range(n_chunks):
        t = bos + i_c * BT + o_t
        m_t = t < eos
        last = tl.minimum(bos + i_c * BT + BT, eos) - 1
        c = c0 + i_c
        tl.store(
            h_out + ((c * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
            b_s.to(h_out.dtype.element_ty),
            mask=m_kv,
        )
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_w = tl.load(w + (t[:, None] * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        p_tv = (t[:, None] * HV + i_hv) * V + o_v[None, :]
        b_u = tl.load(u + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_nv = b_u - tl.dot((b_w).to(DT), (b_s).to(DT), input_precision=PREC)
        tl.store(vnew_out + p_tv, b_nv.to(vnew_out.dtype.element_ty), mask=m_tv)
        g_last = tl.load(gamma + last * HV + i_hv)
        b_gam = tl.load(gamma + t * HV + i_hv, mask=m_t, other=0.0)
        b_gam = tl.where(m_t, b_gam, g_last)
        b_k = tl.load(k + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_kd = b_k * tl.exp(g_last - b_gam)[:, None]
        b_s = b_s * tl.exp(g_last) + tl.dot((tl.trans(b_kd)).to(DT), (b_nv).to(DT), input_precision=PREC)
    tl.store(ht_out + p_state, b_s, mask=m_kv)


@triton.jit
def _fwd_o_kernel(
    q, k, vnew, h, gamma, o, chunk_bos, chunk_eos, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """O = scale (Q exp(gamma)) S + tril(scale Q K^T * D) nv for one (V block, chunk, value head)."""
    i_c, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # chunks on grid axis x
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(chunk_eos + i_c).to(tl.int64)
    o_t = tl.arange(0, BT)
    t = bos + o_t
    m_t = t < eos
    last = tl.minimum(bos + BT, eos) - 1
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]

    g_last = tl.load(gamma + last * HV + i_hv)
    b_gam = tl.load(gamma + t * HV + i_hv, mask=m_t, other=0.0)
    b_gam = tl.where(m_t, b_gam, g_last)
    b_q = tl.load(q + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_s = tl.load(
        h + ((i_c.to(tl.int64) * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
        mask=m_k[:, None] & m_v[None, :],
        other=0.0,
    ).to(tl.float32)
    p_tv = (t[:, None] * HV + i_hv) * V + o_v[None, :]
    b_nv = tl.load(vnew + p_tv, mask=m_tv, other=0.0).to(tl.float32)

    row = o_t[:, None]
    col = o_t[None, :]
    causal = row >= col
    b_d = tl.exp(tl.where(causal, b_gam[:, None] - b_gam[None, :], float("-inf")))
    b_aqk = tl.where(causal, tl.dot((b_q).to(DT), (tl.trans(b_k)).to(DT), input_precision=PREC) * b_d, 0.0) * scale
    b_o = tl.dot((b_q * (tl.exp(b_gam) * scale)[:, None]).to(DT), (b_s).to(DT), input_precision=PREC) + tl.dot((b_aqk).to(DT), (b_nv).to(DT), input_precision=PREC)
    tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def _bwd_dv_local_kernel(
    q, k, gamma, do, dvl, chunk_bos, chunk_eos, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """dnv_local = tril(scale Q K^T * D)^T dO for one (V block, chunk, value head)."""
    i_c, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # chunks on grid axis x
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(chunk_eos + i_c).to(tl.int64)
    o_t = tl.arange(0, BT)
    t = bos + o_t
    m_t = t < eos
    last = tl.minimum(bos + BT, eos) - 1
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_tk = m_t[:, None] & m_k[None, :]
    m_tv = m_t[:, None] & m_v[None, :]

    g_last = tl.load(gamma + last * HV + i_hv)
    b_gam = tl.load(gamma + t * HV + i_hv, mask=m_t, other=0.0)
    b_gam = tl.where(m_t, b_gam, g_last)
    b_q = tl.load(q + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    row = o_t[:, None]
    col = o_t[None, :]
    causal = row >= col
    b_d = tl.exp(tl.where(causal, b_gam[:, None] - b_gam[None, :], float("-inf")))
    b_aqk = tl.where(causal, tl.dot((b_q).to(DT), (tl.trans(b_k)).to(DT), input_precision=PREC) * b_d, 0.0) * scale
    p_tv = (t[:, None] * HV + i_hv) * V + o_v[None, :]
    b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    b_dv = tl.dot((tl.trans(b_aqk)).to(DT), (b_do).to(DT), input_precision=PREC)
    tl.store(dvl + p_tv, b_dv, mask=m_tv)


@triton.jit
def _bwd_dh_kernel(
    q, k, w, gamma, do, dvl, dht, dh_out, dnv_out, dh0_out, seq_bos, seq_eos, seq_chunk0, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Reverse sequential pass: dS' per chunk (stored in dh_out[c]), dnv, and dh0."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)  # N * HV on grid axis x (no 65,535 limit)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(seq_bos + i_n).to(tl.int64)
    eos = tl.load(seq_eos + i_n).to(tl.int64)
    c0 = tl.load(seq_chunk0 + i_n).to(tl.int64)
    n_chunks = (eos - bos + BT - 1) // BT
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = (i_nh * K + o_k[:, None]) * V + o_v[None, :]

    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_ds += tl.load(dht + p_state, mask=m_kv, other=0.0).to(tl.float32)
    for j in range(n_chunks):
        i_c = n_chunks - 1 - j
        t = bos + i_c * BT + o_t
        m_t = t < eos
        last = tl.minimum(bos + i_c * BT + BT, eos) - 1
        c = c0 + i_c
        tl.store(
            dh_out + ((c * HV + i_hv) * K + o_k[:, None]) * V + o_v[None, :],
            b_ds.to(dh_out.dtype.element_ty),
            mask=m_kv,
        )
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        g_last = tl.load(gamma + last * HV + i_hv)
        b_gam = tl.load(gamma + t * HV + i_hv, mask=m_t, other=0.0)
        b_gam = tl.where(m_t, b_gam, g_last)
        # each [BT, K] operand is loaded where it is used and kept only in the dot dtype
        p_tv = (t[:, None] * HV + i_hv) * V + o_v[None, :]
        b_k = tl.load(k + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
        b_kd = (b_k.to(tl.float32) * tl.exp(g_last - b_gam)[:, None]).to(DT)
        b_dnv = tl.load(dvl + p_tv, mask=m_tv, other=0.0)
        b_dnv += tl.dot(b_kd, (b_ds).to(DT), input_precision=PREC)
        tl.store(dnv_out + p_tv, b_dnv.to(dnv_out.dtype.element_ty), mask=m_tv)
        b_w = tl.load(w + (t[:, None] * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0.0)
        b_ds = b_ds * tl.exp(g_last) - tl.dot((tl.trans(b_w)).to(DT), (b_dnv).to(DT), input_precision=PREC)
        b_q = tl.load(q + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
        b_qd = (b_q.to(tl.float32) * (tl.exp(b_gam) * scale)[:, None]).to(DT)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
        b_ds += tl.dot(tl.trans(b_qd), (b_do).to(DT), input_precision=PREC)
    tl.store(dh0_out + p_state, b_ds, mask=m_kv)


@triton.jit
def _bwd_wy_v_kernel(
    q, k, v, beta, gamma, x, vnew, dnv, do, dv, dad_out, dxv_out, dgp, dbeta, chunk_bos, chunk_eos, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Value-side gradients of one (chunk, value head), looping over V blocks then K tiles.

    dv = beta X^T dnv and its share of dbeta; dAqk = tril(dO nv^T) and the dgamma terms of
    Aqk = tril(scale Q K^T * D) (stored in ``dgp[0]``); stores dAd = dAqk * D * scale and
    dX_v = dnv (beta V)^T (the V half of dX) for the next kernels.
    """
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(chunk_eos + i_c).to(tl.int64)
    o_t = tl.arange(0, BT)
    t = bos + o_t
    m_t = t < eos
    last = tl.minimum(bos + BT, eos) - 1
    row = o_t[:, None]
    col = o_t[None, :]
    causal = row >= col

    b_beta = tl.load(beta + t * HV + i_hv, mask=m_t, other=0.0).to(tl.float32)
    p_tt = (t[:, None] * HV + i_hv) * BT + o_t[None, :]
    b_x = tl.load(x + p_tt, mask=m_t[:, None], other=0.0)
    b_daqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dx = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = (t[:, None] * HV + i_hv) * V + o_v[None, :]
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
        b_nv = tl.load(vnew + p_tv, mask=m_tv, other=0.0)
        b_daqk += tl.dot((b_do).to(DT), (tl.trans(b_nv)).to(DT), input_precision=PREC)
        b_dnv = tl.load(dnv + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_dx += tl.dot((b_dnv).to(DT), (tl.trans(b_v * b_beta[:, None])).to(DT), input_precision=PREC)
        b_dvb = tl.dot((tl.trans(b_x)).to(DT), (b_dnv).to(DT), input_precision=PREC)
        tl.store(dv + p_tv, (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_tv)
        b_dbeta += tl.reduce(b_dvb * b_v, 1, _add)
    tl.store(dxv_out + p_tt, b_dx, mask=m_t[:, None])
    tl.store(dbeta + t * HV + i_hv, b_dbeta, mask=m_t)

    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_tk = (t[:, None] * H + i_h) * K + o_k[None, :]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.0)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0)
        b_qk += tl.dot((b_q).to(DT), (tl.trans(b_k)).to(DT), input_precision=PREC)
    g_last = tl.load(gamma + last * HV + i_hv)
    b_gam = tl.load(gamma + t * HV + i_hv, mask=m_t, other=0.0)
    b_gam = tl.where(m_t, b_gam, g_last)
    b_d = tl.exp(tl.where(causal, b_gam[:, None] - b_gam[None, :], float("-inf")))
    b_daqk = tl.where(causal, b_daqk, 0.0)
    b_p = b_daqk * b_qk * b_d * scale  # dAqk * Aqk
    b_dgam = tl.reduce(b_p, 1, _add) - tl.reduce(b_p, 0, _add)
    tl.store(dgp + t * HV + i_hv, b_dgam, mask=m_t)
    tl.store(dad_out + p_tt, b_daqk * b_d * scale, mask=m_t[:, None])


@triton.jit
def _bwd_dqk_kernel(
    q, k, gamma, h, dh, vnew, dnv, do, dad, dq, dk, dw_out, dgp, chunk_bos, chunk_eos, scale, TT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """State-side gradients of one (K tile, chunk, value head), looping over V blocks.

    dq (final), dk through Aqk and S' (partial: ``_bwd_wy_kernel`` adds the W terms), dW, and
    this K tile's dgamma terms of Qd S, Aqk and S' (``dgp[1 + i_k]``; the exp(g_last) terms
    enter at the chunk's last token).
    """
    i_k, i_c, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(chunk_eos + i_c).to(tl.int64)
    o_t = tl.arange(0, BT)
    t = bos + o_t
    m_t = t < eos
    last = tl.minimum(bos + BT, eos) - 1
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]

    b_dqd = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)
    b_de = tl.zeros([BK], dtype=tl.float32)
    p_h = (i_c.to(tl.int64) * HV + i_hv) * K
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        p_kv = (p_h + o_k[:, None]) * V + o_v[None, :]
        p_tv = (t[:, None] * HV + i_hv) * V + o_v[None, :]
        b_s = tl.load(h + p_kv, mask=m_kv, other=0.0)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
        b_dqd += tl.dot((b_do).to(DT), (tl.trans(b_s)).to(DT), input_precision=PREC)
        b_dnv = tl.load(dnv + p_tv, mask=m_tv, other=0.0)
        b_dw -= tl.dot((b_dnv).to(DT), (tl.trans(b_s)).to(DT), input_precision=PREC)
        b_dsp = tl.load(dh + p_kv, mask=m_kv, other=0.0)
        b_nv = tl.load(vnew + p_tv, mask=m_tv, other=0.0)
        b_dkd += tl.dot((b_nv).to(DT), (tl.trans(b_dsp)).to(DT), input_precision=PREC)
        b_de += tl.reduce(b_s.to(tl.float32) * b_dsp.to(tl.float32), 1, _add)
    p_tk = (t[:, None] * HV + i_hv) * K + o_k[None, :]
    tl.store(dw_out + p_tk, b_dw, mask=m_tk)

    g_last = tl.load(gamma + last * HV + i_hv)
    b_gam = tl.load(gamma + t * HV + i_hv, mask=m_t, other=0.0)
    b_gam = tl.where(m_t, b_gam, g_last)
    p_qk = (t[:, None] * H + i_h) * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    b_dad = tl.load(dad + (t[:, None] * HV + i_hv) * BT + tl.arange(0, BT)[None, :], mask=m_t[:, None], other=0.0)

    # O = Qd S + Aqk nv with Qd = scale Q exp(gamma); dAd = dAqk * D * scale
    b_egs = tl.exp(b_gam) * scale
    b_dgam = tl.reduce(b_dqd * b_q, 1, _add) * b_egs
    b_dq = b_dqd * b_egs[:, None] + tl.dot((b_dad).to(DT), (b_k).to(DT), input_precision=PREC)
    tl.store(dq + p_tk, b_dq, mask=m_tk)
    # S' = exp(g_last) S + Kd^T nv with Kd = K exp(g_last - gamma)
    b_el = tl.exp(g_last - b_gam)
    b_dk = tl.dot((tl.trans(b_dad)).to(DT), (b_q).to(DT), input_precision=PREC) + b_dkd * b_el[:, None]
    tl.store(dk + p_tk, b_dk, mask=m_tk)
    b_pk = tl.reduce(b_dkd * b_k, 1, _add) * b_el
    b_dgam -= b_pk
    d_last = tl.reduce(b_pk, 0, _add) + tl.reduce(b_de, 0, _add) * tl.exp(g_last)
    b_dgam += tl.where(t == last, d_last, 0.0)
    tl.store(dgp + ((1 + i_k) * TT + t) * HV + i_hv, b_dgam, mask=m_t)


@triton.jit
def _bwd_wy_kernel(
    k, beta, gamma, x, dxv, dw, dk, dgp, dg, dbeta, chunk_bos, chunk_eos, TT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, WPREC: tl.constexpr,
):
    """Gradients through W = X (beta K exp(gamma)) and X = (I + M)^-1 for one (chunk, value head).

    Loops twice over K tiles: dX = dX_v + dW Kbg^T and K K^T, then dM = -X^T dX X^T and the dk
    terms; adds dk to the partial of ``_bwd_dqk_kernel``, sums the dgamma parts into dg (reverse
    in-chunk cumsum) and completes dbeta.
    """
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(chunk_eos + i_c).to(tl.int64)
    o_t = tl.arange(0, BT)
    t = bos + o_t
    m_t = t < eos
    last = tl.minimum(bos + BT, eos) - 1
    row = o_t[:, None]
    col = o_t[None, :]
    strict = row > col

    g_last = tl.load(gamma + last * HV + i_hv)
    b_gam = tl.load(gamma + t * HV + i_hv, mask=m_t, other=0.0)
    b_gam = tl.where(m_t, b_gam, g_last)
    b_beta = tl.load(beta + t * HV + i_hv, mask=m_t, other=0.0).to(tl.float32)
    b_bg = b_beta * tl.exp(b_gam)
    p_tt = (t[:, None] * HV + i_hv) * BT + o_t[None, :]
    b_dx = tl.zeros([BT, BT], dtype=tl.float32)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
        b_dw = tl.load(dw + (t[:, None] * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0.0)
        b_dx += tl.dot((b_dw).to(DT), (tl.trans(b_k.to(tl.float32) * b_bg[:, None])).to(DT), input_precision=PREC)
        b_kk += tl.dot((b_k).to(DT), (tl.trans(b_k)).to(DT), input_precision=PREC)  # exact products

    b_dx += tl.load(dxv + p_tt, mask=m_t[:, None], other=0.0)
    b_x = tl.load(x + p_tt, mask=m_t[:, None], other=0.0)
    b_dm = -tl.dot(tl.dot(tl.trans(b_x), b_dx, input_precision=WPREC), tl.trans(b_x), input_precision=WPREC)
    b_dm = tl.where(strict, b_dm, 0.0)
    b_d = tl.exp(tl.where(strict, b_gam[:, None] - b_gam[None, :], float("-inf")))
    b_dkk = b_dm * b_d
    b_gm = b_dkk * b_kk  # dM * (K K^T * D)
    b_dbeta = tl.reduce(b_gm, 1, _add)
    b_pm = b_gm * b_beta[:, None]  # dM * M
    b_dgam = tl.reduce(b_pm, 1, _add) - tl.reduce(b_pm, 0, _add)
    b_dkk = b_dkk * b_beta[:, None]
    b_dkk = (b_dkk + tl.trans(b_dkk)).to(DT)  # dk += dKK K + dKK^T K, one dot operand
    b_xt = (tl.trans(b_x)).to(DT)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
        p_tk = (t[:, None] * HV + i_hv) * K + o_k[None, :]
        b_dw = tl.load(dw + p_tk, mask=m_tk, other=0.0)
        b_dkbg = tl.dot(b_xt, (b_dw).to(DT), input_precision=PREC)
        b_dk = tl.load(dk + p_tk, mask=m_tk, other=0.0) + b_dkbg * b_bg[:, None]
        b_dk += tl.dot(b_dkk, (b_k).to(DT), input_precision=PREC)
        tl.store(dk + p_tk, b_dk, mask=m_tk)
        b_k = b_k.to(tl.float32)
        b_tk = tl.reduce(b_dkbg * b_k, 1, _add) * tl.exp(b_gam)
        b_dbeta += b_tk
        b_dgam += b_tk * b_beta

    # gamma = cumsum(g): dg_t = sum_{i >= t} dgamma_i over every part of dgamma
    for i_p in range((K + BK - 1) // BK + 1):
        b_dgam += tl.load(dgp + (i_p * TT + t) * HV + i_hv, mask=m_t, other=0.0)
    b_dgam = tl.where(m_t, b_dgam, 0.0)
    b_dg = tl.reduce(b_dgam, 0, _add) - tl.associative_scan(b_dgam, 0, _add) + b_dgam
    tl.store(dg + t * HV + i_hv, b_dg, mask=m_t)
    b_dbeta += tl.load(dbeta + t * HV + i_hv, mask=m_t, other=0.0)
    tl.store(dbeta + t * HV + i_hv, b_dbeta, mask=m_t)


@triton.jit
def _fused_recurrent_kernel(
    q, k, v, g, beta, h0, o, ht, seq_bos, seq_eos, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    """One token at a time: S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; o = S^T (scale q)."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)  # N * HV on grid axis x (no 65,535 limit)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(seq_bos + i_n).to(tl.int64)
    eos = tl.load(seq_eos + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = (i_nh * K + o_k[:, None]) * V + o_v[None, :]
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_s += tl.load(h0 + p_state, mask=m_kv, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * HV + i_hv) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(g + t * HV + i_hv).to(tl.float32)
        b_b = tl.load(beta + t * HV + i_hv).to(tl.float32)
        b_s = b_s * tl.exp(b_g)
        b_vm = (b_v - tl.reduce(b_s * b_k[:, None], 0, _add)) * b_b
        b_s += b_k[:, None] * b_vm[None, :]
        b_o = tl.reduce(b_s * b_q[:, None], 0, _add)
        tl.store(o + (t * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + p_state, b_s, mask=m_kv)
