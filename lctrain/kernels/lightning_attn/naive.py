"""Token-by-token fp32 reference of Lightning Attention (the oracle for every faster path).

Lightning Attention (Qin et al., "Lightning Attention-2: A Free Lunch for Handling Unlimited
Sequence Lengths in Large Language Models", arXiv:2401.04658, eq. 2-4; used by TransNormerLLM and
MiniMax-01) is linear attention with a fixed per-head exponential decay ``lambda_h = exp(-slope_h)``.
Per head, with the state ``S_t`` of shape [K, V]::

    S_t = exp(-slope_h) S_{t-1} + k_t v_t^T
    o_t = S_t^T (scale * q_t)
"""

from __future__ import annotations

import torch


def check_slope(slope: torch.Tensor, num_heads: int) -> None:
    """Raise ``ValueError`` unless ``slope`` is a floating [H] tensor with ``H == num_heads``."""
    if not isinstance(slope, torch.Tensor) or not slope.is_floating_point() or tuple(slope.shape) != (num_heads,):
        got = f"{slope.dtype} {tuple(slope.shape)}" if isinstance(slope, torch.Tensor) else type(slope).__name__
        raise ValueError(f"slope must be a floating-point tensor of shape [H={num_heads}], got {got}")


def naive_recurrent_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning Attention computed one token at a time in fp32.

    Args:
        q, k: [B, T, H, K] queries and keys (any float dtype; computed in fp32).
        v: [B, T, H, V] values.
        slope: [H] decay rate per head (``>= 0``; the state is multiplied by ``exp(-slope)`` per token).
        scale: query scale; default ``K ** -0.5``.
        initial_state: [N, H, K, V] state before the first token of each sequence
            (N = B, or the number of sequences in ``cu_seqlens``).
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: int [N + 1] cumulative lengths of packed sequences; requires B == 1. The
            state restarts (from ``initial_state`` or zero) at each sequence start.

    Returns:
        ``(o, final_state)``: o [B, T, H, V] in the dtype of ``v``; final_state [N, H, K, V] fp32
        or None.

    Raises:
        ValueError: inconsistent shapes, or ``cu_seqlens`` with B != 1.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(
            f"shape mismatch: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}; "
            f"expected q,k [B,T,H,K], v [B,T,H,V]"
        )
    check_slope(slope, H)
    if scale is None:
        scale = K**-0.5
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens requires batch size 1 (packed layout), got B={B}")
        bounds = [int(x) for x in cu_seqlens.tolist()]
        segments = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
    else:
        segments = [(b, 0, T) for b in range(B)]
    N = len(segments)
    if initial_state is not None and tuple(initial_state.shape) != (N, H, K, V):
        raise ValueError(f"initial_state must be [N={N}, H={H}, K={K}, V={V}], got {tuple(initial_state.shape)}")

    qf, kf, vf = (x.float() for x in (q, k, v))
    lam = torch.exp(-slope.float())[:, None, None]  # [H, 1, 1]
    o = torch.zeros(B, T, H, V, dtype=torch.float32, device=q.device)
    finals = []
    for n, (b, s, e) in enumerate(segments):
        S = (
            initial_state[n].float().clone()
            if initial_state is not None
            else torch.zeros(H, K, V, dtype=torch.float32, device=q.device)
        )
        outs = []
        for t in range(s, e):
            S = lam * S + kf[b, t][:, :, None] * vf[b, t][:, None, :]
            outs.append(torch.einsum("hk,hkv->hv", qf[b, t] * scale, S))
        if outs:
            o[b, s:e] = torch.stack(outs, 0)
        finals.append(S)
    final_state = torch.stack(finals, 0) if output_final_state else None
    return o.to(v.dtype), final_state
