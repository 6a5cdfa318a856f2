"""Normalisations used inside kernels and mixers (a leaf: no lctrain imports)."""

from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2, -1) + eps)`` over the last dim, computed in fp32, returned in ``x.dtype``.

    The query/key normalisation of Gated DeltaNet (Yang et al., ICLR 2025, Sec. 3.3).

    Args:
        x: [..., K] floating-point tensor.
        eps: added under the square root (unitless).
    """
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)
