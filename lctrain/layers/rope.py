"""Rotary position embeddings (RoPE) on explicit positions, and positions of packed documents.

RoPE: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021), eq. 34,
in the "rotate-half" layout used by GPT-NeoX / Llama: the head dim is split into halves
``(x1, x2)`` and pair ``i`` is ``(x1[i], x2[i])`` rotated by angle ``pos * theta^(-2i/Dh)``:

    rope(x) = x * [cos, cos] + [-x2, x1] * [sin, sin]

Positions are passed explicitly (``position_ids [B, T]``) rather than inferred from the index,
so packed documents restart at 0 and context-parallel shards carry their global positions
(the helpers that make them live in :mod:`lctrain.kernels.varlen` and are re-exported here).
"""

from __future__ import annotations

import torch
from torch import nn

from lctrain.kernels.varlen import check_cu_seqlens, default_position_ids, position_ids_from_cu_seqlens

__all__ = [
    "RotaryEmbedding", "apply_rotary", "check_cu_seqlens", "default_position_ids", "position_ids_from_cu_seqlens",
    "rotate_half",
]


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
