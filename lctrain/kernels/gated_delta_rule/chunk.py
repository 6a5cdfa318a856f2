"""Chunked gated delta rule in vectorised PyTorch (the CPU training path).

Recurrence (Gated DeltaNet: Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2
with Delta Rule", ICLR 2025, arXiv:2412.06464), per head, state ``S_t`` of shape [K, V]::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale q_t)

Chunkwise form (DeltaNet WY/UT representation: Yang, Wang, Zhang, Shen, Kim, "Parallelizing
Linear Transformers with the Delta Rule over Sequence Length", NeurIPS 2024, arXiv:2406.06484;
with the gating extension of the Gated DeltaNet paper). Split the sequence into chunks of C
tokens, let ``S`` be the state entering a chunk, positions ``i, j`` index the chunk, and

    gamma_i  = sum_{t <= i} g_t                              (cumulative log decay in the chunk)
    D_ij     = exp(gamma_i - gamma_j) for i >= j, else 0     (decay ratios, lower triangular)
    L        = I + strict_lower(diag(beta) K K^T * D)        (unit lower triangular, C x C)
    W        = L^-1 diag(beta) (K * exp(gamma))              (WY factor, C x K)
    U        = L^-1 diag(beta) V                             (C x V)

The state never enters W or U, so they are computed for all chunks at once. Only this
recurrence over chunks is sequential:

    new_v    = U - W S                                       (the delta-rule "pseudo values")
    O        = (scale Q * exp(gamma)) S + (tril(scale Q K^T) * D) new_v
    S'       = exp(gamma_{C-1}) S + (K * exp(gamma_{C-1} - gamma))^T new_v

Derivation: unrolling the recurrence inside a chunk gives
``S_i = exp(gamma_i) S + sum_{j<=i} exp(gamma_i - gamma_j) k_j new_v_j^T`` with
``new_v_i = beta_i (v_i - exp(gamma_i) S^T k_i - sum_{j<i} exp(gamma_i - gamma_j) (k_i . k_j) new_v_j)``,
a unit lower triangular system ``L new_v = diag(beta) (V - (K * exp(gamma)) S)``.

Backward (hand-written, :class:`_ChunkGDR`): forward keeps only its inputs (as given, not
copied), the state entering each chunk (``[NC, H, K, V]``, i.e. K*V/C values per token and head:
as many as one head dimension for K = V = C = 64) and the int64 layout maps, so the saved
activations are O(T H D) with a small constant. Backward recomputes the in-chunk WY terms
(D, L, W, U, new_v) from them and runs the sequential pass over the chunks in reverse for the
state gradient
``dS = (scale Q * exp(gamma))^T dO + exp(gamma_{C-1}) dS' - W^T dnew_v`` with
``dnew_v = (tril(scale Q K^T) * D)^T dO + (K * exp(gamma_{C-1} - gamma)) dS'``, and finishes with
vectorised per-chunk gradients (the triangular solve is transposed: ``d rhs = L^-T d[W U]``,
``dL = -d rhs [W U]^T``). This mirrors the Triton backward, which recomputes chunk states.

Cost: both passes run over blocks of consecutive chunks (about 1 MiB of [C, C] temporaries per
block on CPU): gather the block's chunks, compute its WY terms, advance the state (or state
gradient) over its chunk steps, write its output (or gradients) into preallocated buffers. Time
is linear in T and temporaries do not grow with T. (An autograd-traced loop over slices of
[NC, ...] tensors is quadratic: each slice's backward materialises a full-size zero gradient,
O(T) per chunk step; full-sequence temporaries also fall out of the caches at long T.)

Numerics: every exponent formed is <= 0 (``gamma_i - gamma_j`` with ``i >= j``, ``gamma``
itself, ``gamma_{C-1} - gamma_i``). The upper triangle of ``gamma_i - gamma_j`` is replaced by
``-inf`` *before* ``exp`` so neither the forward (inf * 0) nor the backward (grad * exp(+big))
can produce NaN for strong decays. Everything is computed in fp32 (fp64 if the inputs are
fp64), except the cumulative decays ``gamma`` and their differences, which are formed in fp64:
``|gamma|`` reaches C * |g| (~1e3 for g = -20) and fp32 rounding there would cost ~1e-5 relative
accuracy in every decay factor (the fp64 part is O(C^2) per chunk and head, negligible on CPU).
The backward accumulates the gradient of ``gamma`` and its reverse cumulative sum (the gradient
of ``g``) in fp64 as well, as autograd through the fp64 cumsum did.

Padding: sequences are padded to a multiple of C with ``q = k = v = 0``, ``g = 0``, ``beta = 0``;
such a token has ``new_v = 0`` and no decay, so it leaves the state unchanged.

Varlen (``cu_seqlens``): the step-major chunk layout of ``lctrain.kernels.varlen`` (each
sequence padded on its own; the sequential pass at step c updates a contiguous prefix of the
state batch, in reverse order in backward). The gather into / scatter out of the chunk layout,
the grouped-value-head repeat and the initial / final state reordering stay plain autograd ops
around :class:`_ChunkGDR` (they save only index tensors).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from lctrain.kernels.varlen import chunk_layout, num_sequences

__all__ = ["chunk_gated_delta_rule"]


def _validate(q, k, v, g, beta, initial_state, cu_seqlens, chunk_size) -> int:
    """Check shapes and ``cu_seqlens``; return the number of sequences N."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    HV = v.shape[2] if v.dim() == 4 else -1
    if (
        k.shape != q.shape
        or v.dim() != 4
        or v.shape[:2] != (B, T)
        or HV < 1
        or HV % H != 0
        or g.shape != (B, T, HV)
        or beta.shape != (B, T, HV)
    ):
        raise ValueError(
            f"shape mismatch: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} "
            f"g{tuple(g.shape)} beta{tuple(beta.shape)}; expected q,k [B,T,H,K], v [B,T,HV,V], "
            "g,beta [B,T,HV] with HV (value heads) a multiple of H"
        )
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    N = num_sequences(cu_seqlens, B, T)
    V = v.shape[-1]
    if initial_state is not None and tuple(initial_state.shape) != (N, HV, K, V):
        raise ValueError(
            f"initial_state must be [N={N}, HV={HV}, K={K}, V={V}] (one state per sequence), "
            f"got {tuple(initial_state.shape)}"
        )
    return N


