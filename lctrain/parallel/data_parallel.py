"""Data-parallel backends behind one small interface: DDP (replicated) and FSDP2 (``fully_shard``).

Every backend averages replicated gradients over the mesh's ``dp`` axis (the flattened
``dp x cp`` when context parallelism is on: cp ranks replicate the parameters too). The trainer
talks to a :class:`DataParallel` only:

* :meth:`~DataParallel.wrap` the (already expert-sharded, context-parallel) model;
* :meth:`~DataParallel.no_sync` on accumulation micro-steps;
* :meth:`~DataParallel.scale_loss` before ``backward``: the summed micro-batch loss times
  ``loss_scale / global_tokens`` so that the averaged gradient is the gradient of the global-batch
  mean loss (``loss_scale`` is the averaging degree);
* :meth:`~DataParallel.finish_backward` after the last micro-step (expert-parallel weights,
  skipped by DDP, are reduced over their expert-data-parallel group with the *same* factor);
* :meth:`~DataParallel.clip_grad_norm_`;
* :meth:`~DataParallel.state_dict` / :meth:`~DataParallel.load_state_dict` for checkpoints
  (parameter-name keys without wrapper prefixes, expert weights as global DTensors).

Hooks for backends that own more of the step (DeepSpeed's engine, :mod:`lctrain.parallel.deepspeed`);
the defaults below are what DDP and FSDP do:

* :meth:`~DataParallel.attach_optimizer` once the optimizer exists (returns the model to call);
* :meth:`~DataParallel.backward` on the scaled loss (default ``loss.backward()``);
* :meth:`~DataParallel.step` after the last micro-step: clip, optimizer step, zero the gradients;
* :meth:`~DataParallel.zero_grad` to drop the gradients of a skipped (non-finite) step;
* ``checkpoint_engine`` (``"dcp"``: state through :meth:`state_dict`; anything else: the backend
  writes its own files with :meth:`save_engine_state` / :meth:`load_engine_state`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh

from lctrain.parallel import expert as expert_parallel

DP_IMPLS = ("ddp", "fsdp", "deepspeed")


def model_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` for DCP (``optim`` left out when ``optimizer`` is None).

    Keys are parameter names without wrapper prefixes (``get_state_dict``); expert-parallel weights
    become global ``[E, ...]`` DTensors (:func:`lctrain.parallel.expert.expert_state_to_dtensor`),
    so any ``ep_degree`` (or one process) loads them.
    """
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    return expert_parallel.expert_state_to_dtensor(model, state)


