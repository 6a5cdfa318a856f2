"""Context-parallel versions of the sequence ops of :mod:`lctrain.kernels.ops`.

:func:`context_parallel_op` maps a mixer's local op to the op with the same call signature that
computes the same result on this rank's zigzag shard, keeping the layer's kernel choice
(``kernels``) and remembering the local op (``local``) so the swap can be undone:

=====================  ===================================================================
local op               context-parallel op
=====================  ===================================================================
SoftmaxAttentionOp     ring / Ulysses / USP attention (:func:`context_parallel_attention`)
MoBAAttentionOp        Ulysses only: whole sequences per rank (:func:`ulysses_local_attention`)
GatedDeltaRuleOp       state passing (:func:`cp_gated_delta_rule`) over the op's kernel
LightningAttnOp        state passing (:func:`cp_lightning_attn`) over the op's kernel
ShortConvOp            halo exchange (:func:`cp_short_conv`)
=====================  ===================================================================

A new op type is refused (:class:`~lctrain.errors.ConfigError`) until a parallel version is
added to :data:`CONTEXT_PARALLEL_OPS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lctrain.errors import ConfigError
from lctrain.kernels.dispatch import use_triton
from lctrain.kernels.limits import LIGHTNING_TRITON_MAX_HEAD_DIM
from lctrain.kernels.ops import (
    GatedDeltaRuleOp,
    LightningAttnOp,
    MoBAAttentionOp,
    SequenceOp,
    ShortConvOp,
    SoftmaxAttentionOp,
)
from lctrain.parallel.context.conv_halo import cp_short_conv
from lctrain.parallel.context.handle import ContextParallel
from lctrain.parallel.context.linear import cp_gated_delta_rule, cp_lightning_attn
from lctrain.parallel.context.usp import context_parallel_attention, ulysses_local_attention


@dataclass
class ContextParallelOp(SequenceOp):
    """Base of the context-parallel ops: ``local`` is the op it replaces, ``cp`` the handle."""

    local: SequenceOp
    cp: ContextParallel

    def __post_init__(self) -> None:
        pass  # the kernel choice was validated by the local op

    @property
    def kernels(self) -> str:  # type: ignore[override]
        return self.local.kernels


@dataclass
class CPSoftmaxAttentionOp(ContextParallelOp):
    """``SoftmaxAttentionOp`` on a zigzag shard: ring, Ulysses or USP per ``cp.impl``."""

    def __call__(self, q, k, v, cu_seqlens=None, scale: float | None = None) -> torch.Tensor:
        return context_parallel_attention(
            q, k, v, cu_seqlens, self.cp, scale=scale, causal=self.local.causal, kernels=self.local.kernels
        )


@dataclass
class CPMoBAAttentionOp(ContextParallelOp):
    """``MoBAAttentionOp`` under Ulysses: block routing needs the whole sequence, so each rank runs
    MoBA for ``Hq / P`` heads over all tokens (:func:`ulysses_local_attention`). Ring and USP are
    refused at start-up (``MoBAConfig.check_context_parallel``) and here."""

    def __call__(self, q, k, v, cu_seqlens=None, scale: float | None = None) -> torch.Tensor:
        return ulysses_local_attention(q, k, v, cu_seqlens, self.cp,
                                       lambda q_, k_, v_, cu: self.local(q_, k_, v_, cu, scale=scale))


@dataclass
class CPGatedDeltaRuleOp(ContextParallelOp):
    """``GatedDeltaRuleOp`` on a zigzag shard: LASP-2 state passing around the op's own kernel."""

    def __call__(self, q, k, v, g, beta, scale: float | None = None, cu_seqlens=None) -> torch.Tensor:
        return cp_gated_delta_rule(q, k, v, g, beta, self.cp, scale=scale, cu_seqlens=cu_seqlens,
                                   kernel=self.local.kernel(q))


@dataclass
class CPLightningAttnOp(ContextParallelOp):
    """``LightningAttnOp`` on a zigzag shard: state passing around the op's own (torch or Triton) kernel."""

    def __call__(self, q, k, v, slope, scale: float | None = None, cu_seqlens=None) -> torch.Tensor:
        tri = use_triton(self.local.kernels, q, "lightning_attn")
        return cp_lightning_attn(q, k, v, slope, self.cp, scale=scale, cu_seqlens=cu_seqlens,
                                 chunk_size=self.local.chunk_size, kernel=self.local.kernel(q),
                                 max_value_dim=LIGHTNING_TRITON_MAX_HEAD_DIM if tri else None)


@dataclass
class CPShortConvOp(ContextParallelOp):
    """``ShortConvOp`` on a zigzag shard: each chunk's ``kernel_size - 1`` halo comes from its predecessor."""

    def __call__(self, conv, x: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        return cp_short_conv(conv, x, position_ids, self.cp)


CONTEXT_PARALLEL_OPS: dict[type, Callable[[SequenceOp, ContextParallel], ContextParallelOp]] = {
    SoftmaxAttentionOp: CPSoftmaxAttentionOp,
    MoBAAttentionOp: CPMoBAAttentionOp,
    GatedDeltaRuleOp: CPGatedDeltaRuleOp,
    LightningAttnOp: CPLightningAttnOp,
    ShortConvOp: CPShortConvOp,
}


def context_parallel_op(op: SequenceOp, cp: ContextParallel, where: str = "") -> ContextParallelOp:
    """The context-parallel op replacing ``op`` (re-wrapping an already swapped op uses its ``local``).

    Raises:
        ConfigError: no context-parallel version of ``type(op)`` is registered.
    """
    local = op.local if isinstance(op, ContextParallelOp) else op
    make = CONTEXT_PARALLEL_OPS.get(type(local))
    if make is None:
        known = ", ".join(t.__name__ for t in CONTEXT_PARALLEL_OPS)
        raise ConfigError(
            f"{where or 'a layer'} uses the sequence op {type(local).__name__}, which has no context-parallel "
            f"version (known: {known}); run it with parallel.cp_degree=1"
        )
    return make(local, cp)
