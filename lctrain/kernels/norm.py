"""Normalisations used inside kernels and mixers (a leaf: no lctrain imports)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class L2NormFunction(torch.autograd.Function):
    """``x / sqrt(sum(x^2, -1) + eps)`` over the last dim with a lean backward.

    ``forward(ctx, x [..., K] float, eps: float) -> y [..., K]`` in ``x.dtype``; the arithmetic
    runs in fp32 (fp64 when ``x`` is fp64), the same operations as the plain autograd version.

    Saved for backward: ``rstd = 1 / sqrt(sum(x^2) + eps)`` [..., 1] in the compute dtype, plus
    the output ``y`` itself when ``x`` is fp32 or fp64 (then ``y`` holds the exact compute-dtype
    values, and whoever consumes ``y`` usually keeps it already, e.g. the delta-rule kernel keeps
    q and k: no extra storage), else the input ``x`` (bf16/fp16: ``y`` would be rounded, so
    backward recomputes ``y = x * rstd`` in fp32 instead). Backward:
    ``dx = rstd * (dy - y * sum(y * dy, -1))`` in the compute dtype, returned in ``x.dtype``.
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, eps):
        dtype = torch.promote_types(torch.float32, x.dtype)
        xf = x.to(dtype)
        rstd = torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)
        y = (xf * rstd).to(x.dtype)
        ctx.exact, ctx.in_dtype = y.dtype == dtype, x.dtype
        ctx.save_for_backward(y if ctx.exact else x, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        saved, rstd = ctx.saved_tensors
        y = saved if ctx.exact else saved.to(rstd.dtype) * rstd
        dyf = dy.to(rstd.dtype)
        dx = rstd * (dyf - y * (y * dyf).sum(-1, keepdim=True))
        return dx.to(ctx.in_dtype), None


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2, -1) + eps)`` over the last dim, computed in fp32, returned in ``x.dtype``.

    The query/key normalisation of Gated DeltaNet (Yang et al., ICLR 2025, Sec. 3.3). Runs as
    :class:`L2NormFunction`, which keeps only ``rstd`` and the output (or the input) for backward.

    Args:
        x: [..., K] floating-point tensor (fp64 is computed in fp64).
        eps: added under the square root (unitless).
    """
    return L2NormFunction.apply(x, eps)
