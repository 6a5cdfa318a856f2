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
from torch.autograd.function import once_differentiable


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


class GatedRMSNormFunction(torch.autograd.Function):
    """``y = x * rstd * weight * silu(gate)``, ``rstd = 1 / sqrt(mean(x^2, -1) + eps)``, lean backward.

    ``forward(ctx, x [..., D], gate [..., D], weight [D], eps: float) -> y [..., D]`` in
    ``x.dtype``; any float dtypes, arithmetic in fp32 (fp64 when ``x`` is fp64), the same
    operations as the plain autograd version (``rmsnorm(x) * weight``, then ``* silu(gate)``).

    Saved for backward: ``x`` and ``gate`` as given (no copies) and ``rstd`` [..., 1] in the
    compute dtype, instead of the normalised ``x``, its scaled copy, ``silu(gate)`` and the fp32
    copies of bf16 inputs. Backward recomputes ``n = x * rstd`` and ``silu(gate)`` and returns
    ``dx = rstd * (dn - n * mean(dn * n, -1))`` with ``dn = dy * silu(gate) * weight``,
    ``dgate = dy * n * weight * silu'(gate)`` and ``dweight = sum(dy * n * silu(gate))`` over the
    leading dims, each in its input's dtype. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, gate, weight, eps):
        dtype = torch.promote_types(torch.float32, x.dtype)
        xf = x.to(dtype)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = xf * rstd * weight.to(dtype) * F.silu(gate.to(dtype))
        ctx.save_for_backward(x, gate, weight, rstd)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, gate, weight, rstd = ctx.saved_tensors
        need_x, need_gate, need_w = ctx.needs_input_grad[:3]
        dtype = rstd.dtype
        n = x.to(dtype) * rstd
        gf = gate.to(dtype)
        w = weight.to(dtype)
        dyf = dy.to(dtype)
        dx = dgate = dw = None
        if need_gate:
            dgate = torch.ops.aten.silu_backward(dyf * (n * w), gf).to(gate.dtype)
        if need_x or need_w:
            dnw = dyf * F.silu(gf)
            del gf
            if need_w:
                dw = (dnw * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
            if need_x:
                dn = dnw.mul_(w)
                dx = (rstd * (dn - n * (dn * n).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dgate, dw, None


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x) * weight * silu(gate)`` over the last dim (Gated DeltaNet output norm).

    In Gated DeltaNet the last dim is one head's value dim, so each head is normalised on its
    own and the scale ``weight`` [D] is shared by the heads (as in fla's ``FusedRMSNormGated``).

    Args:
        dim: size D of the normalised (last) dim.
        eps: numerical floor added to the mean square.

    Shapes: ``forward(x [..., D], gate [..., D]) -> [..., D]`` in ``x.dtype``; math in fp32
    (fp64 for fp64 inputs). Runs as :class:`GatedRMSNormFunction`, which keeps only ``x``,
    ``gate`` and the per-row ``rstd`` for backward.

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
        return GatedRMSNormFunction.apply(x, gate, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
