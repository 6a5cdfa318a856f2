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

Numerics: every exponent formed is <= 0 (``gamma_i - gamma_j`` with ``i >= j``, ``gamma``
itself, ``gamma_{C-1} - gamma_i``). The upper triangle of ``gamma_i - gamma_j`` is replaced by
``-inf`` *before* ``exp`` so neither the forward (inf * 0) nor the backward (grad * exp(+big))
can produce NaN for strong decays. Everything is computed in fp32 (fp64 if the inputs are
fp64), except the cumulative decays ``gamma`` and their differences, which are formed in fp64:
``|gamma|`` reaches C * |g| (~1e3 for g = -20) and fp32 rounding there would cost ~1e-5 relative
accuracy in every decay factor (the fp64 part is O(C^2) per chunk and head, negligible on CPU).

Padding: sequences are padded to a multiple of C with ``q = k = v = 0``, ``g = 0``, ``beta = 0``;
such a token has ``new_v = 0`` and no decay, so it leaves the state unchanged.

Varlen (``cu_seqlens``): the step-major chunk layout of ``lctrain.kernels.varlen`` (each
sequence padded on its own; the sequential pass at step c updates a contiguous prefix of the
state batch). Backward is plain autograd through these torch ops.
"""

from __future__ import annotations

import torch

from lctrain.kernels.varlen import chunk_layout, gather_chunks, num_sequences

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

    Same contract as ``naive_recurrent_gated_delta_rule``; differentiable w.r.t. q, k, v, g, beta
    and initial_state through plain autograd.

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

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        return gather_chunks(x, gather, dtype)

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)  # [NC, H, C, K|K|V]
    gc, bc = to_chunks(g), to_chunks(beta)  # [NC, H, C]

    # fp64 cumulative decays: see "Numerics" in the module docstring
    gam64 = torch.cumsum(gc.double(), -1)  # [NC, H, C]
    gam = gam64.to(dtype)
    causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    strict = torch.ones(C, C, dtype=torch.bool, device=dev).tril(-1)
    # mask the exponent, not the result: exp of the upper triangle would overflow and its
    # gradient (0 * inf) would be NaN
    diff = (gam64[..., :, None] - gam64[..., None, :]).to(dtype)
    decay = torch.exp(torch.where(causal, diff, torch.full_like(diff, float("-inf"))))  # [NC, H, C, C]

    kb = kc * bc[..., None]
    lower = torch.where(strict, (kb @ kc.transpose(-1, -2)) * decay, torch.zeros((), dtype=dtype, device=dev))
    eye = torch.eye(C, dtype=dtype, device=dev)
    rhs = torch.cat([kb * torch.exp(gam)[..., None], vc * bc[..., None]], -1)  # [NC, H, C, K+V]
    wu = torch.linalg.solve_triangular(lower + eye, rhs, upper=False, unitriangular=True)
    w, u = wu[..., :K], wu[..., K:]

    qs = qc * scale
    q_dec = qs * torch.exp(gam)[..., None]  # [NC, H, C, K]
    attn = (qs @ kc.transpose(-1, -2)) * decay  # decay is already 0 above the diagonal
    gam_last = gam[..., -1:]  # [NC, H, 1]
    k_dec = kc * torch.exp((gam64[..., -1:] - gam64).to(dtype))[..., None]  # [NC, H, C, K]
    state_decay = torch.exp(gam_last)[..., None]  # [NC, H, 1, 1]

    if initial_state is None:
        S = torch.zeros(N, H, K, V, dtype=dtype, device=dev)
    else:
        S = initial_state.to(dtype)[order.to(dev)]
    states_in, new_vs = [], []
    lo = 0
    for a in active:  # chunk step c: the first `a` sorted sequences are still running
        hi = lo + a
        S_run = S[:a]
        nv = u[lo:hi] - w[lo:hi] @ S_run
        states_in.append(S_run)
        new_vs.append(nv)
        S_run = state_decay[lo:hi] * S_run + k_dec[lo:hi].transpose(-1, -2) @ nv
        S = torch.cat([S_run, S[a:]], 0) if a < N else S_run
        lo = hi
    assert lo == NC

    if NC > 0:
        s_in = torch.cat(states_in, 0)
        nv_all = torch.cat(new_vs, 0)
        oc = q_dec @ s_in + attn @ nv_all  # [NC, H, C, V]
    else:
        oc = torch.zeros(0, H, C, V, dtype=dtype, device=dev)
    o = oc.transpose(1, 2).reshape(NC * C, H, V)[scatter].reshape(B, T, H, V)

    final_state = None
    if output_final_state:
        inv = torch.empty_like(order)
        inv[order] = torch.arange(N)
        final_state = S[inv.to(dev)]
    return o.to(v.dtype), final_state
