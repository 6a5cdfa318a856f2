"""Context parallelism: one sequence sharded over ``cp_degree`` ranks (zigzag layout).

How the pieces reach the model:

1. :func:`build_context_parallel` creates the process groups once (collective) and returns this
   rank's :class:`ContextParallel` handle (None when ``cp_degree == 1``).
2. :func:`apply_context_parallel` stores the handle as ``module.context_parallel`` on the model
   and on every token mixer that supports it (``Attention``, ``GatedDeltaNet``,
   ``LightningAttention``: any module whose class sets ``supports_context_parallel = True``).
   A mixer whose ``context_parallel`` is None runs its single-device path.
3. The trainer shards each micro-batch with :func:`shard_batch` (tokens, labels and true
   positions zigzag-sharded; ``cu_seqlens`` stays global) and calls the model on its shard.

Softmax attention uses :func:`context_parallel_attention` (ring / Ulysses / USP), linear layers
:func:`cp_gated_delta_rule` / :func:`cp_lightning_attn` (state passing) and
:func:`cp_short_conv` (halo exchange). See ``docs/context_parallel.md``.
"""

from __future__ import annotations

from torch import nn

from lctrain.parallel.context.conv_halo import cp_short_conv
from lctrain.parallel.context.handle import (
    CP_IMPLS,
    ContextParallel,
    build_context_parallel,
    check_cp_layout,
    cp_groups_from_mesh,
)
from lctrain.parallel.context.linear import cp_gated_delta_rule, cp_lightning_attn, state_passing
from lctrain.parallel.context.usp import context_parallel_attention
from lctrain.parallel.context.zigzag import shard_batch, shard_sequence, unshard_sequence, zigzag_indices

__all__ = [
    "CP_IMPLS", "ContextParallel", "apply_context_parallel", "build_context_parallel", "check_cp_layout",
    "context_parallel_attention", "cp_gated_delta_rule", "cp_groups_from_mesh", "cp_lightning_attn",
    "cp_short_conv", "shard_batch", "shard_sequence", "state_passing", "unshard_sequence", "zigzag_indices",
]


def apply_context_parallel(model: nn.Module, cp: ContextParallel | None) -> nn.Module:
    """Hand ``cp`` to ``model`` and its context-parallel-aware mixers (in place; returns ``model``).

    Sets ``context_parallel = cp`` on ``model`` and on every submodule whose class itself declares
    ``supports_context_parallel = True``. ``cp=None`` switches them back to single-device.

    Raises:
        ValueError: ``cp`` is given and a submodule inherits ``supports_context_parallel`` from a
            mixer class without declaring it (a subclass with its own ``forward`` would silently
            mix only this rank's tokens); declare it after wiring the handle into its forward.
    """
    model.context_parallel = cp
    for name, m in model.named_modules():
        if type(m).__dict__.get("supports_context_parallel", False):
            m.context_parallel = cp
        elif cp is not None and getattr(m, "supports_context_parallel", False):
            raise ValueError(
                f"{name} ({type(m).__name__}) subclasses a context-parallel mixer without declaring "
                f"supports_context_parallel = True; wire the ContextParallel handle into its forward first"
            )
    return model
