"""Short causal convolution on zigzag shards: fetch the ``K-1`` token halo of each chunk.

A causal convolution of ``K`` taps at the first tokens of zigzag chunk ``c`` reads the last
``K-1`` inputs of chunk ``c-1``, which another rank holds (rank ``c-1`` for ``c <= P``, rank
``2P-1-(c-1)`` above). Every rank all-gathers the tails of its two chunks (``2 (K-1)`` tokens:
tiny next to the sequence) and picks the tail preceding each of its chunks; the document mask of
:class:`~lctrain.layers.conv.ShortConvolution` (true positions) still zeroes taps that cross a
document start. The gather is differentiable, so halo gradients return to their owners.
"""

from __future__ import annotations

import torch
from torch import nn

from lctrain.parallel.context.comm import all_gather_stack
from lctrain.parallel.context.handle import ContextParallel


def cp_short_conv(
    conv: nn.Module, x: torch.Tensor, position_ids: torch.Tensor | None, cp: ContextParallel
) -> torch.Tensor:
    """``conv`` over this rank's zigzag shard as if over the whole sequence.

    Args:
        conv: the layer's short convolution (``lctrain.layers.conv.ShortConvolution``, kernel K).
        x: [B, T/P, C] this rank's inputs (chunks ``r`` then ``2P-1-r``, ``c = T/(2P)`` each).
        position_ids: [B, T/P] true positions within documents, or None (no document masking).
        cp: the handle.

    Returns:
        [B, T/P, C] in ``x.dtype``.

    Raises:
        ValueError: a chunk is shorter than the halo (``c < K - 1``).
    """
    K = conv.kernel_size
    if K == 1:
        return conv(x, position_ids)
    B, Tl, C = x.shape
    c = Tl // 2
    h = K - 1
    if c < h:
        raise ValueError(f"zigzag chunk of {c} tokens is shorter than the convolution halo {h}; use longer sequences")
    tails = torch.stack((x[:, c - h : c], x[:, Tl - h :]))  # tails of chunks r and 2P-1-r
    every = all_gather_stack(tails, cp.group)  # [P, 2, B, h, C]
    P = cp.degree

    def tail_of(chunk: int) -> torch.Tensor:
        if chunk < 0:
            return x.new_zeros(B, h, C)
        return every[chunk, 0] if chunk < P else every[2 * P - 1 - chunk, 1]

    a, b = cp.chunk_ids()
    pa = pb = None
    if position_ids is not None:
        pa, pb = position_ids[:, :c], position_ids[:, c:]
    return torch.cat((conv(x[:, :c], pa, cache=tail_of(a - 1)), conv(x[:, c:], pb, cache=tail_of(b - 1))), 1)
