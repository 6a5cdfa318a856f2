"""fp32 reference softmax attention with per-row log-sum-exp (the tests' ground truth).

``out_i = sum_j softmax_j(scale * q_i . k_j + mask_ij) v_j`` (Vaswani et al. 2017, eq. 1) and
``lse_i = log sum_j exp(scale * q_i . k_j + mask_ij)`` in natural-log units, one sequence at a
time with the full [Tq, Tk] score matrix materialised. Differentiable with autograd.

Masking convention (FlashAttention >= 2.1): when a sequence has ``Tq`` queries and ``Tk`` keys,
query ``i`` is aligned with key ``i + Tk - Tq`` (bottom-right). With ``window_size = (left,
right)`` query ``i`` sees key ``j`` iff ``i + Tk - Tq - left <= j <= i + Tk - Tq + right``; a
negative bound is unlimited; ``causal=True`` sets ``right = 0``. A query that sees no key gets
``out = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

import torch

__all__ = ["attention_mask", "naive_attention"]


def attention_mask(
    seqlen_q: int, seqlen_k: int, causal: bool, window_size: tuple[int, int], device=None
) -> torch.Tensor:
    """Boolean [seqlen_q, seqlen_k] mask, True where query ``i`` may attend key ``j``."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= j <= i + right
    if left >= 0:
        mask &= j >= i - left
    return mask


def _one(q, k, v, scale, causal, window_size):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] (fp32) -> out [Tq, Hq, D], lse [Hq, Tq]."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    mask = attention_mask(q.shape[0], k.shape[0], causal, window_size, q.device)
    # a finite fill keeps autograd free of NaN for rows that see no key; those rows are zeroed
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]) * mask
    row_ok = mask.any(-1)
    out = torch.einsum("hij,jhd->ihd", p, v) * row_ok[:, None, None]
    lse = torch.where(row_ok, lse, torch.full_like(lse, float("-inf")))
    return out, lse


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention returning ``(out, lse)``, computed in fp32 (fp64 if given fp64).

    Args:
        q: [B, Tq, Hq, D], or packed [total_q, Hq, D] when ``cu_seqlens_q`` is given.
        k, v: [B, Tk, Hkv, D], or packed [total_k, Hkv, D]; ``Hq % Hkv == 0`` (GQA: query head
            ``h`` reads key/value head ``h // (Hq // Hkv)``).
        softmax_scale: logit scale, default ``D ** -0.5``.
        causal, window_size: see the module docstring.
        cu_seqlens_q, cu_seqlens_k: int [N + 1] sequence boundaries (both or neither).

    Returns:
        ``out`` fp32 with q's shape; ``lse`` fp32 natural-log, [B, Hq, Tq] (dense) or
        [Hq, total_q] (packed).
    """
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if cu_seqlens_q is None:
        outs, lses = zip(*(_one(q[b], k[b], v[b], scale, causal, window_size) for b in range(q.shape[0])))
        return torch.stack(outs), torch.stack(lses)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for n in range(len(bq) - 1):
        o, lse = _one(
            q[bq[n] : bq[n + 1]], k[bk[n] : bk[n + 1]], v[bk[n] : bk[n + 1]], scale, causal, window_size
        )
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)
