"""Data parallelism over the mesh's ``dp`` axis: DDP (replicated) or FSDP2 (``fully_shard``).

Both average gradients over the data-parallel ranks; the trainer scales each rank's loss so that
the averaged gradient equals the gradient of the global-batch mean loss (see
``lctrain.train.trainer``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def apply_data_parallel(model: nn.Module, mesh: DeviceMesh | None, dp_impl: str, device: torch.device) -> nn.Module:
    """Wrap ``model`` for data parallelism over ``mesh["dp"]`` (the flattened ``dp x cp`` when cp > 1).

    Args:
        model: the single-device model, already on ``device``.
        mesh: the run's mesh (None: single process, returned unchanged).
        dp_impl: ``ddp`` (DistributedDataParallel) or ``fsdp`` (FSDP2 ``fully_shard`` per block
            and on the root, parameters sharded over ``dp``).
        device: this rank's device.

    Raises:
        ValueError: unknown ``dp_impl``.
    """
    if mesh is None:
        return model
    # context-parallel ranks hold replicated parameters too: average gradients over dp x cp
    dp_mesh = mesh["dp"] if mesh["cp"].size() == 1 else mesh["dp", "cp"]._flatten("dp_cp")
    if dp_impl == "ddp":
        from lctrain.parallel.expert import expert_parameters

        # EP-sharded expert weights differ per EP rank: DDP must not average them
        # (lctrain.parallel.expert.reduce_expert_grads reduces them over their edp group instead).
        ignore = [n for n, _ in expert_parameters(model)]
        if ignore:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            process_group=dp_mesh.get_group(),
            broadcast_buffers=False,
        )
    if dp_impl == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        return model
    raise ValueError(f"parallel.dp_impl={dp_impl!r}: allowed values are ddp, fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying module of a DDP wrapper (FSDP2 modules are their own module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_grad_sync(model: nn.Module, enabled: bool):
    """Context that skips the gradient all-reduce on accumulation micro-steps (``enabled=True``).

    DDP: ``no_sync()``. FSDP2: ``set_requires_gradient_sync(False)`` for the duration.
    """
    if not enabled:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):

        @contextlib.contextmanager
        def _fsdp():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return _fsdp()
    return contextlib.nullcontext()