# Chunks per block of the blocked passes: the [nb, H, C, C] temporaries of one block hold about
# this many elements (1 MiB in fp32), so a block's working set stays in the CPU caches and
# memory that is freed gets reused; on accelerators blocks are large (few kernel launches).
_BLOCK_ELEMS_CPU = 1 << 18
_BLOCK_ELEMS_OTHER = 1 << 24


def _block_chunks(H: int, C: int, K: int, V: int, device: torch.device) -> int:
    """Number of chunks per block (>= 1) for heads H, chunk C, head dims K, V on ``device``."""
    target = _BLOCK_ELEMS_CPU if device.type == "cpu" else _BLOCK_ELEMS_OTHER
    return max(1, target // (H * C * max(C, K, V)))


def _blocks(active: list[int], block: int) -> list[tuple[int, int, list[tuple[int, int, int, int]]]]:
    """Split the step-major chunk range into blocks of at most ``block`` chunks.

    Args:
        active: number of running sequences at each chunk step (non-increasing); step c owns
            the chunks ``sum(active[:c]) .. sum(active[:c+1])``, one per sequence 0..active[c]-1.
        block: chunks per block.

    Returns:
        ``[(b0, b1, pieces)]`` in chunk order; ``pieces`` lists, in order, the parts of the steps
        that fall into chunks ``b0 .. b1``: ``(p0, p1, r0, r1)`` with block-relative chunk range
        ``p0 .. p1`` holding step chunks for the (sorted) sequences ``r0 .. r1``. Processing the
        pieces in this order (reverse order in backward) respects the recurrence.
    """
    steps, lo = [], 0
    for a in active:
        steps.append((lo, lo + a))
        lo += a
    out, si = [], 0
    for b0 in range(0, lo, block):
        b1 = min(lo, b0 + block)
        pieces = []
        while si < len(steps) and steps[si][0] < b1:
            lo_c, hi_c = steps[si]
            x0, x1 = max(lo_c, b0), min(hi_c, b1)
            pieces.append((x0 - b0, x1 - b0, x0 - lo_c, x1 - lo_c))
            if hi_c > b1:  # the step continues in the next block
                break
            si += 1
        out.append((b0, b1, pieces))
    return out


def _gather_block(xf: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Chunks of one block: xf [B*T, H, *] -> [nb, H, C, *] contiguous in ``dtype``.

    ``idx`` [nb, C] holds token indices with ``B*T`` (or more) for padding slots, which read 0.
    """
    n = xf.shape[0]
    valid = idx < n
    x = xf[idx.clamp(max=n - 1)].to(dtype)  # [nb, C, H, *]
    mask = valid.reshape(*valid.shape, *([1] * (x.dim() - 2)))
    x = torch.where(mask, x, torch.zeros((), dtype=dtype, device=x.device))
    return x.transpose(1, 2).contiguous()


def _masks(C: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [C, C] masks: ``causal`` (i >= j) and ``strict`` (i > j)."""
    causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    strict = torch.ones(C, C, dtype=torch.bool, device=dev).tril(-1)
    return causal, strict


def _chunk_terms(qc, kc, vc, gc, bc, scale: float, causal, strict) -> dict[str, torch.Tensor]:
    """State-independent per-chunk terms of the WY form (module docstring) for a block of chunks.

    Args:
        qc, kc: [nb, H, C, K]; vc: [nb, H, C, V]; gc, bc: [nb, H, C] chunked inputs, all in the
            compute dtype (fp32, or fp64).
        scale: query scale.
        causal, strict: the [C, C] masks of :func:`_masks`.

    Returns:
        dict of tensors in the compute dtype unless noted:
        ``gam64`` [nb, H, C] fp64 cumulative log decay; ``eg`` [nb, H, C] exp(gamma);
        ``decay`` [nb, H, C, C] D (0 above the diagonal); ``kb`` [nb, H, C, K] beta * K;
        ``lower`` [nb, H, C, C] strict_lower(beta K K^T * D); ``lmat`` = I + lower;
        ``wu`` [nb, H, C, K + V] the solution [W | U] of ``lmat [W | U] = [kb * eg | beta V]``;
        ``qs`` scale Q; ``q_dec`` [nb, H, C, K] scale Q * exp(gamma);
        ``attn`` [nb, H, C, C] tril(scale Q K^T) * D; ``ed`` [nb, H, C] exp(gamma_{C-1} - gamma);
        ``k_dec`` [nb, H, C, K] K * ed; ``sd`` [nb, H] exp(gamma_{C-1}) (the chunk's state decay).
    """
    dtype, dev = qc.dtype, qc.device
    C = qc.shape[-2]
    # fp64 cumulative decays: see "Numerics" in the module docstring
    gam64 = torch.cumsum(gc.double(), -1)  # [nb, H, C]
    gam = gam64.to(dtype)
    eg = torch.exp(gam)
    # mask the exponent, not the result: exp of the upper triangle would overflow and its
    # gradient (0 * inf) would be NaN
    diff = (gam64[..., :, None] - gam64[..., None, :]).to(dtype)
    decay = torch.exp(torch.where(causal, diff, torch.full_like(diff, float("-inf"))))  # [nb, H, C, C]
    kb = kc * bc[..., None]
    lower = torch.where(strict, (kb @ kc.transpose(-1, -2)) * decay, torch.zeros((), dtype=dtype, device=dev))
    lmat = lower + torch.eye(C, dtype=dtype, device=dev)
    rhs = torch.cat([kb * eg[..., None], vc * bc[..., None]], -1)  # [nb, H, C, K+V]
    wu = torch.linalg.solve_triangular(lmat, rhs, upper=False, unitriangular=True)
    qs = qc * scale
    q_dec = qs * eg[..., None]  # [nb, H, C, K]
    attn = (qs @ kc.transpose(-1, -2)) * decay  # decay is already 0 above the diagonal
    ed = torch.exp((gam64[..., -1:] - gam64).to(dtype))  # [nb, H, C]
    k_dec = kc * ed[..., None]  # [nb, H, C, K]
    sd = torch.exp(gam[..., -1])  # [nb, H]
    return {
        "gam64": gam64, "eg": eg, "decay": decay, "kb": kb, "lower": lower, "lmat": lmat, "wu": wu,
        "qs": qs, "q_dec": q_dec, "attn": attn, "ed": ed, "k_dec": k_dec, "sd": sd,
    }


class _ChunkGDR(torch.autograd.Function):
    """The chunked gated delta rule over the step-major chunk layout, with a recomputing backward.

    forward(q, k, v, g, beta, s0, gather, scatter, active, scale, dtype) -> (o, s_final):
        q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H] (any float dtypes; computed in
        ``dtype``, fp32 or fp64). s0: [N, H, K, V] initial states in layout order (sequences
        sorted by chunk count) in ``dtype``. ``gather`` [NC, C] / ``scatter`` [B*T] int64 and
        ``active`` (list, ``sum(active) == NC >= 1``) are the maps of
        ``lctrain.kernels.varlen.chunk_layout``. Returns o [B*T, H, V] in ``dtype`` and
        s_final [N, H, K, V] in ``dtype`` (state after each sequence's last chunk, layout order).

    Both passes run block by block (:func:`_blocks`): gather a block's chunks, compute its WY
    terms, advance the state over the block's chunk steps, then the block's output (forward) or
    gradients (backward, blocks and steps in reverse), so temporaries are O(block) and the time
    is linear in T. Saved for backward: the five inputs as given (no copies), the state entering
    every chunk ``s_in`` [NC, H, K, V] in ``dtype``, and the two index maps. Gradients of the
    inputs come back through ``scatter`` (the layout is a permutation plus padding slots).
    Not twice differentiable (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, gather, scatter, active, scale, dtype):
        B, T, H, K = q.shape
        V = v.shape[-1]
        NC, C = gather.shape
        N = s0.shape[0]
        dev = q.device
        flat = [x.reshape(B * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
        causal, strict = _masks(C, dev)
        blocks = _blocks(active, _block_chunks(H, C, K, V, dev))
        S = s0.clone()
        s_in = torch.empty(NC, H, K, V, dtype=dtype, device=dev)
        oc = torch.empty(NC, C, H, V, dtype=dtype, device=dev)
        for b0, b1, pieces in blocks:
            qc, kc, vc, gc, bc = (_gather_block(x, gather[b0:b1], dtype) for x in flat)
            t = _chunk_terms(qc, kc, vc, gc, bc, scale, causal, strict)
            w, u = t["wu"][..., :K], t["wu"][..., K:]
            k_dec_t = t["k_dec"].transpose(-1, -2)  # [nb, H, K, C]
            sd = t["sd"][..., None, None]  # [nb, H, 1, 1]
            si = s_in[b0:b1]
            nv_b = torch.empty(b1 - b0, H, C, V, dtype=dtype, device=dev)
            for p0, p1, r0, r1 in pieces:  # one chunk step for the sorted sequences r0..r1
                S_run = S[r0:r1]
                si[p0:p1] = S_run
                nv = u[p0:p1] - w[p0:p1] @ S_run
                nv_b[p0:p1] = nv
                S_run = sd[p0:p1] * S_run + k_dec_t[p0:p1] @ nv
                if r0 == 0 and r1 == N:
                    S = S_run
                else:
                    S[r0:r1] = S_run
            oc[b0:b1] = (t["q_dec"] @ si + t["attn"] @ nv_b).transpose(1, 2)  # [nb, C, H, V]
        o = oc.reshape(NC * C, H, V)[scatter]  # [B*T, H, V]
        ctx.save_for_backward(q, k, v, g, beta, s_in, gather, scatter)
        ctx.blocks, ctx.scale, ctx.dtype, ctx.N = blocks, scale, dtype, N
        ctx.set_materialize_grads(False)
        return o, S

    @staticmethod
    @once_differentiable
    def backward(ctx, d_o, d_sfinal):
        q, k, v, g, beta, s_in, gather, scatter = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        NC, C = gather.shape
        N, dtype, scale, dev = ctx.N, ctx.dtype, ctx.scale, q.device
        flat = [x.reshape(B * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
        causal, strict = _masks(C, dev)
        zero = torch.zeros((), dtype=dtype, device=dev)
        if d_sfinal is None:
            dS = torch.zeros(N, H, K, V, dtype=dtype, device=dev)
        else:
            dS = d_sfinal.to(dtype).clone()
        # gradients in the chunk layout, [NC, C, H, *] so that a flat view indexes by slot
        dq_c = torch.empty(NC, C, H, K, dtype=dtype, device=dev)
        dk_c = torch.empty(NC, C, H, K, dtype=dtype, device=dev)
        dv_c = torch.empty(NC, C, H, V, dtype=dtype, device=dev)
        dg_c = torch.empty(NC, C, H, dtype=dtype, device=dev)
        db_c = torch.empty(NC, C, H, dtype=dtype, device=dev)
        for b0, b1, pieces in reversed(ctx.blocks):
            nb = b1 - b0
            qc, kc, vc, gc, bc = (_gather_block(x, gather[b0:b1], dtype) for x in flat)
            t = _chunk_terms(qc, kc, vc, gc, bc, scale, causal, strict)
            wu, decay, lower, attn = t["wu"], t["decay"], t["lower"], t["attn"]
            q_dec, k_dec, eg, kb, qs = t["q_dec"], t["k_dec"], t["eg"], t["kb"], t["qs"]
            w, u = wu[..., :K], wu[..., K:]
            si = s_in[b0:b1]
            nv = u - w @ si  # [nb, H, C, V], recomputed from the saved chunk states
            if d_o is None:
                d_oc = torch.zeros(nb, H, C, V, dtype=dtype, device=dev)
            else:
                d_oc = _gather_block(d_o, gather[b0:b1], dtype)  # [nb, H, C, V]

            # reverse pass over the block's chunk steps; dS holds d(state leaving the chunk)
            pt_do = attn.transpose(-1, -2) @ d_oc  # [nb, H, C, V]
            qt_do = q_dec.transpose(-1, -2) @ d_oc  # [nb, H, K, V]
            w_t = w.transpose(-1, -2)  # [nb, H, K, C]
            sd = t["sd"][..., None, None]  # [nb, H, 1, 1]
            ds_out = torch.empty(nb, H, K, V, dtype=dtype, device=dev)
            dnv = torch.empty(nb, H, C, V, dtype=dtype, device=dev)
            for p0, p1, r0, r1 in reversed(pieces):
                dSo = dS[r0:r1]
                ds_out[p0:p1] = dSo
                dn = pt_do[p0:p1] + k_dec[p0:p1] @ dSo
                dnv[p0:p1] = dn
                dS_new = qt_do[p0:p1] + sd[p0:p1] * dSo - w_t[p0:p1] @ dn
                if r0 == 0 and r1 == N:
                    dS = dS_new
                else:
                    dS[r0:r1] = dS_new

            # O = q_dec S + attn nv ;  S' = sd S + k_dec^T nv ;  nv = U - W S
            d_qdec = d_oc @ si.transpose(-1, -2)  # [nb, H, C, K]
            d_attn = d_oc @ nv.transpose(-1, -2)  # [nb, H, C, C]
            d_sd = (ds_out * si).sum((-2, -1))  # [nb, H]
            d_kdec = nv @ ds_out.transpose(-1, -2)  # [nb, H, C, K]
            dwu = torch.cat([-(dnv @ si.transpose(-1, -2)), dnv], -1)  # [dW | dU]
            # [W | U] = L^-1 rhs:  d rhs = L^-T d[W | U],  dL = -d rhs [W | U]^T (strict lower)
            lmat_t = t["lmat"].transpose(-1, -2)
            drhs = torch.linalg.solve_triangular(lmat_t, dwu, upper=True, unitriangular=True)
            dlower = torch.where(strict, -(drhs @ wu.transpose(-1, -2)), zero)
            d_kbg, d_vb = drhs[..., :K], drhs[..., K:]

            # rhs = [kb * eg | v * beta]
            dv = d_vb * bc[..., None]
            dbeta = (d_vb * vc).sum(-1)
            dkb = d_kbg * eg[..., None]
            dgam = (d_kbg * kb).sum(-1) * eg  # [nb, H, C]: d gamma through exp(gamma)
            # lower = strict(kb kc^T * D)
            d_kk = dlower * decay
            dkb = dkb + d_kk @ kc
            dk = d_kk.transpose(-1, -2) @ kb
            d_dd = dlower * lower  # dD * D, [nb, H, C, C]
            # attn = (qs kc^T) * D, q_dec = qs * eg
            d_qk = d_attn * decay
            dqs = d_qk @ kc + d_qdec * eg[..., None]
            dk = dk + d_qk.transpose(-1, -2) @ qs
            d_dd = d_dd + d_attn * attn
            dgam = dgam + (d_qdec * q_dec).sum(-1)
            # kb = kc * beta
            dk = dk + dkb * bc[..., None]
            dbeta = dbeta + (dkb * kc).sum(-1)
            # k_dec = kc * exp(gamma_last - gamma)
            dk = dk + d_kdec * t["ed"][..., None]
            r = (d_kdec * k_dec).sum(-1).double()  # d(gamma_last - gamma)

            # gamma gradient (decay ratios, exp(gamma), state decay) and d g = its reverse cumsum, fp64
            d_dd64 = d_dd.double()
            dgam64 = dgam.double() - r + d_dd64.sum(-1) - d_dd64.sum(-2)
            dgam64[..., -1] += r.sum(-1) + (d_sd * t["sd"]).double()
            dg = torch.flip(torch.cumsum(torch.flip(dgam64, (-1,)), -1), (-1,))

            dq_c[b0:b1] = (dqs * scale).transpose(1, 2)
            dk_c[b0:b1] = dk.transpose(1, 2)
            dv_c[b0:b1] = dv.transpose(1, 2)
            dg_c[b0:b1] = dg.transpose(1, 2)
            db_c[b0:b1] = dbeta.transpose(1, 2)

        def unchunk(i: int, buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
            if not ctx.needs_input_grad[i]:
                return None
            return buf.reshape(NC * C, *buf.shape[2:])[scatter].reshape(like.shape).to(like.dtype)

        return (
            # q reaches only o: no gradient when o is unused (as autograd would give)
            None if d_o is None else unchunk(0, dq_c, q),
            unchunk(1, dk_c, k), unchunk(2, dv_c, v), unchunk(3, dg_c, g), unchunk(4, db_c, beta),
            dS if ctx.needs_input_grad[5] else None, None, None, None, None, None,
        )


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, chunkwise-parallel with the WY representation (see module docstring).

    Same contract as ``naive_recurrent_gated_delta_rule``; differentiable (once) w.r.t. q, k, v,
    g, beta and initial_state, with a hand-written backward that recomputes the in-chunk terms
    (time and saved memory linear in T).

    Args:
        q, k: [B, T, H, K] queries and keys (keys are expected L2-normalised, as in Gated
            DeltaNet; otherwise the delta rule itself can diverge).
        v: [B, T, HV, V] values; HV (value heads) is H or a multiple of it: q/k head ``h``
            serves value heads ``h*G .. h*G+G-1`` with ``G = HV // H`` (grouped value heads).
        g: [B, T, HV] log decay per token, ``<= 0`` (not checked; positive values can overflow).
        beta: [B, T, HV] write strength, normally in [0, 1].
        scale: query scale; default ``K ** -0.5``.
        initial_state: [N, HV, K, V] state before the first token of each sequence
            (N = B, or the number of sequences in ``cu_seqlens``); any float dtype.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: integer [N + 1] cumulative sequence lengths of packed sequences (requires
            B == 1, starts at 0, ends at T, non-decreasing; empty sequences allowed). The state
            restarts (from ``initial_state`` or zero) at each sequence start.
        chunk_size: tokens per chunk C (64 matches the Triton kernel; any positive int works).

    Returns:
        ``(o, final_state)``: o [B, T, HV, V] in the dtype of ``v``; final_state [N, HV, K, V] in
        fp32 (fp64 when an input is fp64), or None unless ``output_final_state``.

    Raises:
        ValueError: inconsistent shapes, non-float inputs, bad ``chunk_size``, ``cu_seqlens`` with
            B != 1 or not a valid non-decreasing [0, ..., T] integer vector, or ``initial_state``
            not [N, H, K, V].
    """
    N = _validate(q, k, v, g, beta, initial_state, cu_seqlens, chunk_size)
    if v.shape[2] != q.shape[2]:  # grouped value heads: q/k head h serves value heads h*G..h*G+G-1
        G = v.shape[2] // q.shape[2]
        q, k = q.repeat_interleave(G, dim=2), k.repeat_interleave(G, dim=2)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    if scale is None:
        scale = K**-0.5
    dtype = torch.float32
    for x in (q, k, v, g, beta):
        dtype = torch.promote_types(dtype, x.dtype)
    dev = q.device

    gather, scatter, order, active = chunk_layout(B, T, cu_seqlens, C, dev)
    NC = gather.shape[0]

    if initial_state is None:
        S0 = torch.zeros(N, H, K, V, dtype=dtype, device=dev)
    else:
        S0 = initial_state.to(dtype)[order.to(dev)]

    if NC > 0:
        o, S = _ChunkGDR.apply(q, k, v, g, beta, S0, gather, scatter, active, float(scale), dtype)
        o = o.reshape(B, T, H, V)
    else:  # only empty sequences: no output, the state passes through
        o, S = torch.zeros(B, T, H, V, dtype=dtype, device=dev), S0

    final_state = None
    if output_final_state:
        inv = torch.empty_like(order)
        inv[order] = torch.arange(N)
        final_state = S[inv.to(dev)]
    return o.to(v.dtype), final_state
