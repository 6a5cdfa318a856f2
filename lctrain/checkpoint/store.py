"""Atomic, resharding checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of one checkpoint ``<ckpt_root>/step_00000100/``::

    .metadata, __<rank>_<i>.distcp   model + optimizer tensors, written by DCP (each rank its shards)
    rng_rank<r>.pt                   RNG states of rank r (torch CPU, CUDA, python, numpy)
    trainer_state.json               the caller's ``extra_state`` (step, sampler, scheduler, ...)
    COMPLETE                         JSON {"step", "world_size", "format", "engine", "files"}; written last

``engine`` is ``dcp`` (the files above) unless the data-parallel backend writes model and
optimizer itself (``dp.checkpoint_engine``): DeepSpeed ZeRO puts its own checkpoint in a
``deepspeed/`` subdirectory instead of the DCP files (:mod:`lctrain.parallel.deepspeed`,
consolidated to plain weights by :mod:`lctrain.checkpoint.consolidate`); RNG,
trainer state, the marker, the temporary directory and the rename are the same for both.

Integrity (format 2): ``COMPLETE["files"]`` maps every other file's path (relative, ``/``) to
``[size_bytes, crc32]`` (``crc32`` is None when ``checksum=False``). The ranks share the hashing
(round-robin over the sorted file list) when saving and when verifying
(:func:`verify_checkpoint`); :func:`find_resumable_checkpoint` skips a checkpoint that fails,
renaming it ``step_XXXXXXXX.corrupt`` (kept for inspection, never pruned). Markers of format 1
(no ``files``) are checked for presence of the files only.

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
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from lctrain.errors import ConfigError
from lctrain.parallel.data_parallel import load_model_optim_state, model_optim_state

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
DCP_METADATA = ".metadata"
FORMAT_VERSION = 2
CORRUPT_SUFFIX = ".corrupt"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_CHUNK = 1 << 22


class CheckpointCorruptError(ConfigError):
    """A checkpoint fails verification: a file listed in its ``COMPLETE`` marker is missing, has
    another size or checksum, or the marker is unreadable. The message names the file.

    Attributes:
        path: the checkpoint directory.
    """

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = Path(path)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written on some rank (disk full, permission denied, a rank failing).

    Raised on every rank. The partial ``.tmp`` directory is removed; earlier checkpoints are untouched.
    """


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


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _listed_files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` except the marker, as sorted ``/``-separated relative paths."""
    names = []
    for p in directory.rglob("*"):
        if p.is_file() and p.name != COMPLETE_MARKER:
            names.append(p.relative_to(directory).as_posix())
    return sorted(names)


def _gather(value: Any) -> list[Any]:
    if not _dist_on():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _file_table(directory: Path, checksum: bool) -> dict[str, list]:
    """``{relative path: [size, crc32 or None]}`` of every file under ``directory`` (collective: ranks share the hashing)."""
    rank, world = _rank_world()
    names = _listed_files(directory) if rank == 0 else None
    if _dist_on():  # rank 0's listing: a shared filesystem may show another rank a stale directory
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    mine, error = {}, None
    try:
        for i, name in enumerate(names):
            if i % world == rank:
                p = directory / name
                mine[name] = [p.stat().st_size, _crc32(p) if checksum else None]
    except OSError as e:
        error = e
    _agree(error, f"recording the files of {directory}")
    table: dict[str, list] = {}
    for part in _gather(mine):
        table.update(part)
    return table


def _verify_files(path: Path, files: dict[str, list], checksum: bool) -> str | None:
    """This rank's share of the verification of ``files``; the first problem found, or None."""
    rank, world = _rank_world()
    for i, (name, (size, crc)) in enumerate(sorted(files.items())):
        p = path / name
        try:
            actual = p.stat().st_size
        except FileNotFoundError:
            return f"{p} is missing"
        except OSError as e:
            return f"{p} cannot be read ({e})"
        if actual != size:
            return f"{p} has {actual} bytes, {size} were written (truncated or overwritten)"
        if checksum and crc is not None and i % world == rank:
            try:
                got = _crc32(p)
            except OSError as e:
                return f"{p} cannot be read ({e})"
            if got != crc:
                return f"{p} fails its checksum (crc32 {got:08x}, {crc:08x} was written): the file is corrupt"
    return None


def verify_checkpoint(path: str | os.PathLike, checksum: bool = True) -> dict:
    """Check a checkpoint against its ``COMPLETE`` marker: every listed file present, same size, same crc32.

    Collective with a process group (the ranks share the checksums; every rank gets the same
    outcome). Format-1 markers (no file list) are checked for the required files only.

    Args:
        path: a checkpoint directory.
        checksum: also compare crc32 checksums (reads every file once); False: sizes only.

    Returns:
        The parsed marker.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointCorruptError: on every rank, naming the first bad file.
    """
    path = Path(path)
    problem = None
    marker: dict = {}
    try:
        marker = _check_checkpoint_dir(path)
        problem = _verify_files(path, marker.get("files") or {}, checksum)
    except FileNotFoundError:
        raise
    except ValueError as e:
        problem = str(e)
    problems = [p for p in _gather(problem) if p is not None]
    if problems:
        raise CheckpointCorruptError(path, f"checkpoint {path} fails verification: {problems[0]}")
    return marker


def _quarantine(path: Path) -> Path:
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{n}")
        n += 1
    os.rename(path, target)
    return target


def find_resumable_checkpoint(ckpt_root: str | os.PathLike, checksum: bool = True) -> Path | None:
    """The newest checkpoint under ``ckpt_root`` that passes :func:`verify_checkpoint` (``train.resume=auto``).

    Collective. A checkpoint that fails is renamed ``step_XXXXXXXX.corrupt`` by rank 0 (so it is
    neither resumed nor pruned, and stays for inspection) with a warning naming the bad file, and
    the next older one is tried.

    Returns:
        The checkpoint directory, or None when there is no checkpoint at all (a fresh run).

    Raises:
        CheckpointCorruptError: checkpoints exist but none verifies (also when only ``.corrupt``
            ones are left from an earlier attempt): starting over silently would lose the run.
    """
    root = Path(ckpt_root)
    rank, _ = _rank_world()
    bad: list[str] = []
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path, checksum=checksum)
            return path
        except CheckpointCorruptError as e:
            bad.append(str(e))
            moved: list[Path] = []
            _on_rank0(lambda: moved.append(_quarantine(path)), f"setting aside the corrupt checkpoint {path}")
            if rank == 0:
                warnings.warn(f"{e}; skipped (moved to {moved[0].name}), trying an older checkpoint", stacklevel=2)
    corrupt = sorted(p.name for p in root.glob(f"step_*{CORRUPT_SUFFIX}*")) if root.is_dir() else []
    if bad or corrupt:
        raise CheckpointCorruptError(
            root,
            f"no checkpoint under {root} passes verification ({'; '.join(bad) or 'set aside earlier: ' + ', '.join(corrupt)}). "
            f"To start this run over, move {root} away or set train.resume=none; to try one anyway, rename it back "
            f"to step_XXXXXXXX and pass train.resume=<its path> with train.checkpoint_checksum=false",
        )
    return None


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


def _remove(path: Path, why: str) -> None:
    """Delete a directory; a failure is reported (a warning naming the path and the error), not raised."""
    errors: list[str] = []

    def record(_fn, where, exc) -> None:  # exc: the exception (onexc), or sys.exc_info() (onerror)
        errors.append(f"{where}: {exc[1] if isinstance(exc, tuple) else exc}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=record)
    else:
        shutil.rmtree(path, onerror=record)
    if errors:
        warnings.warn(f"could not remove {why} {path} ({len(errors)} error(s), first: {errors[0]}); "
                      f"it takes disk space until removed by hand", stacklevel=3)


def _prune(root: Path, keep_last: int, current: Path) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints under ``root`` and interrupted saves.

    The checkpoint just written (``current``) is never removed, even if a stale run left
    higher-numbered ones behind. A directory that cannot be removed is reported with a warning
    naming it; the save still succeeds.
    """
    complete = [p for _, p in list_checkpoints(root)]
    for path in complete[: max(0, len(complete) - keep_last)]:
        if path != current:
            _remove(path, f"the old checkpoint (train.keep_last={keep_last})")
    for child in root.iterdir():
        stem, _, suffix = child.name.rpartition(".")
        if suffix in ("tmp", "old") and _STEP_DIR.match(stem) and child.is_dir():
            _remove(child, "the leftover of an interrupted save")


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
    checksum: bool = True,
) -> Path:
    """Save model, optimizer, per-rank RNG and ``extra_state`` to ``ckpt_root/step_{step:08d}``.

    Collective: with a process group, every rank calls it with the same ``ckpt_root`` and ``step``.
    Sequence: rank 0 clears a stale ``step_XXXXXXXX.tmp``; all ranks ``dcp.save`` their shards and
    write ``rng_rank<r>.pt`` into it; after all ranks are done, rank 0 writes
    ``trainer_state.json``; all ranks record the size and crc32 of every file (sharing the
    hashing); rank 0 writes ``COMPLETE`` with that table, fsyncs, renames the directory to its final name
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
        checksum: record crc32 checksums of the files (``train.checkpoint_checksum``); sizes are
            always recorded.

    Returns:
        Path of the published checkpoint directory.

    Raises:
        ValueError: ``step < 0``, ``keep_last < 1`` or ``extra_state`` is not a JSON-serialisable
            dict (checked before anything is written).
        CheckpointSaveError: on every rank, when any rank failed to write (disk full, permissions,
            a rank's exception); the ``.tmp`` directory is removed and earlier checkpoints are untouched.
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
    engine = getattr(dp, "checkpoint_engine", "dcp") if dp is not None else "dcp"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def finish(files: dict[str, list]) -> None:
        marker = {"step": step, "world_size": world, "format": FORMAT_VERSION, "engine": engine, "time": time.time(),
                  "checksum": "crc32" if checksum else None, "files": files}
        _write_bytes(tmp / COMPLETE_MARKER, json.dumps(marker).encode())
        _fsync_dir(tmp)
        _publish(tmp, final)
        _prune(root, keep_last, final)

    try:
        _on_rank0(prepare, f"preparing {tmp}")
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
        _on_rank0(lambda: _write_bytes(tmp / TRAINER_STATE, state_json.encode()), f"writing {tmp / TRAINER_STATE}")
        files = _file_table(tmp, checksum)
        _on_rank0(lambda: finish(files), f"publishing checkpoint {final}")
    except Exception as e:
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back; never a complete one
        previous = find_latest_checkpoint(root) if root.is_dir() else None
        raise CheckpointSaveError(
            f"saving checkpoint {final} failed: {type(e).__name__}: {e}. "
            f"{'The previous checkpoint ' + str(previous) + ' is intact' if previous else 'No earlier checkpoint exists'}"
            f" and nothing else was removed; fix the cause (free space, permissions on {root}) and restart with "
            f"train.resume=auto"
        ) from e
    return final


def marker_engine(path: Path) -> str:
    """The ``engine`` of a checkpoint's ``COMPLETE`` marker (``dcp`` when absent, unreadable, or an older format)."""
    try:
        return str(json.loads((path / COMPLETE_MARKER).read_text()).get("engine", "dcp"))
    except (OSError, ValueError, AttributeError):
        return "dcp"


def _check_checkpoint_dir(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is not a checkpoint: it is a file, expected a step_XXXXXXXX directory")
    engine = marker_engine(path)
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
        CheckpointCorruptError: (a ValueError) ``path`` is not a complete checkpoint, or a file
            its marker lists is missing or has another size; the message names the file.
        ConfigError: the checkpoint's engine differs from ``dp``'s and cannot be converted here
            (resuming a DeepSpeed checkpoint under DDP/FSDP with an optimizer, or the reverse).
    """
    path = Path(path)
    marker = verify_checkpoint(path, checksum=False)  # files and sizes; resume checks crc32 before (trainer)
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
        raise ConfigError(
            f"checkpoint {path} was written by the {engine!r} checkpoint engine (parallel.dp_impl="
            f"{'deepspeed' if engine == 'deepspeed' else 'ddp or fsdp'}) but this run uses {mine!r}; resume it with "
            f"the same parallel.dp_impl, or convert a DeepSpeed checkpoint to plain weights with "
            f"lctrain.checkpoint.consolidate_checkpoint (weights only, no optimizer state)"
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
        from lctrain.checkpoint.consolidate import consolidate_checkpoint  # imports deepspeed (optional)

        target = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        target.load_state_dict(consolidate_checkpoint(path), strict=True)
    _set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / TRAINER_STATE).read_text())
