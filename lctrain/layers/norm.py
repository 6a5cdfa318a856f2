"""Root-mean-square normalisation, plain and gated.

RMSNorm: Zhang & Sennrich, "Root Mean Square Layer Normalization" (NeurIPS 2019), eq. 4:
``y = x / sqrt(mean(x^2) + eps) * w``.

Gated RMSNorm (the output norm of Mamba-2 and Gated DeltaNet; Yang et al., "Gated Delta
Networks", ICLR 2025, Fig. 1): ``y = rmsnorm(x) * w * silu(gate)``.

Both normalise in fp32 (a bf16 mean of squares loses too many bits) and return the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` over the last dim, computed in fp32.

    Args:
        x: [..., D] any float dtype.
        weight: [D] scale, or None for no scale.
        eps: added to the mean square (unitless, same units as ``x^2``).

    Returns:
        [..., D] in ``x.dtype``.
    """
    return _rms_norm_fp32(x, weight, eps).to(x.dtype)


def _rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned scale initialised to 1 (Zhang & Sennrich 2019).

    Args:
        dim: size D of the normalised (last) dim.
        eps: numerical floor added to the mean square.

    Shapes: ``forward(x [..., D]) -> [..., D]`` in ``x.dtype``; statistics in fp32.

    Raises:
        ValueError: ``dim < 1`` or ``eps < 0``.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        if dim < 1 or eps < 0:
            raise ValueError(f"RMSNorm needs dim >= 1 and eps >= 0, got dim={dim}, eps={eps}")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """Scale to 1 (the identity on unit-RMS inputs)."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm(dim={self.dim}) got input with last dim {x.shape[-1]}")
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x) * weight * silu(gate)`` over the last dim (Gated DeltaNet output norm).

    In Gated DeltaNet the last dim is one head's value dim, so each head is normalised on its
    own and the scale ``weight`` [D] is shared by the heads (as in fla's ``FusedRMSNormGated``).

    Args:
        dim: size D of the normalised (last) dim.
        eps: numerical floor added to the mean square.

    Shapes: ``forward(x [..., D], gate [..., D]) -> [..., D]`` in ``x.dtype``; math in fp32.

    Raises:
        ValueError: wrong last dim, or ``gate`` and ``x`` shapes differ.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        if dim < 1 or eps < 0:
            raise ValueError(f"GatedRMSNorm needs dim >= 1 and eps >= 0, got dim={dim}, eps={eps}")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """Scale to 1."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim or gate.shape != x.shape:
            raise ValueError(
                f"GatedRMSNorm(dim={self.dim}) needs x and gate of the same shape [..., {self.dim}], "
                f"got x{tuple(x.shape)} gate{tuple(gate.shape)}"
            )
        y = _rms_norm_fp32(x, self.weight, self.eps) * F.silu(gate.float())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
