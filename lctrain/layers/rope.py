"""Rotary position embeddings (RoPE) on explicit positions, and positions of packed documents.

RoPE: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021), eq. 34,
in the "rotate-half" layout used by GPT-NeoX / Llama: the head dim is split into halves
``(x1, x2)`` and pair ``i`` is ``(x1[i], x2[i])`` rotated by angle ``pos * theta^(-2i/Dh)``:

    rope(x) = x * [cos, cos] + [-x2, x1] * [sin, sin]

Positions are passed explicitly (``position_ids [B, T]``) rather than inferred from the index,
so packed documents restart at 0 and context-parallel shards carry their global positions.
"""

from __future__ import annotations

import torch
from torch import nn


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total_len: int | None = None) -> torch.Tensor:
    """Position of every token within its document, for a packed batch.

    Args:
        cu_seqlens: int32 (or int64) [N + 1], non-decreasing, ``cu_seqlens[0] == 0``;
            document ``n`` spans tokens ``cu_seqlens[n]:cu_seqlens[n+1]``.
        total_len: expected packed length T (checked against ``cu_seqlens[-1]`` when given).

    Returns:
        int64 [1, T] with ``pos[0, t] = t - cu_seqlens[n]`` for the document ``n`` containing ``t``.

    Raises:
        ValueError: ``cu_seqlens`` is not 1-D, does not start at 0, decreases, or does not end at
            ``total_len``.
    """
    check_cu_seqlens(cu_seqlens, total_len)
    T = int(cu_seqlens[-1])
    cu = cu_seqlens.to(torch.long)
    t = torch.arange(T, device=cu_seqlens.device)
    # index of the document holding each token; right=True sends boundary tokens to the new document
    doc = torch.searchsorted(cu[1:], t, right=True)
    return (t - cu[doc]).unsqueeze(0)


def default_position_ids(
    batch_size: int, seq_len: int, cu_seqlens: torch.Tensor | None, device: torch.device | None = None
) -> torch.Tensor:
    """Positions to use when the caller gave none.

    Args:
        batch_size, seq_len: B and T of the batch.
        cu_seqlens: int32 [N + 1] boundaries of a packed batch (requires B == 1), or None.
        device: where to build the result.

    Returns:
        int64 [B, T]: positions within documents of ``cu_seqlens``, else ``0..T-1`` in every row.

    Raises:
        ValueError: ``cu_seqlens`` with B != 1 or not covering T (see :func:`check_cu_seqlens`).
    """
    if cu_seqlens is not None:
        if batch_size != 1:
            raise ValueError(f"cu_seqlens requires the packed layout with batch size 1, got B={batch_size}")
        return position_ids_from_cu_seqlens(cu_seqlens.to(device), seq_len)
    return torch.arange(seq_len, device=device).expand(batch_size, seq_len)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total_len: int | None = None) -> None:
    """Validate a packed-batch ``cu_seqlens`` tensor (see :func:`position_ids_from_cu_seqlens`).

    Raises:
        ValueError: wrong rank/dtype, first entry not 0, decreasing entries, or last entry
            different from ``total_len``.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be an integer tensor (int32), got {cu_seqlens.dtype}")
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
    if total_len is not None and int(cu_seqlens[-1]) != total_len:
        raise ValueError(
            f"cu_seqlens[-1]={int(cu_seqlens[-1])} must equal the packed length T={total_len} "
            f"(the batch is [1, T] with the documents laid end to end)"
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim (halves of equal size)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary embedding of queries and keys at explicit positions (Su et al. 2021, rotate-half).

    Frequencies ``inv_freq[i] = theta^(-2i/Dh)`` for ``i < Dh/2`` are recomputed in fp32 on each
    call (Dh/2 numbers) instead of living in a buffer, so meta-device construction, ``.to(bf16)``
    and checkpoint loading cannot change them.

    Args:
        head_dim: Dh, the rotated (last) dim; must be even.
        theta: base of the geometric frequency ladder (``rope_theta``; 10000 in RoFormer).

    Shapes: ``forward(q [B,T,Hq,Dh], k [B,T,Hk,Dh], position_ids [B,T] int) -> (q', k')`` in the
    input dtypes; the rotation is computed in fp32.

    Raises:
        ValueError: odd ``head_dim``, ``theta <= 0``, or shapes that do not match.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim >= 2, got {head_dim}")
        if theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {theta}")
        self.head_dim = head_dim
        self.theta = float(theta)

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """fp32 [Dh/2] angular frequency of each pair, in radians per position."""
        i = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        return self.theta ** (-i / self.head_dim)

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin`` of shape [B, T, 1, Dh] (halves repeated) for the given positions."""
        angles = position_ids.to(torch.float32).unsqueeze(-1) * self.inv_freq(position_ids.device)
        emb = torch.cat((angles, angles), dim=-1).unsqueeze(-2)
        return emb.cos(), emb.sin()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(f"RoPE(head_dim={self.head_dim}) got q{tuple(q.shape)} k{tuple(k.shape)}")
        if position_ids.shape != q.shape[:2] or k.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"position_ids must be [B, T] = {tuple(q.shape[:2])} matching q [B,T,H,Dh] and k, "
                f"got position_ids{tuple(position_ids.shape)} k{tuple(k.shape)}"
            )
        cos, sin = self.cos_sin(position_ids)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in fp32, returned in ``x.dtype``.

    Args:
        x: [B, T, H, Dh].
        cos, sin: [B, T, 1, Dh] fp32 (from :meth:`RotaryEmbedding.cos_sin`).
    """
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
