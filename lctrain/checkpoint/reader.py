"""The one reader of checkpoints and runs on disk: resolve, verify, saved config, weights.

Every caller that reads back what the trainer wrote goes through here: resume (the trainer),
``launch/eval.py`` and ``launch/generate.py`` (:func:`lctrain.eval.run.load_run`),
``launch/export.py`` and ``launch/import_hf.py`` (:mod:`lctrain.export.cli`), upcycling
(:mod:`lctrain.upcycle.pipeline`) and DeepSpeed consolidation
(:func:`lctrain.checkpoint.consolidate_checkpoint`).

* :func:`resolve_checkpoint`: a ``step_XXXXXXXX`` directory, or the newest complete one under a run
  directory or its ``checkpoints/``.
* :func:`open_checkpoint`: that, verified against its ``COMPLETE`` marker (sizes and crc32
  checksums, as resume does); a file that fails is named in the :class:`CheckpointCorruptError`
  (a :class:`~lctrain.errors.ConfigError`: exit code 2 in the launchers).
* :func:`read_run_config` (``<run>/config.yaml``) and :func:`checkpoint_model_config`
  (``config.model`` of the checkpoint's ``trainer_state.json``): both merged over the schema by
  :func:`saved_config`.
* :func:`load_weights`: the checkpoint's weights into a single-device model (DCP read in this
  process alone; DeepSpeed ZeRO shards consolidated); :func:`load_model_weights`: the same as a
  CPU state dict of a fresh ``HybridLM``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from lctrain.checkpoint.store import (
    COMPLETE_MARKER,
    TRAINER_STATE,
    CheckpointCorruptError,
    find_latest_checkpoint,
    marker_engine,
    verify_checkpoint,
)
from lctrain.config import ModelConfig, RunConfig
from lctrain.errors import ConfigError
from lctrain.models import HybridLM
from lctrain.parallel.data_parallel import load_model_optim_state, model_optim_state

__all__ = ["checkpoint_model_config", "checkpoint_state", "load_model_weights", "load_weights", "open_checkpoint",
           "read_run_config", "resolve_checkpoint", "saved_config"]


def resolve_checkpoint(path: str | os.PathLike, what: str) -> Path:
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


def open_checkpoint(path: str | os.PathLike, what: str = "checkpoint", checksum: bool = True) -> Path:
    """:func:`resolve_checkpoint`, then :func:`~lctrain.checkpoint.verify_checkpoint` (collective with a process group).

    Args:
        path: as for :func:`resolve_checkpoint`.
        what: the config key or role named in messages.
        checksum: compare crc32 checksums too (reads every file once); False: presence and sizes.

    Returns:
        The verified checkpoint directory.

    Raises:
        ConfigError: no such checkpoint.
        CheckpointCorruptError: a file is missing, truncated or fails its checksum (named), or the
            directory is not a complete checkpoint.
    """
    ckpt = resolve_checkpoint(path, what)
    try:
        verify_checkpoint(ckpt, checksum=checksum)
    except CheckpointCorruptError as e:
        raise CheckpointCorruptError(e.path, f"{what}: {e}") from e
    return ckpt


def checkpoint_state(path: str | os.PathLike) -> dict:
    """The ``trainer_state.json`` of a checkpoint (train state, the run's config, data fingerprint, ...)."""
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def saved_config(schema: type, saved: Any, source: str):
    """``saved`` (a dict, or an OmegaConf node read from a file) merged over ``schema``'s defaults, not re-validated.

    Keys this lctrain added since the file was written take their defaults.

    Raises:
        ConfigError: ``saved`` has keys or values the schema does not accept (``source`` is named).
    """
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), saved))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source} does not match this lctrain's config schema: {e}") from e


def checkpoint_model_config(path: str | os.PathLike, what: str) -> ModelConfig:
    """The :class:`~lctrain.config.ModelConfig` saved with a checkpoint (its ``config.model``).

    Raises:
        ConfigError: the checkpoint carries no config, or one this lctrain cannot read.
    """
    try:
        saved = checkpoint_state(path).get("config", {}).get("model")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: cannot read {Path(path) / TRAINER_STATE} ({e})") from e
    if saved is None:
        raise ConfigError(f"{what}: checkpoint {path} has no saved config (trainer_state.json lacks config.model)")
    return saved_config(ModelConfig, saved, f"{what}: the model config saved in {path}")


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The :class:`~lctrain.config.RunConfig` of ``run_dir/config.yaml`` (merged over the schema defaults, not re-validated).

    Raises:
        FileNotFoundError: no ``config.yaml`` (not a run directory).
        ConfigError: the file does not match the schema.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.yaml (train one with "
                                f"launch/train.py train.out_dir={run_dir})")
    try:
        loaded = OmegaConf.load(path)
    except (OSError, ValueError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path} cannot be read: {e}") from e
    return saved_config(RunConfig, loaded, str(path))


def load_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Load a checkpoint's model weights into ``model`` in place (single device, no optimizer, no RNG).

    Each process reads on its own (``no_dist=True``), so it runs on any subset of ranks.
    Expert-parallel checkpoints load whole (their expert tensors are stored as global DTensors);
    DeepSpeed ZeRO checkpoints are consolidated from their shards
    (:func:`lctrain.checkpoint.consolidate_checkpoint`). Verify first (:func:`open_checkpoint`).

    Args:
        path: a complete checkpoint directory.
        model: a plain (unwrapped) module of the checkpoint's architecture.

    Raises:
        RuntimeError: from DCP (or the consolidation) when the checkpoint does not hold this model's parameters.
    """
    path = Path(path)
    if marker_engine(path) == "deepspeed":  # ZeRO shards -> one plain state dict
        # here, not at the top: consolidate reads the saved config through this module (a cycle)
        from lctrain.checkpoint.consolidate import consolidate_checkpoint

        model.load_state_dict(consolidate_checkpoint(path), strict=True)
        return
    state = model_optim_state(model, None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    load_model_optim_state(model, None, state)


def load_model_weights(path: str | os.PathLike, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint as a CPU state dict (:func:`load_weights` into ``HybridLM(model_cfg)``).

    Args:
        path: a complete checkpoint directory.
        model_cfg: the ModelConfig the checkpoint was written with.

    Returns:
        ``HybridLM(model_cfg).state_dict()`` with the checkpoint's values.
    """
    model = HybridLM(model_cfg)
    load_weights(path, model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
