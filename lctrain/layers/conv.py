"""Depthwise causal short convolution that respects packed-document boundaries.

The short convolution in front of the q/k/v of linear-attention layers (H3, Mamba, DeltaNet,
Gated DeltaNet: Yang et al., "Gated Delta Networks", ICLR 2025, Sec. 3.3): each channel ``c``
is filtered by its own length-``K`` causal kernel,

    out[t, c] = act( sum_{j=0}^{K-1} w[c, K-1-j] * x[t-j, c] * [pos_t >= j] )

``pos_t`` is the position of token ``t`` within its document (``position_ids``), so a tap that
would reach into the previous document (or before the sequence) reads zero. The weight layout
``w[c, i]`` is that of ``F.conv1d`` with weight ``[C, 1, K]`` and ``K-1`` zeros of left padding,
so a single document gives exactly ``F.conv1d(x, w[:, None], padding=K-1, groups=C)[..., :T]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ShortConvolution(nn.Module):
    """Depthwise causal convolution of kernel ``kernel_size`` with optional SiLU, document-masked.

    Args:
        channels: C, the feature dim filtered channel by channel.
        kernel_size: K >= 1 taps (``conv_size``; 4 in Gated DeltaNet).
        activation: ``"silu"`` or ``None``.
        bias: add a learned per-channel bias (before the activation).

    ``forward(x [B,T,C], position_ids [B,T] int | None = None, cache [B,K-1,C] | None = None)
    -> [B,T,C]`` in ``x.dtype``.

    * ``position_ids``: position of each token within its document. ``None`` means no masking:
      each batch row is one document, continuing ``cache`` if given, else starting at ``x[:, 0]``.
    * ``cache``: the ``K-1`` tokens that precede ``x[:, 0]`` (e.g. the tail of the previous
      context-parallel shard); taps into it are still masked by ``position_ids``. ``None`` reads
      zeros there.

    Init: ``U(-1/sqrt(K), 1/sqrt(K))`` as ``nn.Conv1d`` with fan-in K (depthwise), bias 0.

    Raises:
        ValueError: bad constructor arguments or input shapes.
    """

    def __init__(
        self, channels: int, kernel_size: int = 4, activation: str | None = "silu", bias: bool = False
    ):
        super().__init__()
        if channels < 1 or kernel_size < 1:
            raise ValueError(
                f"ShortConvolution needs channels >= 1 and kernel_size >= 1, got {channels}, {kernel_size}"
            )
        if activation not in ("silu", None):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``U(-1/sqrt(K), 1/sqrt(K))`` weights (nn.Conv1d's default for a depthwise filter), zero bias."""
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        K = self.kernel_size
        if C != self.channels:
            raise ValueError(f"ShortConvolution(channels={self.channels}) got x with {C} channels")
        if position_ids is not None and position_ids.shape != (B, T):
            raise ValueError(f"position_ids must be [B, T] = {(B, T)}, got {tuple(position_ids.shape)}")
        if cache is None:
            padded = F.pad(x, (0, 0, K - 1, 0))
        else:
            if cache.shape != (B, K - 1, C):
                raise ValueError(f"cache must be [B, K-1, C] = {(B, K - 1, C)}, got {tuple(cache.shape)}")
            padded = torch.cat((cache.to(x.dtype), x), dim=1)
        w = self.weight.to(x.dtype)
        # K shifted, masked multiply-adds: K is tiny (4), and unlike one conv1d over the packed row
        # this lets the position mask cut taps at every document start.
        out = padded[:, K - 1 :] * w[:, K - 1]
        for j in range(1, K):
            tap = padded[:, K - 1 - j : K - 1 - j + T] * w[:, K - 1 - j]
            if position_ids is not None:
                tap = tap * (position_ids >= j).unsqueeze(-1).to(x.dtype)
            out = out + tap
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        if self.activation == "silu":
            out = F.silu(out)
        return out

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, activation={self.activation}"
