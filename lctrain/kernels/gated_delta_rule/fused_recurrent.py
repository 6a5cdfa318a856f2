"""Token-by-token gated delta rule on Triton (forward only; for decoding from a cached state).

Recurrence (Gated DeltaNet, Yang, Kautz, Hatamizadeh, arXiv:2412.06464, eq. 10), per value head::

    S_t = exp(g_t) S_{t-1};   S_t += beta_t k_t (v_t - S_t^T k_t)^T;   o_t = S_t^T (scale q_t)

One program holds a [K, BV] slice of one head's state in fp32 registers and walks the tokens of
one sequence. triton is imported only when the function runs.
"""

from __future__ import annotations

import torch

from lctrain.kernels.gated_delta_rule.chunk import _validate

__all__ = ["fused_recurrent_gated_delta_rule"]


@torch.no_grad()
def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule one token at a time (Triton, forward only, no autograd).

    Args:
        q, k: [B, T, H, K] queries and keys (keys L2-normalised). K <= 256.
        v: [B, T, HV, V] values, HV a multiple of H (q/k head ``h`` serves value heads
            ``h*G .. h*G+G-1``, ``G = HV // H``).
        g: [B, T, HV] log decay; beta: [B, T, HV] write strength.
        scale: query scale; default ``K ** -0.5``.
        initial_state: [N, HV, K, V] state to continue from (e.g. the final state of a prefill).
        output_final_state: return the fp32 state after the last token of each sequence.
        cu_seqlens: integer [N + 1] boundaries of packed sequences (requires B == 1).

    Returns:
        ``(o, final_state)``: o [B, T, HV, V] in v.dtype; final_state [N, HV, K, V] fp32 or None.

    Raises:
        ValueError: inconsistent shapes (see ``chunk_gated_delta_rule``), K > 256.
        RuntimeError: triton missing, or a CPU tensor without TRITON_INTERPRET=1.
    """
    from lctrain.kernels.gated_delta_rule.triton_chunk import _check_runnable, _pow2

    N = _validate(q, k, v, g, beta, initial_state, cu_seqlens, 1)
    _check_runnable(q)
    from lctrain.kernels.gated_delta_rule import triton_kernels as tk

    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if K > 256:
        raise ValueError(f"fused_recurrent_gated_delta_rule supports K <= 256, got K={K}")
    if scale is None:
        scale = K**-0.5
    if cu_seqlens is None:
        bounds = torch.arange(B + 1, dtype=torch.int32) * T
    else:
        bounds = cu_seqlens.detach().cpu().to(torch.int32)
    seq_bos = bounds[:-1].contiguous().to(q.device)
    seq_eos = bounds[1:].contiguous().to(q.device)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o = torch.empty_like(v)
    ht = torch.empty(N, HV, K, V, dtype=torch.float32, device=q.device)
    h0 = initial_state.contiguous() if initial_state is not None else ht
    BK, BV = _pow2(K), min(32, _pow2(V))
    if N > 0:
        tk._fused_recurrent_kernel[(N * HV, (V + BV - 1) // BV)](
            q, k, v, g, beta, h0, o, ht, seq_bos, seq_eos, float(scale),
            H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, HAS_H0=initial_state is not None, STORE_HT=True,
        )
    return o, (ht if output_final_state else None)
