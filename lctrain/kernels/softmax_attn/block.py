"""One block of softmax attention with its log-sum-exp, and its FlashAttention-2 style backward.

Ring attention splits the keys of a query block into pieces that arrive one at a time; each piece
gives a partial output and log-sum-exp, merged exactly in fp32 (Milakov & Gimelshein, "Online
normalizer calculation for softmax", 2018; Liu et al., "Ring Attention", 2023):

    out' = out - sigmoid(lse_b - lse) * (out - out_b),   lse' = lse - logsigmoid(lse - lse_b)

Rows with no visible key in a block (causal / document masks) have ``lse = -inf`` and ``out = 0``;
:func:`merge_partial` leaves the other side unchanged for them instead of forming ``inf - inf``.

The backward of a block pair uses the *final* lse and output (Dao, "FlashAttention-2", 2023,
Alg. 2): ``P = exp(scale q k^T - lse)``, ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``,
``dQ = scale dS K``, ``dK = scale dS^T Q``; summing the blocks' contributions gives the exact
gradient of the whole attention.

Layout ``[B, T, H, Dh]``; GQA (``Hq = g * Hkv``) is handled by expanding K/V heads and summing
their gradients over each group. This is the portable torch path (CPU and CUDA); all maths fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # [B, Tk, Hkv, D] -> [B, Hq, Tk, D] fp32
    x = x.float().transpose(1, 2)
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def block_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries over one key block, with its log-sum-exp.

    Args:
        q: [B, Tq, Hq, Dh]; k, v: [B, Tk, Hkv, Dh] with ``Hq % Hkv == 0``.
        mask: bool [Tq, Tk] (True = may attend), shared by the batch; None = all visible.
        scale: logit scale (``Dh ** -0.5`` usually).

    Returns:
        ``(out, lse)``: out fp32 [B, Tq, Hq, Dh] (0 for rows with no visible key), lse fp32
        [B, Hq, Tq] in nats (``-inf`` for such rows).
    """
    g = q.shape[2] // k.shape[2]
    qf = q.float().transpose(1, 2)
    s = (qf @ _expand_kv(k, g).transpose(-1, -2)) * scale  # [B, Hq, Tq, Tk]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
    p = torch.exp(s - safe[..., None])
    out = p @ _expand_kv(v, g)
    return out.transpose(1, 2), lse


def block_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient contributions of one (query block, key block) pair.

    Args:
        dout: fp32 [B, Tq, Hq, Dh] gradient of the *final* attention output.
        q, k, v, mask, scale: as in :func:`block_attn_fwd`.
        lse: fp32 [B, Hq, Tq] log-sum-exp of the final output (over all key blocks).
        delta: fp32 [B, Hq, Tq] ``rowsum(dout * out_final)``.

    Returns:
        ``(dq [B,Tq,Hq,Dh], dk [B,Tk,Hkv,Dh], dv [B,Tk,Hkv,Dh])`` in fp32.
    """
    Hkv = k.shape[2]
    g = q.shape[2] // Hkv
    qf = q.float().transpose(1, 2)
    kf, vf = _expand_kv(k, g), _expand_kv(v, g)
    do = dout.float().transpose(1, 2)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    # rows that see nothing anywhere have lse = -inf: make their P exactly 0, not exp(nan)
    safe = torch.where(torch.isfinite(lse), lse, torch.full((), float("inf"), dtype=lse.dtype, device=lse.device))
    p = torch.exp(s - safe[..., None])
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ vf.transpose(-1, -2) - delta[..., None])
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    B, _, Tk, D = dk.shape
    if g > 1:
        dk = dk.view(B, Hkv, g, Tk, D).sum(2)
        dv = dv.view(B, Hkv, g, Tk, D).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def merge_partial(
    out: torch.Tensor | None, lse: torch.Tensor | None, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention ``(out_b, lse_b)`` into ``(out, lse)`` (fp32; see module docstring).

    Shapes: out [B, T, H, Dh], lse [B, H, T]. ``out=None`` starts the accumulation.
    """
    if out is None:
        return out_b.float(), lse_b.float()
    lse_b = lse_b.float()
    ninf = torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device)
    b_empty = lse_b == ninf
    a_empty = lse == ninf
    w = torch.sigmoid(lse_b - lse)
    w = torch.where(b_empty, torch.zeros_like(w), torch.where(a_empty, torch.ones_like(w), w))
    new_out = out - w.transpose(1, 2)[..., None] * (out - out_b.float())
    merged = lse - F.logsigmoid(lse - lse_b)
    new_lse = torch.where(b_empty, lse, torch.where(a_empty, lse_b, merged))
    return new_out, new_lse


def attention_mask(
    q_index: torch.Tensor, k_index: torch.Tensor, q_doc: torch.Tensor, k_doc: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    """bool [Tq, Tk]: key visible to query (same document, and not in its future when causal).

    Args:
        q_index, k_index: int64 [Tq], [Tk] global token indices.
        q_doc, k_doc: int64 document ids of those tokens.
    """
    m = q_doc[:, None] == k_doc[None, :]
    if causal:
        m = m & (q_index[:, None] >= k_index[None, :])
    return m
