"""Chunked Lightning Attention in vectorised PyTorch (the CPU training path).

Lightning Attention-2 (Qin et al., arXiv:2401.04658, Alg. 1): the sequence is split into blocks
of C tokens; inside a block attention is computed in the quadratic "left product" form with a
decay mask, across blocks through the recurrent [K, V] state ("right product"). Per head with
decay ``lambda = exp(-slope)``, ``S`` the state entering a block, ``i, j`` positions in it::

    M_ij = lambda^(i - j) for i >= j, else 0
    O    = (scale Q * lambda^(i+1)) S + (scale Q K^T * M) V
    S'   = lambda^C S + (K * lambda^(C-1-j))^T V

The powers of lambda are formed as ``exp`` of cumulative log decays inside the block
(``gamma_i = -slope * (i + 1)``), so every factor is in (0, 1]; the upper triangle is set to
``-inf`` before ``exp``. Sequences are padded per sequence to a multiple of C with zero q/k/v and a
zero log decay, so padding neither writes to nor decays the state and the final state is the
state after the last real token. Varlen packing reuses the step-major chunk layout of the gated delta rule
(``lctrain.kernels.varlen.chunk_layout``). Backward is plain autograd.
"""

from __future__ import annotations

import torch

from lctrain.kernels.lightning_attn.naive import check_slope
from lctrain.kernels.varlen import chunk_layout, gather_chunks, num_sequences

__all__ = ["chunk_lightning_attn"]


def _validate(q, k, v, initial_state, cu_seqlens, chunk_size) -> int:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape or v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(
            f"shape mismatch: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}; "
            f"expected q,k [B,T,H,K], v [B,T,H,V]"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    N = num_sequences(cu_seqlens, B, T)
    V = v.shape[-1]
    if initial_state is not None and tuple(initial_state.shape) != (N, H, K, V):
        raise ValueError(
            f"initial_state must be [N={N}, H={H}, K={K}, V={V}] (one state per sequence), "
            f"got {tuple(initial_state.shape)}"
        )
    return N


def chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning Attention, block-parallel (see module docstring).

    Same contract as :func:`~lctrain.kernels.lightning_attn.naive.naive_recurrent_lightning_attn`;
    differentiable w.r.t. q, k, v and initial_state (``slope`` is a fixed buffer in the model;
    its gradient is also exact through autograd).

    Args:
        q, k: [B, T, H, K] queries and keys.
        v: [B, T, H, V] values.
        slope: [H] decay rate per head, ``>= 0`` (per-token state decay ``exp(-slope)``).
        scale: query scale; default ``K ** -0.5``.
        initial_state: [N, H, K, V] state before the first token of each sequence
            (N = B, or the number of sequences in ``cu_seqlens``).
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: integer [N + 1] cumulative lengths of packed sequences (B == 1); the state
            restarts at each sequence start.
        chunk_size: block size C.

    Returns:
        ``(o, final_state)``: o [B, T, H, V] in the dtype of ``v``; final_state [N, H, K, V] in
        fp32 (fp64 for fp64 inputs) or None.

    Raises:
        ValueError: inconsistent shapes, non-float inputs, bad ``slope``/``chunk_size``/``cu_seqlens``,
            or ``initial_state`` not [N, H, K, V].
    """
    N = _validate(q, k, v, initial_state, cu_seqlens, chunk_size)
    B, T, H, K = q.shape
    check_slope(slope, H)
    V = v.shape[-1]
    C = chunk_size
    if scale is None:
        scale = K**-0.5
    dtype = torch.float32
    for x in (q, k, v):
        dtype = torch.promote_types(dtype, x.dtype)
    dev = q.device

    gather, scatter, order, active = chunk_layout(B, T, cu_seqlens, C, dev)
    NC = gather.shape[0]

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        return gather_chunks(x, gather, dtype)

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)  # [NC, H, C, K|K|V]
    # per-token log decay -slope for real tokens, 0 for padding (padding neither writes nor decays)
    g = (-slope.to(dev, dtype)).expand(B, T, H)
    gc = to_chunks(g)  # [NC, H, C]
    gam = torch.cumsum(gc, -1)  # cumulative log decay inside each block
    # decay from token j to the block end, sum_{t > j} g_t, as an exclusive reverse cumsum rather
    # than gam[-1] - gam[j]: the subtraction would send two large cancelling gradients to
    # gam[-1] and gam[j] and cost fp32 accuracy in d(slope) when the decay is strong
    rev = torch.flip(torch.cumsum(torch.flip(gc, [-1]), -1), [-1])
    to_end = torch.cat([rev[..., 1:], torch.zeros_like(rev[..., :1])], -1)
    strict = torch.ones(C, C, dtype=torch.bool, device=dev).tril(-1)
    eye = torch.eye(C, dtype=torch.bool, device=dev)
    diff = gam[..., :, None] - gam[..., None, :]
    # the diagonal is exactly 1 (no exponent, no gradient); above it -inf before exp
    mask = torch.where(strict, diff, torch.full_like(diff, float("-inf"))).exp() + eye.to(dtype)  # [NC, H, C, C]
    q_dec = qc * scale * torch.exp(gam)[..., None]  # [NC, H, C, K]
    k_dec = kc * torch.exp(to_end)[..., None]
    block_decay = torch.exp(gam[..., -1])[..., None, None]  # [NC, H, 1, 1]
    intra = ((qc * scale) @ kc.transpose(-1, -2) * mask) @ vc  # [NC, H, C, V]
    kv = k_dec.transpose(-1, -2) @ vc  # [NC, H, K, V]

    if initial_state is None:
        S = torch.zeros(N, H, K, V, dtype=dtype, device=dev)
    else:
        S = initial_state.to(dtype)[order.to(dev)]
    states_in = []
    lo = 0
    for a in active:  # block step c: the first `a` sorted sequences are still running
        hi = lo + a
        S_run = S[:a]
        states_in.append(S_run)
        S_run = block_decay[lo:hi] * S_run + kv[lo:hi]
        S = torch.cat([S_run, S[a:]], 0) if a < N else S_run
        lo = hi

    if NC > 0:
        oc = q_dec @ torch.cat(states_in, 0) + intra
    else:
        oc = torch.zeros(0, H, C, V, dtype=dtype, device=dev)
    o = oc.transpose(1, 2).reshape(NC * C, H, V)[scatter].reshape(B, T, H, V)

    final_state = None
    if output_final_state:
        inv = torch.empty_like(order)
        inv[order] = torch.arange(N)
        final_state = S[inv.to(dev)]
    return o.to(v.dtype), final_state
