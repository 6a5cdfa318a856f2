"""Sequence ops: the one seam between a token mixer and whatever computes its sequence mixing.

Every mixer keeps the op that mixes information along the sequence as an attribute holding one
of these small objects (``Attention.attn_op``, ``GatedDeltaNet.delta_rule_op`` and
``conv_op``, ``LightningAttention.lightning_op``). On one device the op calls the local kernel
for its ``kernels`` choice (``auto | torch | triton``). A parallel scheme applied from outside
(``apply_context_parallel`` of the parallel package) replaces the op by one with the same
call signature that computes the same result on a sequence shard, keeping ``kernels``: the
layer's own code never changes and never imports a parallel module.

Each op class is a :class:`SequenceOp`; the parallel side finds them by type, so a new mixer
that reuses these ops gets context parallelism for free, and one with a new op type is refused
under context parallelism until a parallel version is registered for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lctrain.kernels.dispatch import check_kernels, pick_kernel, use_triton


class SequenceOp:
    """Base class of the swappable sequence ops (see module docstring).

    Attributes:
        kernels: ``auto`` | ``torch`` | ``triton`` | ``fla``, validated at construction (``fla``:
            fla-core's kernels for Gated DeltaNet and Lightning, ``auto`` for the other ops).
    """

    kernels: str = "auto"

    def __post_init__(self) -> None:
        check_kernels(self.kernels, type(self).__name__)


@dataclass
class SoftmaxAttentionOp(SequenceOp):
    """Causal (or full) softmax attention of :func:`lctrain.kernels.softmax_attn.softmax_attention`.

    ``__call__(q [B,T,Hq,Dh], k, v [B,T,Hkv,Dh], cu_seqlens int32 [N+1] | None, scale=None)
    -> [B,T,Hq,Dh]`` in ``q.dtype``.
    """

    kernels: str = "auto"
    causal: bool = True

    def __call__(self, q, k, v, cu_seqlens=None, scale: float | None = None) -> torch.Tensor:
        from lctrain.kernels.softmax_attn import softmax_attention

        return softmax_attention(q, k, v, cu_seqlens=cu_seqlens, scale=scale, causal=self.causal, kernels=self.kernels)


@dataclass
class MoBAAttentionOp(SequenceOp):
    """MoBA block-sparse causal attention (Lu et al. 2025) of :func:`lctrain.kernels.moba.moba_attn_func`.

    ``__call__(q [B,T,Hq,Dh], k, v [B,T,Hkv,Dh], cu_seqlens int32 [N+1] | None, scale=None)
    -> [B,T,Hq,Dh]``: each query attends its own key block causally plus the ``top_k - 1`` past
    blocks of ``block_size`` keys (in its document) with the highest ``q . mean(K_block)``.
    """

    kernels: str = "auto"
    block_size: int = 64
    top_k: int = 3

    def __call__(self, q, k, v, cu_seqlens=None, scale: float | None = None) -> torch.Tensor:
        from lctrain.kernels.moba import moba_attn_func

        impl = "triton" if use_triton(self.kernels, q, "moba") else "torch"
        return moba_attn_func(q, k, v, self.block_size, self.top_k, cu_seqlens=cu_seqlens, scale=scale, kernels=impl)


@dataclass
class GatedDeltaRuleOp(SequenceOp):
    """The chunked gated delta rule (Yang et al., ICLR 2025, eq. 10).

    ``__call__(q, k [B,T,H,K], v [B,T,H,V], g, beta [B,T,H] fp32, scale, cu_seqlens) -> o [B,T,H,V]``.
    :meth:`kernel` returns the raw kernel (signature of ``chunk_gated_delta_rule`` without
    ``chunk_size``) for tensors like ``x``: what state passing calls under context parallelism.
    """

    kernels: str = "auto"
    chunk_size: int = 64

    def kernel(self, x: torch.Tensor) -> Callable:
        """Per :func:`pick_kernel`: ``chunk_gated_delta_rule_triton``, fla's chunk kernel
        (:func:`lctrain.kernels.fla_backend.fla_chunk_gated_delta_rule`) or the torch path, with
        ``chunk_size`` bound where the kernel takes it."""
        impl = pick_kernel(self.kernels, x, "gated_delta_rule")
        if impl == "fla":
            from lctrain.kernels.fla_backend import fla_chunk_gated_delta_rule

            return functools.partial(fla_chunk_gated_delta_rule, chunk_size=self.chunk_size)
        from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule, chunk_gated_delta_rule_triton

        if impl == "triton":
            return chunk_gated_delta_rule_triton
        return functools.partial(chunk_gated_delta_rule, chunk_size=self.chunk_size)

    def __call__(self, q, k, v, g, beta, scale: float | None = None, cu_seqlens=None) -> torch.Tensor:
        o, _ = self.kernel(q)(q, k, v, g, beta, scale=scale, cu_seqlens=cu_seqlens)
        return o


@dataclass
class LightningAttnOp(SequenceOp):
    """Lightning Attention (Qin et al., arXiv:2401.04658): ``S_t = exp(-slope) S_{t-1} + k_t v_t^T``.

    ``__call__(q, k [B,T,H,K], v [B,T,H,V], slope [H] fp32, scale=None, cu_seqlens=None) -> o``.
    :meth:`kernel` returns the raw kernel (signature of ``chunk_lightning_attn``) with
    ``chunk_size`` bound.
    """

    kernels: str = "auto"
    chunk_size: int = 64

    def kernel(self, x: torch.Tensor) -> Callable:
        """Per :func:`pick_kernel`: ``chunk_lightning_attn_triton``, fla's ``chunk_simple_gla``
        with fixed decays (:func:`lctrain.kernels.fla_backend.fla_chunk_lightning_attn`) or the
        torch chunk path."""
        impl = pick_kernel(self.kernels, x, "lightning_attn")
        if impl == "fla":
            from lctrain.kernels.fla_backend import fla_chunk_lightning_attn as fn
        elif impl == "triton":
            from lctrain.kernels.lightning_attn import chunk_lightning_attn_triton as fn
        else:
            from lctrain.kernels.lightning_attn import chunk_lightning_attn as fn
        return functools.partial(fn, chunk_size=self.chunk_size)

    def __call__(self, q, k, v, slope, scale: float | None = None, cu_seqlens=None) -> torch.Tensor:
        o, _ = self.kernel(q)(q, k, v, slope, scale=scale, cu_seqlens=cu_seqlens)
        return o


@dataclass
class ShortConvOp(SequenceOp):
    """Apply a causal short convolution module: ``__call__(conv, x [B,T,C], position_ids [B,T]) -> [B,T,C]``.

    ``conv`` is a :class:`lctrain.layers.conv.ShortConvolution` (its weights stay in the layer);
    under context parallelism the op fetches the ``kernel_size - 1`` halo from the previous shard.
    """

    kernels: str = "auto"

    def __call__(self, conv, x: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        return conv(x, position_ids)


def sequence_ops(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str, SequenceOp]]:
    """``(module name, module, attribute, op)`` of every sequence op held by a submodule of ``model``.

    What the kernel plan (:func:`lctrain.kernels.plan.apply_kernel_plan`) and context parallelism
    walk to reach every mixer's ops.
    """
    found = []
    for name, m in model.named_modules():
        for attr, value in vars(m).items():
            if isinstance(value, SequenceOp):
                found.append((name, m, attr, value))
    return found
