"""MoBA block-sparse attention (Lu et al. 2025, "MoBA: Mixture of Block Attention for
Long-Context LLMs", arXiv:2502.13189): a torch path, Triton kernels and the fp32 reference.

``moba_attn_naive``, ``moba_block_mask``, ``moba_selected_fraction`` and the torch path
``moba_attn_chunk`` need only torch; the Triton functions (``moba_attn_triton``,
``moba_attn_fwd``, ``moba_attn_bwd``) are imported on first use, so this package imports
without triton installed.
"""

from __future__ import annotations

import torch

from lctrain.kernels.moba.chunk import moba_attn_chunk
from lctrain.kernels.moba.naive import moba_attn_naive, moba_block_mask, moba_selected_fraction

_TRITON_API = ("moba_attn_triton", "moba_attn_fwd", "moba_attn_bwd")

__all__ = [
    "moba_attn_bwd",
    "moba_attn_chunk",
    "moba_attn_func",
    "moba_attn_fwd",
    "moba_attn_naive",
    "moba_attn_triton",
    "moba_block_mask",
    "moba_selected_fraction",
]

KERNELS = ("torch", "triton")


def moba_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    top_k: int,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    kernels: str = "torch",
    return_lse: bool = False,
):
    """MoBA attention: each query attends its own key block causally plus the ``top_k - 1``
    past blocks of its document with the highest ``q . mean(K_block)``.

    Semantics (Lu et al. 2025, MoBA, Sec. 2.2; details in :mod:`lctrain.kernels.moba.naive`):
    keys are cut into blocks of ``block_size`` from every document start (the last block of a
    document may be partial); a query in block ``b`` scores past blocks ``j < b`` in fp32, keeps
    the best ``top_k - 1`` (ties to the lower index; all of them if fewer), and the output is
    softmax attention over the union of those blocks and the causal part of its own block. The
    selection is a hard top-k and gets no gradient (as in the paper's implementation):
    gradients reach q, k, v through the attention only.

    Args:
        q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with ``Hq % Hkv == 0`` (GQA: query head ``h``
            reads kv head ``h // (Hq // Hkv)``). One float dtype; the Triton path takes
            fp16/bf16/fp32 with ``D <= 256``.
        block_size: key block length, >= 1.
        top_k: blocks per query counting its own, >= 1 (``top_k = 1``: block-diagonal causal
            attention; ``block_size * top_k >= T``: full causal attention).
        cu_seqlens: optional int32 [N + 1] document boundaries of a packed row (needs B == 1;
            must start at 0 and end at T). No block or attention crosses a boundary.
        scale: logit scale, default ``D ** -0.5``.
        kernels: ``"torch"`` (vectorised torch, autograd backward, computed in fp32) or
            ``"triton"`` (Triton forward/backward kernels, ``lctrain::moba_attn_fwd/bwd``).
        return_lse: also return the fp32 natural-log ``lse`` [B, Hq, T] (differentiable).

    Returns:
        ``out`` [B, T, Hq, D] in q's dtype, or ``(out, lse)``.

    Raises:
        ValueError: bad ranks/shapes, ``Hq % Hkv != 0``, mixed or non-float dtypes,
            ``block_size < 1``, ``top_k < 1``, ``cu_seqlens`` with B != 1 or not a valid
            [0 .. T] boundary list, unknown ``kernels``.
    """
    if kernels == "torch":
        out, lse = moba_attn_chunk(q, k, v, block_size, top_k, cu_seqlens, scale)
    elif kernels == "triton":
        from lctrain.kernels.moba.interface import moba_attn_triton

        out, lse = moba_attn_triton(q, k, v, block_size, top_k, cu_seqlens, scale)
    else:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return (out, lse) if return_lse else out


def __getattr__(name: str):
    if name in _TRITON_API:
        from lctrain.kernels.moba import interface

        return getattr(interface, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
