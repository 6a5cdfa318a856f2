"""Block attention with log-sum-exp through PyTorch's fused CPU flash-attention kernels.

``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` computes attention tile by tile
(never the full ``[Tq, Tk]`` score matrix) and returns the row log-sum-exp; its backward op takes
an output and a log-sum-exp and returns the gradients. Given the *final* output and lse of an
attention that merged several key blocks (ring attention), the backward yields this block's share
of the gradients, since ``P_ij = exp(s_ij - lse_i)`` and ``D_i = rowsum(dO_i * O_i)`` are
properties of the merged row (Dao, "FlashAttention-2", Alg. 2). These are the CPU counterparts
of :func:`lctrain.kernels.flash_attn.flash_attn_fwd` / ``flash_attn_bwd`` for the blocks ring
attention computes without a document mask (a chunk against itself: causal; another rank's
chunk: a full rectangle).

GQA without copying K/V: the query heads that share key/value head ``j`` are heads
``j * g + i``; the kernels run once per ``i`` on the query heads ``i, g + i, 2g + i, ...``
against all key/value heads, so K and V are read as they are.

Layout ``[B, T, H, D]`` (lse ``[B, H, T]``, natural log), as the Triton flash functions.
"""

from __future__ import annotations

import torch

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _heads(t: torch.Tensor, i: int, g: int) -> torch.Tensor:
    return t[:, :, i::g].transpose(1, 2)  # [B, Hq/g, T, D], query heads i, g + i, ...


def cpu_flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over one key block and its log-sum-exp (fused CPU kernel).

    Args:
        q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] with ``Hq % Hkv == 0``, one float dtype.
        softmax_scale: logit scale (default ``D ** -0.5``).
        causal: top-left aligned causal mask (``Tq == Tk`` in ring attention's use).

    Returns:
        ``(out [B, Tq, Hq, D] in q.dtype, lse fp32 [B, Hq, Tq])``.
    """
    B, Tq, Hq, D = q.shape
    g = Hq // k.shape[2]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    out = q.new_empty(B, Tq, Hq, D)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    for i in range(g):
        o, l_ = _FWD(_heads(q, i, g), kt, vt, 0.0, causal, scale=softmax_scale)
        out[:, :, i::g] = o.transpose(1, 2)
        lse[:, i::g] = l_.float()
    return out, lse


def cpu_flash_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient share of one (query block, key block) pair from the final ``out`` and ``lse``.

    Args:
        dout, out: [B, Tq, Hq, D] gradient of and value of the final (merged) output.
        q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D].
        lse: fp32 [B, Hq, Tq] final log-sum-exp (natural log).
        softmax_scale, causal: as in :func:`cpu_flash_attn_fwd`.

    Returns:
        ``(dq [B, Tq, Hq, D], dk, dv [B, Tk, Hkv, D])`` in the input dtype.
    """
    g = q.shape[2] // k.shape[2]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for i in range(g):
        lse_i = lse[:, i::g].to(torch.float32).contiguous()
        dq_i, dk_i, dv_i = _BWD(_heads(dout, i, g).contiguous(), _heads(q, i, g), kt, vt,
                                _heads(out, i, g).contiguous(), lse_i, 0.0, causal, scale=softmax_scale)
        dq[:, :, i::g] = dq_i.transpose(1, 2)
        dk += dk_i.transpose(1, 2).float()
        dv += dv_i.transpose(1, 2).float()
    return dq, dk.to(k.dtype), dv.to(v.dtype)
