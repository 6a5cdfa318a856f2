"""Atomic, resharding checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of one checkpoint ``<ckpt_root>/step_00000100/``::

    .metadata, __<rank>_<i>.distcp   model + optimizer tensors, written by DCP (each rank its shards)
    rng_rank<r>.pt                   RNG states of rank r (torch CPU, CUDA, python, numpy)
    trainer_state.json               the caller's ``extra_state`` (step, sampler, scheduler, ...)
    COMPLETE                         JSON {"step", "world_size", "format", "engine"}; written last

``engine`` is ``dcp`` (the files above) unless the data-parallel backend writes model and
optimizer itself (``dp.checkpoint_engine``): DeepSpeed ZeRO puts its own checkpoint in a
``deepspeed/`` subdirectory instead of the DCP files (:mod:`lctrain.parallel.deepspeed`); RNG,
trainer state, the marker, the temporary directory and the rename are the same for both.

A save writes into ``step_XXXXXXXX.tmp`` and rank 0 renames it to ``step_XXXXXXXX`` only after
every rank has finished and ``COMPLETE`` is on disk, then fsyncs the parent directory. A crash at
any point leaves either the previous checkpoints untouched plus a ``.tmp`` directory that
:func:`find_latest_checkpoint` ignores, or a complete new checkpoint.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict.get_state_dict``
/ ``set_state_dict``, which key everything by parameter name without wrapper prefixes, so the
same code serves plain modules, DDP and FSDP2, and a checkpoint written by N ranks loads on M
ranks (DCP reshards on load). ``ckpt_root`` must be on a filesystem every rank can see.

Works with or without an initialised ``torch.distributed`` process group (single process:
``no_dist=True`` is passed to DCP). With a process group, every rank must call the functions
(they are collective); with NCCL each rank's CUDA device must be set (``torch.cuda.set_device``),
as for DCP itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from lctrain.parallel.data_parallel import load_model_optim_state, model_optim_state

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
DCP_METADATA = ".metadata"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def checkpoint_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps: ``step_{step:08d}``."""
    return f"step_{step:08d}"


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    if _dist_on():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(error: BaseException | None, what: str) -> None:
    """Raise on every rank if any rank failed (instead of leaving the others in a barrier).

    Also acts as a barrier. The failing rank re-raises its own exception.
    """
    if not _dist_on():
        if error is not None:
            raise error
        return
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise RuntimeError(f"{what} failed on rank(s) " + "; ".join(f"{r}: {e}" for r, e in failed))


