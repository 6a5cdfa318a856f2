"""Context parallelism: one sequence sharded over ``cp_degree`` ranks (zigzag layout).

How the pieces reach the model (all from outside; layers import nothing from here):

1. :func:`build_context_parallel` creates the process groups once (collective) and returns this
   rank's :class:`ContextParallel` handle (None when ``cp_degree == 1``).
2. :func:`apply_context_parallel` swaps every sequence op of the model's mixers
   (:mod:`lctrain.kernels.ops`) for its context-parallel version (:mod:`.ops`), keeping each
   layer's kernel choice; hands the routed layers the group over which their balance statistics
   count (``balance_group``); and tells the model that it sees ``cp_degree`` shards per sequence.
3. The trainer shards each micro-batch with :func:`shard_batch` (tokens, labels and true
   positions zigzag-sharded; ``cu_seqlens`` stays global) and calls the model on its shard.

Softmax attention uses :func:`context_parallel_attention` (ring / Ulysses / USP), linear layers
:func:`cp_gated_delta_rule` / :func:`cp_lightning_attn` (state passing) and
:func:`cp_short_conv` (halo exchange). See ``docs/context_parallel.md``.
"""

from __future__ import annotations

from torch import nn

from lctrain.errors import ConfigError
from lctrain.kernels.ops import SequenceOp, sequence_ops
from lctrain.parallel.context.conv_halo import cp_short_conv
from lctrain.parallel.context.handle import CP_IMPLS, ContextParallel, build_context_parallel, cp_groups_from_mesh
from lctrain.parallel.context.linear import cp_gated_delta_rule, cp_lightning_attn, state_passing
from lctrain.parallel.context.ops import CONTEXT_PARALLEL_OPS, ContextParallelOp, context_parallel_op
from lctrain.parallel.context.usp import context_parallel_attention
from lctrain.parallel.context.zigzag import shard_batch, shard_sequence, unshard_sequence, zigzag_indices

__all__ = [
    "CONTEXT_PARALLEL_OPS", "CP_IMPLS", "ContextParallel", "ContextParallelOp", "apply_context_parallel",
    "build_context_parallel", "context_parallel_attention", "context_parallel_op", "cp_gated_delta_rule",
    "cp_groups_from_mesh", "cp_lightning_attn", "cp_short_conv", "sequence_ops", "shard_batch", "shard_sequence",
    "state_passing", "unshard_sequence", "zigzag_indices",
]


def apply_context_parallel(model: nn.Module, cp: ContextParallel | None) -> nn.Module:
    """Make ``model`` compute on this rank's zigzag shards (in place; returns ``model``).

    With a handle: every :class:`~lctrain.kernels.ops.SequenceOp` attribute of every submodule
    becomes its context-parallel version (:func:`context_parallel_op`), every module with a
    ``balance_group`` attribute (routed layers) gets ``cp.group``, and every module with a
    ``sequence_shards`` attribute (the model) gets ``cp.degree``. ``cp=None`` undoes all of it.

    Every submodule marked as a token mixer (``is_token_mixer = True``: :class:`HybridBlock`
    marks the mixer it builds from the registry) must hold at least one sequence op, else its
    tokens would silently mix only within the shard.

    Raises:
        ConfigError: a sequence op without a context-parallel version, or a token mixer with no
            sequence op.
    """
    for name, m, attr, op in sequence_ops(model):
        if cp is None:
            setattr(m, attr, op.local if isinstance(op, ContextParallelOp) else op)
        else:
            setattr(m, attr, context_parallel_op(op, cp, where=f"{name} ({type(m).__name__})"))
    for name, m in model.named_modules():
        if "balance_group" in vars(m):
            m.balance_group = cp.group if cp is not None else None
        if "sequence_shards" in vars(m):
            m.sequence_shards = cp.degree if cp is not None else 1
        if cp is not None and getattr(m, "is_token_mixer", False):
            if not any(isinstance(v, SequenceOp) for sub in m.modules() for v in vars(sub).values()):
                raise ConfigError(
                    f"{name} ({type(m).__name__}) mixes tokens without a sequence op from lctrain.kernels.ops, so "
                    f"context parallelism cannot reach it; give it one or run with parallel.cp_degree=1"
                )
    return model
