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
from torch.autograd.function import once_differentiable


def _padded(x: torch.Tensor, cache: torch.Tensor | None, K: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, K-1+T, C]`` in ``dtype``: ``cache`` (zeros when None) followed by ``x``."""
    xc = x.to(dtype)
    return F.pad(xc, (0, 0, K - 1, 0)) if cache is None else torch.cat((cache.to(dtype), xc), dim=1)


def _pre_activation(
    padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, position_ids: torch.Tensor | None
) -> torch.Tensor:
    """``[B, T, C]`` convolution of ``padded`` (from :func:`_padded`) plus bias, in ``padded.dtype``.

    K shifted, masked multiply-adds (K is tiny, 4): unlike one conv1d over the packed row this
    lets the position mask cut taps at every document start. Tap ``j`` (reaching ``j`` tokens
    back) reads ``padded[:, K-1-j : K-1-j+T]`` and is zeroed where ``position_ids < j``.
    """
    K = weight.shape[1]
    T = padded.shape[1] - (K - 1)
    dtype = padded.dtype
    w = weight.to(dtype)
    out = padded[:, K - 1 :] * w[:, K - 1]
    for j in range(1, K):
        tap = padded[:, K - 1 - j : K - 1 - j + T] * w[:, K - 1 - j]
        if position_ids is not None:
            tap.mul_(_tap_mask(position_ids, j, dtype))
        out.add_(tap)
    if bias is not None:
        out.add_(bias.to(dtype))
    return out


def _tap_mask(position_ids: torch.Tensor, j: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, 1]`` 1 where tap ``j`` stays inside the token's document (``position_ids >= j``), else 0."""
    return (position_ids >= j).unsqueeze(-1).to(dtype)


class ShortConvFunction(torch.autograd.Function):
    """Document-masked depthwise causal convolution (+ optional SiLU) that recomputes in backward.

    ``forward(ctx, x, weight, bias, cache, position_ids, silu) -> y``:

    * ``x`` [B, T, C] float (fp32, bf16, fp16 or fp64); ``weight`` [C, K]; ``bias`` [C] or None;
      ``cache`` [B, K-1, C] or None (the inputs preceding ``x[:, 0]``, zeros when None);
      ``position_ids`` [B, T] int or None (no document masking); ``silu`` bool.
    * ``y`` [B, T, C] in ``x.dtype``: ``act(sum_j w[:, K-1-j] x[t-j] [pos_t >= j] + bias)``.

    The arithmetic runs in fp32 (fp64 when ``x`` is fp64) and is cast to ``x.dtype`` once at the
    end; for fp32 inputs it is the same sequence of operations as the plain autograd version.

    Saved for backward: only the inputs, as given (``x``, ``weight``, ``bias``, ``cache``,
    ``position_ids``; no copies), so a call keeps ``B*T*C`` elements of ``x.dtype`` instead of the
    padded input, the masked taps and the SiLU's pre-activation. Backward recomputes the
    pre-activation (K multiply-adds per element) and returns the gradients of ``x``, ``weight``,
    ``bias`` and ``cache`` (the last flows back to whoever produced the cache, e.g. the previous
    context-parallel shard), each in its input's dtype. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, cache, position_ids, silu):
        dtype = torch.promote_types(torch.float32, x.dtype)
        out = _pre_activation(_padded(x, cache, weight.shape[1], dtype), weight, bias, position_ids)
        if silu:
            out = F.silu(out, inplace=True)
        ctx.save_for_backward(x, weight, bias, cache, position_ids)
        ctx.silu, ctx.dtype = silu, dtype
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, cache, position_ids = ctx.saved_tensors
        dtype = ctx.dtype
        need_x, need_w, need_b, need_c = ctx.needs_input_grad[:4]
        B, T, C = x.shape
        K = weight.shape[1]
        padded = _padded(x, cache, K, dtype)
        dpre = dy.to(dtype)
        if ctx.silu:
            dpre = torch.ops.aten.silu_backward(dpre, _pre_activation(padded, weight, bias, position_ids))
        w = weight.to(dtype)
        dw = torch.empty(C, K, dtype=dtype, device=x.device) if need_w else None
        dpad = torch.zeros(B, K - 1 + T, C, dtype=dtype, device=x.device) if (need_x or need_c) else None
        for j in range(K):
            d = dpre if j == 0 or position_ids is None else dpre * _tap_mask(position_ids, j, dtype)
            if need_w:
                dw[:, K - 1 - j] = (d * padded[:, K - 1 - j : K - 1 - j + T]).sum((0, 1))
            if dpad is not None:
                dpad[:, K - 1 - j : K - 1 - j + T].add_(d * w[:, K - 1 - j])
        dx = dpad[:, K - 1 :].to(x.dtype) if need_x else None
        dcache = dpad[:, : K - 1].to(cache.dtype) if need_c else None
        db = dpre.sum((0, 1)).to(bias.dtype) if need_b else None
        return dx, None if dw is None else dw.to(weight.dtype), db, dcache, None, None


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

    Runs as :class:`ShortConvFunction`: math in fp32 (fp64 for fp64 inputs), and only the inputs
    are kept for backward, which recomputes the taps and the SiLU (gradients reach ``x``, the
    weights and ``cache``).

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
        if cache is not None and cache.shape != (B, K - 1, C):
            raise ValueError(f"cache must be [B, K-1, C] = {(B, K - 1, C)}, got {tuple(cache.shape)}")
        return ShortConvFunction.apply(
            x, self.weight, self.bias, cache, position_ids, self.activation == "silu"
        )

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, activation={self.activation}"
