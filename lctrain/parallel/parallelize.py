"""``parallelize()``: every parallelism applied to a single-device model from outside, in one order.

Order (each step sees the result of the previous one, as torchtitan's ``parallelize_*`` do):

1. **Expert parallelism** (``ep > 1``): each MoE layer keeps its slice of experts and gets the
   all-to-all dispatcher (:func:`lctrain.parallel.expert.shard_experts`). First, because it
   changes which parameters exist and which are replicated.
2. **Context parallelism** (``cp > 1``): every mixer's sequence ops become their
   context-parallel versions (:func:`lctrain.parallel.context.apply_context_parallel`).
3. **Activation checkpointing** (``model.activation_checkpointing``): each block recomputes its
   forward in backward (:func:`apply_activation_checkpointing`), around the ops chosen above.
   Then **compilation** (``train.compile``): each block is ``torch.compile``d on its own
   (:func:`apply_compile`; the Triton kernels are custom ops, so they stay single graph nodes),
   as torchtitan compiles per block before FSDP wraps it.
4. **Data parallelism**: the :class:`~lctrain.parallel.data_parallel.DataParallel` backend for
   ``parallel.dp_impl`` wraps the model, averaging replicated gradients over ``dp x cp`` ranks
   (FSDP with bf16 training: bf16 all-gathered parameters, fp32 gradient reduction). DeepSpeed
   ZeRO (``deepspeed``) builds its engine later, when the trainer hands it the optimizer
   (:meth:`~lctrain.parallel.data_parallel.DataParallel.attach_optimizer`).

The model code never imports any of this.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lctrain.layers.routing import recomputing
from lctrain.parallel.context import (
    ContextParallel,
    apply_context_parallel,
    build_context_parallel,
    cp_groups_from_mesh,
)
from lctrain.parallel.data_parallel import DataParallel, build_data_parallel
from lctrain.parallel.expert import ExpertParallel, build_expert_parallel, shard_experts
from lctrain.parallel.mesh import DistEnv, Meshes, ParallelDims


@dataclass
class Parallelized:
    """What :func:`parallelize` returns.

    Attributes:
        model: the model to train (wrapped by the data-parallel backend).
        dp: the data-parallel backend (loss scaling, no_sync, gradient finishing, clipping, state).
        cp: this rank's context-parallel handle, or None.
        ep: the expert-parallel groups, or None.
    """

    model: nn.Module
    dp: DataParallel
    cp: ContextParallel | None
    ep: ExpertParallel | None


def _recompute_contexts():
    # forward as usual; the recomputation in backward marks itself so step statistics count once
    return contextlib.nullcontext(), recomputing()


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_recompute_contexts, **kwargs)
    return forward(*args, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block of ``model.layers`` in backward (``torch.utils.checkpoint``, non-reentrant).

    The block's ``forward`` is replaced on the instance (module names and state-dict keys stay
    the same, so checkpoints load with or without it); evaluation (no grad) runs plainly.
    Idempotent. Returns ``model``.
    """
    for block in getattr(model, "layers", []):
        if not getattr(block, "_lctrain_checkpointed", False):
            block.forward = functools.partial(_checkpointed, block.forward)
            block._lctrain_checkpointed = True
    return model


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` every block of ``model.layers`` in place (``Module.compile``); returns ``model``.

    Module names and state-dict keys stay the same. ``backend``: ``inductor`` (fused kernels; on
    CPU it needs a C++ compiler), ``aot_eager`` (traces forward and backward without code
    generation: what the CPU test uses) or ``eager``.
    """
    for block in getattr(model, "layers", []):
        block.compile(backend=backend)
    return model


def parallelize(model: nn.Module, dims: ParallelDims, meshes: Meshes, cfg, env: DistEnv) -> Parallelized:
    """Apply expert, context, activation-checkpointing and data parallelism to ``model`` (see module docstring).

    Args:
        model: the single-device model on ``env.device``, built with the same seed on every rank.
        dims: the degrees; meshes: from ``dims.build_meshes(env)``.
        cfg: the :class:`lctrain.config.RunConfig` (``parallel.*``, ``model.activation_checkpointing``).
        env: this process's :class:`~lctrain.parallel.mesh.DistEnv`.

    Returns:
        :class:`Parallelized`. Collective over all ranks (process groups are created).

    Raises:
        ConfigError: a layer that context parallelism cannot reach.
    """
    p = cfg.parallel
    ep = None
    if dims.ep > 1:
        ep = build_expert_parallel(env.device.type, dims.ep, meshes.ep)
        shard_experts(model, ep)
    cp = None
    if dims.cp > 1:
        cp = build_context_parallel(cp_groups_from_mesh(meshes.world), p.cp_impl, p.ulysses_degree)
        apply_context_parallel(model, cp)
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model, cfg.train.compile_backend)
    t = cfg.train
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and env.device.type == "cuda")
    dp = build_data_parallel(p.dp_impl, meshes.grad_mesh(), env.device, dims.grad_average_degree,
                             param_dtype=torch.bfloat16 if bf16 else None, run_cfg=cfg)
    return Parallelized(dp.wrap(model), dp, cp, ep)
