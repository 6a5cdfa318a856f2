"""Rotary position embeddings (RoPE) on explicit positions, and positions of packed documents.

RoPE: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021), eq. 34,
in the "rotate-half" layout used by GPT-NeoX / Llama: the head dim is split into halves
``(x1, x2)`` and pair ``i`` is ``(x1[i], x2[i])`` rotated by angle ``pos * theta^(-2i/Dh)``:

    rope(x) = x * [cos, cos] + [-x2, x1] * [sin, sin]

Partial rotary embedding (GPT-NeoX's ``rotary_pct``, Qwen3-Next's ``partial_rotary_factor``):
only the first ``rotary_dim`` dims of each head are rotated, with the frequency ladder computed
over that slice (``theta^(-2i/rotary_dim)``); the remaining ``Dh - rotary_dim`` dims pass through.

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

    Frequencies ``inv_freq[i] = theta^(-2i/R)`` for ``i < R/2`` (``R = rotary_dim``) are
    recomputed in fp32 on each call (R/2 numbers) instead of living in a buffer, so meta-device
    construction, ``.to(bf16)`` and checkpoint loading cannot change them.

    Args:
        head_dim: Dh, the size of the (last) head dim.
        theta: base of the geometric frequency ladder (``rope_theta``; 10000 in RoFormer).
        rotary_dim: R, the leading dims of each head that are rotated (even, ``2 <= R <= Dh``);
            ``None`` means ``Dh`` (full RoPE). Dims ``R..Dh-1`` pass through unchanged.

    Shapes: ``forward(q [B,T,Hq,Dh], k [B,T,Hk,Dh], position_ids [B,T] int) -> (q', k')`` in the
    input dtypes; the rotation is computed in fp32.

    Raises:
        ValueError: odd ``head_dim`` or ``rotary_dim``, ``rotary_dim`` outside ``[2, head_dim]``,
            ``theta <= 0``, or shapes that do not match.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, rotary_dim: int | None = None):
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else int(rotary_dim)
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim >= 2, got {head_dim}")
        if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"RoPE needs an even rotary_dim in [2, head_dim={head_dim}], got {rotary_dim}")
        if theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {theta}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.theta = float(theta)

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """fp32 [R/2] angular frequency of each rotated pair, in radians per position."""
        i = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device)
        return self.theta ** (-i / self.rotary_dim)

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin`` of shape [B, T, 1, R] (halves repeated) for the given positions."""
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
        if self.rotary_dim == self.head_dim:
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        R = self.rotary_dim
        return (
            torch.cat((apply_rotary(q[..., :R], cos, sin), q[..., R:]), dim=-1),
            torch.cat((apply_rotary(k[..., :R], cos, sin), k[..., R:]), dim=-1),
        )

    def extra_repr(self) -> str:
        extra = f", rotary_dim={self.rotary_dim}" if self.rotary_dim != self.head_dim else ""
        return f"head_dim={self.head_dim}, theta={self.theta}{extra}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in fp32, returned in ``x.dtype``.

    Args:
        x: [B, T, H, R] (the rotated slice of each head).
        cos, sin: [B, T, 1, R] fp32 (from :meth:`RotaryEmbedding.cos_sin`).
    """
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