def _on_rank0(fn: Callable[[], None], what: str) -> None:
    rank, _ = _rank_world()
    error = None
    if rank == 0:
        try:
            fn()
        except BaseException as e:
            error = e
    _agree(error, what)


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns on every single-process save/load even when no_dist=True is passed on purpose.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": None,
    }
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the checkpoint itself
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("numpy") is not None:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _write_rng_state(directory: Path, rank: int) -> None:
    path = directory / f"rng_rank{rank}.pt"
    torch.save(_rng_state(), path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``ckpt_root`` as ``(step, path)``, oldest first.

    A directory counts when its name is ``step_<8+ digits>`` (so ``.tmp`` / ``.old`` directories of
    interrupted saves are skipped) and it holds the ``COMPLETE`` marker. A missing root gives [].
    """
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under ``ckpt_root``, or None if there is none.

    Ignores temporary directories (``step_XXXXXXXX.tmp``) and any directory without the
    ``COMPLETE`` marker, i.e. saves that were interrupted.
    """
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def _prune(root: Path, keep_last: int, current: Path) -> None:
    complete = [p for _, p in list_checkpoints(root)]
    # Order is by step; the checkpoint just written is never removed even if a stale run left
    # higher-numbered ones behind.
    for path in complete[: max(0, len(complete) - keep_last)]:
        if path != current:
            shutil.rmtree(path, ignore_errors=True)
    for child in root.iterdir():
        stem, _, suffix = child.name.rpartition(".")
        if suffix in ("tmp", "old") and _STEP_DIR.match(stem) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` (one atomic ``rename``) and fsync the parent directory.

    An existing ``final`` (same step saved twice) is first renamed to ``final.old`` because a
    directory cannot be renamed onto a non-empty one; a crash between the two renames leaves this
    step only as ``.old`` / ``.tmp``, which are ignored, so the previous step is resumed instead.
    """
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(
    ckpt_root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra_state: dict,
    keep_last: int,
    dp=None,
) -> Path:
    """Save model, optimizer, per-rank RNG and ``extra_state`` to ``ckpt_root/step_{step:08d}``.

    Collective: with a process group, every rank calls it with the same ``ckpt_root`` and ``step``.
    Sequence: rank 0 clears a stale ``step_XXXXXXXX.tmp``; all ranks ``dcp.save`` their shards and
    write ``rng_rank<r>.pt`` into it; after all ranks are done, rank 0 writes
    ``trainer_state.json`` and then ``COMPLETE``, fsyncs, renames the directory to its final name
    (an existing checkpoint of the same step is replaced), fsyncs ``ckpt_root`` and deletes all but
    the newest ``keep_last`` complete checkpoints (never the one just written) and leftover
    ``.tmp`` directories. A failure on any rank raises on every rank.

    Args:
        ckpt_root: directory holding the checkpoints (created if missing), on a filesystem shared
            by all ranks.
        step: optimizer steps completed, >= 0.
        model: plain module, DDP or FSDP2 model.
        optimizer: its optimizer, or None to save the model only.
        extra_state: JSON-serialisable dict (scheduler / sampler state, losses, config ...); rank
            0's copy is written.
        keep_last: how many complete checkpoints to keep, >= 1.
        dp: the :class:`~lctrain.parallel.data_parallel.DataParallel` backend, or None. When its
            ``checkpoint_engine`` is not ``dcp`` (DeepSpeed), ``dp.save_engine_state(tmp)`` writes
            model and optimizer instead of DCP (collective as well).

    Returns:
        Path of the published checkpoint directory.

    Raises:
        ValueError: ``step < 0``, ``keep_last < 1`` or ``extra_state`` is not a JSON-serialisable
            dict (checked before anything is written).
        RuntimeError: another rank failed while saving.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1 (train.keep_last)")
    if not isinstance(extra_state, dict):
        raise ValueError(f"extra_state must be a dict, got {type(extra_state).__name__}")
    try:
        state_json = json.dumps(extra_state, indent=1)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"extra_state is not JSON-serialisable ({e}); convert tensors with .item()/.tolist() "
            "and paths with str()"
        ) from e

    rank, world = _rank_world()
    root = Path(ckpt_root)
    final = root / checkpoint_dir_name(step)
    tmp = root / (final.name + ".tmp")

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    _on_rank0(prepare, f"preparing {tmp}")

    engine = getattr(dp, "checkpoint_engine", "dcp") if dp is not None else "dcp"
    if engine == "dcp":
        with _quiet_single_process():
            dcp.save(model_optim_state(model, optimizer), checkpoint_id=str(tmp), no_dist=not _dist_on())
    else:
        dp.save_engine_state(tmp)
    error = None
    try:
        _write_rng_state(tmp, rank)
    except BaseException as e:
        error = e
    _agree(error, f"writing RNG state into {tmp}")

    def finish() -> None:
        _write_bytes(tmp / TRAINER_STATE, state_json.encode())
        marker = {"step": step, "world_size": world, "format": FORMAT_VERSION, "engine": engine, "time": time.time()}
        _write_bytes(tmp / COMPLETE_MARKER, json.dumps(marker).encode())
        _fsync_dir(tmp)
        _publish(tmp, final)
        _prune(root, keep_last, final)

    _on_rank0(finish, f"publishing checkpoint {final}")
    return final


def _marker_engine(path: Path) -> str:
    """``engine`` of a checkpoint's ``COMPLETE`` marker (``dcp`` when absent, unreadable, or an older format)."""
    try:
        return str(json.loads((path / COMPLETE_MARKER).read_text()).get("engine", "dcp"))
    except (OSError, ValueError, AttributeError):
        return "dcp"


def _check_checkpoint_dir(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is not a checkpoint: it is a file, expected a step_XXXXXXXX directory")
    engine = _marker_engine(path)
    required = (COMPLETE_MARKER, DCP_METADATA, TRAINER_STATE) if engine == "dcp" else (COMPLETE_MARKER, TRAINER_STATE)
    missing = [n for n in required if not (path / n).is_file()]
    if engine != "dcp" and not (path / engine).is_dir():
        missing.append(f"{engine}/")
    if COMPLETE_MARKER in missing:
        hint = (
            " (an interrupted save: use find_latest_checkpoint to pick the newest complete one)"
            if (path / DCP_METADATA).exists() or path.name.endswith(".tmp") else ""
        )
        raise ValueError(
            f"{path} is not a complete checkpoint: missing {', '.join(missing)}{hint}"
        )
    if missing:
        raise ValueError(f"{path} is not a valid checkpoint: missing {', '.join(missing)}")
    try:
        return json.loads((path / COMPLETE_MARKER).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / COMPLETE_MARKER} is corrupt ({e})") from e


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None, dp=None
) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` / ``optimizer`` in place.

    Collective with a process group. The number of ranks and the wrapping (plain, DDP, FSDP2) may
    differ from the saving run: DCP reshards. Build the optimizer exactly as when saving (same
    parameter groups, e.g. with :func:`lctrain.train.optim.build_optimizer`); its hyper-parameters
    (lr, betas, ...) are restored from the checkpoint.

    Gradients held by ``optimizer``'s parameters are discarded (set to None) before loading.

    RNG: this rank's states (torch CPU, CUDA, python ``random``, numpy) are restored from
    ``rng_rank<r>.pt``. When that file does not exist (resuming on more ranks than saved), rank
    0's file is used and a warning is issued: the extra ranks then share rank 0's random stream.

    Args:
        path: a checkpoint directory (e.g. from :func:`find_latest_checkpoint`).
        model: module to load into (same architecture as saved).
        optimizer: optimizer to load into, or None to load the model only.
        dp: the data-parallel backend, or None. A checkpoint whose marker names another engine
            (DeepSpeed) is loaded by ``dp.load_engine_state(path)`` when ``dp`` has that engine;
            without such a backend and with ``optimizer=None``, its weights are consolidated to a
            plain state dict and loaded into ``model`` (evaluation, export).

    Returns:
        The ``extra_state`` dict saved with the checkpoint (parsed ``trainer_state.json``).

    Raises:
        FileNotFoundError: ``path`` does not exist, or it has no RNG file for rank 0.
        ValueError: ``path`` is not a complete checkpoint; the message names the missing files.
        ConfigError: the checkpoint's engine differs from ``dp``'s and cannot be converted here
            (resuming a DeepSpeed checkpoint under DDP/FSDP with an optimizer, or the reverse).
    """
    path = Path(path)
    marker = _check_checkpoint_dir(path)
    rank, _ = _rank_world()
    rng_file = path / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        fallback = path / "rng_rank0.pt"
        if not fallback.is_file():
            raise FileNotFoundError(f"{path} has no RNG state file ({rng_file.name} nor rng_rank0.pt)")
        warnings.warn(
            f"checkpoint {path} was written by {marker.get('world_size', '?')} rank(s); rank {rank} "
            f"has no {rng_file.name} and restores rank 0's RNG state",
            stacklevel=2,
        )
        rng_file = fallback

    engine = str(marker.get("engine", "dcp"))
    mine = getattr(dp, "checkpoint_engine", "dcp") if dp is not None else "dcp"
    if engine != mine and not (engine == "deepspeed" and optimizer is None):
        from lctrain.errors import ConfigError

        raise ConfigError(
            f"checkpoint {path} was written by the {engine!r} checkpoint engine (parallel.dp_impl="
            f"{'deepspeed' if engine == 'deepspeed' else 'ddp or fsdp'}) but this run uses {mine!r}; resume it with "
            f"the same parallel.dp_impl, or convert a DeepSpeed checkpoint to plain weights with "
            f"lctrain.parallel.deepspeed.consolidate_checkpoint (weights only, no optimizer state)"
        )
    if optimizer is not None:
        # get_state_dict only materialises the (lazy) AdamW state of a fresh optimizer when no
        # gradient is set; with stale gradients the optimizer state would silently stay empty.
        optimizer.zero_grad(set_to_none=True)
    if engine == mine == "dcp":
        state = model_optim_state(model, optimizer)
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), no_dist=not _dist_on())
        load_model_optim_state(model, optimizer, state)
    elif engine == mine:
        dp.load_engine_state(path)
    else:  # a DeepSpeed checkpoint into a plain module (weights only): consolidated from the ZeRO shards
        from lctrain.parallel.deepspeed import consolidate_checkpoint

        target = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        target.load_state_dict(consolidate_checkpoint(path), strict=True)
    _set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / TRAINER_STATE).read_text())