def load_model_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Write a state filled by DCP (from :func:`model_optim_state`) back into ``model`` / ``optimizer``."""
    expert_parallel.expert_state_to_local(model, state)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class DataParallel:
    """One process (no gradient communication); the base of the real backends.

    Args:
        loss_scale: factor the summed loss is multiplied by (before ``/ global_tokens``): the
            number of ranks over which replicated gradients are averaged (1 here).
    """

    checkpoint_engine = "dcp"  # how lctrain.checkpoint stores model + optimizer (see the module docstring)

    def __init__(self, loss_scale: float = 1.0):
        self.loss_scale = float(loss_scale)
        self.model: nn.Module | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        """Return the model to train (here: ``model`` itself)."""
        self.model = model
        return model

    def no_sync(self, enabled: bool):
        """Context that skips gradient communication while ``enabled`` (accumulation micro-steps)."""
        return contextlib.nullcontext()

    def scale_loss(self, loss_sum: torch.Tensor, global_tokens: float) -> torch.Tensor:
        """``loss_sum * loss_scale / global_tokens``: the tensor to call ``backward`` on."""
        return loss_sum * (self.loss_scale / global_tokens)

    def finish_backward(self) -> None:
        """Called once after the last micro-step of an optimizer step (nothing to do here)."""

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Called once with the optimizer built over the wrapped model's parameters; returns the model to call.

        DDP and FSDP return the model of :meth:`wrap` unchanged (a DeepSpeed backend builds its
        engine here, since the engine takes model and optimizer together).
        """
        return self.model

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a (scaled, see :meth:`scale_loss`) micro-batch loss: ``loss.backward()``."""
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """The optimizer step after the last micro-step: clip (:meth:`clip_grad_norm_`), step, zero the gradients.

        Returns:
            The global gradient L2 norm before clipping.
        """
        norm = self.clip_grad_norm_(max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the accumulated gradients without stepping (a skipped, non-finite step)."""
        optimizer.zero_grad(set_to_none=True)

    def save_engine_state(self, directory) -> None:
        """Write model and optimizer state into ``directory`` (backends whose ``checkpoint_engine != "dcp"``)."""
        raise NotImplementedError(f"{type(self).__name__} checkpoints through DCP (state_dict)")

    def load_engine_state(self, directory) -> None:
        """Inverse of :meth:`save_engine_state` (backends whose ``checkpoint_engine != "dcp"``)."""
        raise NotImplementedError(f"{type(self).__name__} checkpoints through DCP (load_state_dict)")

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip all gradients by their global L2 norm (``max_norm <= 0``: no clipping); returns the norm."""
        limit = max_norm if max_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def state_dict(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Model (and optimizer) state for a DCP checkpoint (see :func:`model_optim_state`)."""
        return model_optim_state(self.model, optimizer)

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer | None) -> None:
        """Inverse of :meth:`state_dict` after DCP filled ``state``."""
        load_model_optim_state(self.model, optimizer, state)


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that turns off the buffer broadcast before every forward.

    Buffers (RoPE tables, Lightning slopes, expert biases updated from all-reduced loads) are equal
    on every rank. torch >= 2.13 names the switch ``forward_sync_buffers`` and deprecates
    ``broadcast_buffers`` (a FutureWarning per rank); older versions only know ``broadcast_buffers``.
    ``forward_sync_buffers=False`` still broadcasts the buffers once at wrapping, from rank 0,
    which leaves these equal buffers as they are.
    """
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class DDPDataParallel(DataParallel):
    """``DistributedDataParallel`` over ``mesh``; expert-parallel weights are left to :meth:`finish_backward`.

    Expert weights sharded over EP ranks differ per rank, so DDP must not average them: they are
    excluded from DDP and :func:`lctrain.parallel.expert.reduce_expert_grads` sums them over
    their expert-data-parallel group and divides by ``loss_scale``, which gives exactly the
    gradient of the single-process model. Clipping then counts each EP rank's experts once
    (:func:`lctrain.parallel.expert.clip_grad_norm_`).
    """

    def __init__(self, mesh: DeviceMesh, device: torch.device, loss_scale: float):
        super().__init__(loss_scale)
        self.mesh, self.device = mesh, device
        self.has_experts = False

    def wrap(self, model: nn.Module) -> nn.Module:
        ignore = [n for n, _ in expert_parallel.expert_parameters(model)]
        self.has_experts = bool(ignore)
        if ignore:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        self.model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            process_group=self.mesh.get_group(),
            **_no_forward_buffer_sync(),
            # gradients are views into the all-reduce buckets: no second copy of every gradient
            gradient_as_bucket_view=True,
        )
        return self.model

    def no_sync(self, enabled: bool):
        return self.model.no_sync() if enabled else contextlib.nullcontext()

    def finish_backward(self) -> None:
        if self.has_experts:  # the same factor as scale_loss: DDP averaged the others over loss_scale ranks
            expert_parallel.reduce_expert_grads(self.model, divisor=self.loss_scale)

    def clip_grad_norm_(self, max_norm: float) -> float:
        if not self.has_experts:
            return super().clip_grad_norm_(max_norm)
        return float(expert_parallel.clip_grad_norm_(self.model, max_norm if max_norm > 0 else float("inf")))


class FSDPDataParallel(DataParallel):
    """FSDP2 ``fully_shard`` on every block of ``model.layers`` and on the root, sharded over ``mesh``.

    ``param_dtype=torch.bfloat16`` (what :func:`lctrain.parallel.parallelize` passes for
    ``train.dtype`` bf16, and for ``auto`` on CUDA) gives ``fully_shard`` a
    ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: parameters are all-gathered
    and computed in bf16, gradients reduce-scattered in fp32 into the fp32 master shards the
    optimizer updates. None keeps everything in the parameters' dtype (fp32).
    """

    def __init__(self, mesh: DeviceMesh, loss_scale: float, param_dtype: torch.dtype | None = None):
        super().__init__(loss_scale)
        self.mesh = mesh
        self.param_dtype = param_dtype

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {}
        if self.param_dtype is not None:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        for block in getattr(model, "layers", []):
            fully_shard(block, mesh=self.mesh, **kw)
        fully_shard(model, mesh=self.mesh, **kw)
        self.model = model
        return model

    def no_sync(self, enabled: bool):
        if not enabled:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def _fsdp():
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)

        return _fsdp()


def build_data_parallel(dp_impl: str, mesh: DeviceMesh | None, device: torch.device, loss_scale: float,
                        param_dtype: torch.dtype | None = None, run_cfg=None) -> DataParallel:
    """The backend for ``parallel.dp_impl`` over the gradient-averaging ``mesh`` (None: one process).

    ``param_dtype``: the compute dtype of FSDP's mixed-precision policy (see :class:`FSDPDataParallel`);
    DDP keeps fp32 parameters and autocast casts per op. ``run_cfg``: the
    :class:`~lctrain.config.RunConfig`, needed by ``deepspeed`` (its engine config is generated
    from it; one process included, the engine then runs on a one-rank group).

    Raises:
        ValueError: unknown ``dp_impl``, or ``deepspeed`` without ``run_cfg``.
    """
    if dp_impl not in DP_IMPLS:
        raise ValueError(f"parallel.dp_impl={dp_impl!r}: allowed values are {', '.join(DP_IMPLS)}")
    if dp_impl == "deepspeed":
        if run_cfg is None:
            raise ValueError("parallel.dp_impl=deepspeed needs run_cfg (the RunConfig its engine config is built from)")
        from lctrain.parallel.deepspeed import DeepSpeedDataParallel

        return DeepSpeedDataParallel(run_cfg, device, loss_scale)
    if mesh is None:
        return DataParallel(loss_scale)
    if dp_impl == "ddp":
        return DDPDataParallel(mesh, device, loss_scale)
    return FSDPDataParallel(mesh, loss_scale, param_dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying module of a DDP wrapper or a DeepSpeed engine (FSDP2 modules are their own module)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        return model.module
    return model
