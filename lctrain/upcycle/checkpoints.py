"""Seed checkpoints in, upcycled step-0 checkpoints out (both in the trainer's DCP format).

The upcycled model (and each branch, which starts from the parent's weights) is written as an
ordinary lctrain checkpoint ``<out_dir>/checkpoints/step_00000000`` by a real
:class:`~lctrain.train.trainer.Trainer` of the run's config: the weights given, a fresh AdamW
state, the scheduler and data sampler at step 0. ``Trainer(cfg).fit()`` with
``train.resume=auto`` (or ``train.resume=<that directory>``) then loads it like any checkpoint, at
any data- or expert-parallel size (DCP reshards), and a later interruption resumes from the newest
checkpoint as usual.

A fresh optimizer must be stored explicitly: DCP's ``get_state_dict`` materialises the lazy AdamW
state of an optimizer that has none by taking one zero-gradient step (``step = 1``), which would
change the first real updates' bias correction. :func:`write_init_checkpoint` materialises the state
itself and resets ``step`` to 0 with zero moments, which AdamW treats exactly as a new state.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from lctrain.errors import ConfigError
from lctrain.train.checkpoint import COMPLETE_MARKER, TRAINER_STATE, find_latest_checkpoint

__all__ = ["checkpoint_model_config", "checkpoint_state", "load_model_weights", "resolve_checkpoint",
           "write_init_checkpoint"]


def resolve_checkpoint(path: str | Path, what: str) -> Path:
    """A complete checkpoint directory from ``path``: itself, or the newest one under a run directory.

    Args:
        path: a ``step_XXXXXXXX`` directory, a run's ``checkpoints/`` directory or the run
            directory (``train.out_dir``) itself.
        what: the config key or role named in messages (e.g. ``upcycle.parent``).

    Raises:
        ConfigError: ``path`` does not exist or holds no complete checkpoint.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what}: checkpoint {p} does not exist")
    if (p / COMPLETE_MARKER).is_file():
        return p
    for root in (p / "checkpoints", p):
        found = find_latest_checkpoint(root)
        if found is not None:
            return found
    raise ConfigError(
        f"{what}: {p} is not a complete lctrain checkpoint (no {COMPLETE_MARKER} marker) and holds none "
        f"(expected a step_XXXXXXXX directory or a run directory with checkpoints/step_XXXXXXXX)"
    )


def checkpoint_state(path: Path) -> dict:
    """The ``trainer_state.json`` of a checkpoint (train state, the run's config, ...)."""
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def checkpoint_model_config(path: Path, what: str):
    """The :class:`~lctrain.config.ModelConfig` saved with a checkpoint (its ``config.model``).

    Raises:
        ConfigError: the checkpoint carries no config, or one this lctrain cannot read.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from lctrain.config import ModelConfig

    saved = checkpoint_state(path).get("config", {}).get("model")
    if saved is None:
        raise ConfigError(f"{what}: checkpoint {path} has no saved config (trainer_state.json lacks config.model)")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{what}: the model config saved in {path} does not fit this lctrain: {e}") from e


def load_model_weights(path: Path, model_cfg) -> dict[str, torch.Tensor]:
    """Read the model weights of a trainer checkpoint into a CPU state dict (no optimizer, no RNG).

    Each process reads on its own (``no_dist=True``), so it can run on any subset of ranks.
    Expert-parallel checkpoints load whole (their expert tensors are stored as global DTensors);
    DeepSpeed ZeRO checkpoints are consolidated from their shards
    (:func:`lctrain.parallel.deepspeed.consolidate_checkpoint`).

    Args:
        path: a complete checkpoint directory.
        model_cfg: the ModelConfig the checkpoint was written with.

    Returns:
        ``HybridLM(model_cfg).state_dict()`` with the checkpoint's values.

    Raises:
        RuntimeError: from DCP when the checkpoint does not hold this model's parameters.
    """
    from lctrain.models import HybridLM
    from lctrain.parallel.data_parallel import load_model_optim_state, model_optim_state
    from lctrain.train.checkpoint import _marker_engine

    model = HybridLM(model_cfg)
    if _marker_engine(Path(path)) == "deepspeed":  # ZeRO shards -> one plain state dict
        from lctrain.parallel.deepspeed import consolidate_checkpoint

        model.load_state_dict(consolidate_checkpoint(path), strict=True)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = model_optim_state(model, None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    load_model_optim_state(model, None, state)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _fresh_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Materialise the per-parameter state of an optimizer that never stepped, as a fresh one holds it.

    One step with zero gradients and ``lr = 0`` (parameters unchanged: the decoupled decay factor is
    ``1 - 0 * wd`` and the update ``0 * m / (sqrt(v) + eps)``), then every ``step`` counter and
    moment is reset to 0: AdamW's first real step then sees what a new optimizer would.
    """
    lrs = []
    for group in optimizer.param_groups:
        lrs.append(group["lr"])
        group["lr"] = torch.zeros_like(group["lr"]) if torch.is_tensor(group["lr"]) else 0.0
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0


def write_init_checkpoint(cfg, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write ``state_dict`` as the step-0 checkpoint of the run ``cfg`` (``<out_dir>/checkpoints/step_00000000``).

    Collective under torchrun (every rank calls it with the same arguments). A
    :class:`~lctrain.train.trainer.Trainer` of ``cfg`` is built with ``parallel.ep_degree=1`` and
    ``parallel.dp_impl=ddp`` (every rank holds whole parameters; the checkpoint format does not
    depend on either) and ``train.resume=none``; the weights are loaded into it, a fresh optimizer
    state is stored (see the module docstring) and :meth:`Trainer.save` writes the checkpoint with
    the scheduler, sampler and train state of step 0.

    Args:
        cfg: the :class:`~lctrain.config.RunConfig` that will train from the checkpoint.
        state_dict: ``HybridLM(cfg.model).state_dict()``-shaped weights (CPU or any device).

    Returns:
        The checkpoint directory.

    Raises:
        ConfigError: ``state_dict`` does not match the model of ``cfg`` (missing / unexpected
            keys or shapes, named).
    """
    from lctrain.parallel.data_parallel import unwrap
    from lctrain.train.trainer import Trainer

    init = copy.deepcopy(cfg)
    init.parallel.ep_degree = 1
    init.parallel.dp_impl = "ddp"
    init.train.resume = "none"
    trainer = Trainer(init)
    model = unwrap(trainer.model)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    bad = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or bad:
        raise ConfigError(
            f"the weights for {cfg.train.out_dir} do not fit its model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, other shapes {bad[:5]}"
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].device) for k, v in state_dict.items()}, strict=True)
    _fresh_optimizer_state(trainer.optimizer)
    path = trainer.save()
    trainer.close()  # the run lock: the training job that follows takes it
    return path
