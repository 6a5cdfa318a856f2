"""Token-by-token fp32 reference of the gated delta rule (the oracle for every faster path).

Gated DeltaNet (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", ICLR 2025, eq. 10):

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

with the state ``S_t`` of shape [K, V] per head.
"""

from __future__ import annotations

import torch


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule computed one token at a time in fp32.

    Args:
        q, k: [B, T, H, K] queries and keys (any float dtype; computed in fp32).
        v: [B, T, HV, V] values; HV a multiple of H (q/k head ``h`` serves value heads
            ``h*G .. h*G+G-1``, ``G = HV // H``).
        g: [B, T, HV] log decay (``<= 0``; ``exp(g)`` multiplies the state).
        beta: [B, T, HV] write strength in [0, 1].
        scale: query scale; default ``K ** -0.5``.
        initial_state: [N, HV, K, V] state before the first token of each sequence
            (N = B, or the number of sequences in ``cu_seqlens``).
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: int [N + 1] cumulative sequence lengths of packed sequences; requires B == 1.
            The state restarts (from ``initial_state`` or zero) at each sequence start.

    Returns:
        ``(o, final_state)``: o [B, T, HV, V] in the dtype of ``v``; final_state [N, HV, K, V] fp32
        or None.

    Raises:
        ValueError: on inconsistent shapes, or ``cu_seqlens`` with B != 1.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    HV = v.shape[2]
    if (
        k.shape != q.shape
        or v.shape[:2] != (B, T)
        or HV % H != 0
        or g.shape != (B, T, HV)
        or beta.shape != (B, T, HV)
    ):
        raise ValueError(
            f"shape mismatch: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} "
            f"g{tuple(g.shape)} beta{tuple(beta.shape)}; expected q,k [B,T,H,K], v [B,T,HV,V], "
            "g,beta [B,T,HV] with HV a multiple of H"
        )
    if HV != H:  # grouped value heads: q/k head h serves value heads h*G .. h*G+G-1
        q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
        H = HV
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
    if initial_state is not None and initial_state.shape != (N, H, K, V):
        raise ValueError(f"initial_state must be [N={N}, H={H}, K={K}, V={V}], got {tuple(initial_state.shape)}")

    qf, kf, vf, gf, bf = (x.float() for x in (q, k, v, g, beta))
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
            kt, vt, qt = kf[b, t], vf[b, t], qf[b, t] * scale  # [H, K], [H, V], [H, K]
            S = S * gf[b, t].exp()[:, None, None]
            # delta rule: S <- S + beta k (v - S^T k)^T, identical to (I - beta k k^T) S + beta k v^T
            v_minus = vt - torch.einsum("hkv,hk->hv", S, kt)
            S = S + torch.einsum("hk,hv->hkv", kt, v_minus * bf[b, t][:, None])
            outs.append(torch.einsum("hkv,hk->hv", S, qt))
        if outs:
            o[b, s:e] = torch.stack(outs, 0)
        finals.append(S)
    final_state = torch.stack(finals, 0) if output_final_state else None
    return o.to(v.dtype), final_state
