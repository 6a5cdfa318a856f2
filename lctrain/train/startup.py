"""Start-up checks across ranks: an input error found on some ranks ends every rank, printed once.

A :class:`~lctrain.errors.ConfigError` (bad configuration or input, exit code 2) raised on one
rank while the others wait in a collective would leave them hanging, or crashing with the
backend's own traceback when the failed rank's connection closes. The helpers here turn such a
check into one that every rank finishes together:

- :func:`main_first`: rank 0 runs a step first (building shared caches, say); its success or
  its error message is broadcast, then the other ranks run the step too (reading those caches)
  and :func:`agree` on the result.
- :func:`on_main`: a check that runs on rank 0 only (the run directory's lock); its outcome is
  broadcast the same way.
- :func:`agree`: every rank contributes its error (or None); if any rank failed, rank 0 raises
  a ``ConfigError`` with the first failing rank's message and the others raise
  :class:`~lctrain.errors.ErrorOnAnotherRank`, which :func:`lctrain.cli.run_with_exit_codes` ends
  with exit code 2 without printing.

Errors raised this way are marked as known to every rank; :func:`exit_together` (called by
:func:`lctrain.cli.run_with_exit_codes` once rank 0 has printed the line) holds the ranks until
then, so that the launcher, which stops the others when the first rank exits, cannot stop rank 0
before its message is out. Without a process group every helper just runs / re-raises.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from lctrain.errors import ConfigError, ErrorOnAnotherRank

T = TypeVar("T")


_AGREED = "_lctrain_on_every_rank"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _shared(error: ConfigError) -> ConfigError:
    """Mark ``error`` as raised on every rank (see :func:`exit_together`)."""
    setattr(error, _AGREED, True)
    return error


def exit_together(error: BaseException) -> None:
    """Before a rank exits with code 2: wait for every rank when ``error`` was raised on all of them, then
    ignore SIGTERM (the launcher's way of stopping the other ranks once one has exited).

    Rank 0 calls this after printing the message, so no rank exits (and no launcher stops rank 0)
    before it is printed. A rank exiting with code 2 stays at code 2 instead of being reported as
    killed by SIGTERM.
    """
    if getattr(error, _AGREED, False) and _distributed():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a broken group: the ranks exit on their own
            pass
    # only a rank under a launcher (torchrun) is about to be sent SIGTERM; an in-process call (a
    # test, a notebook) keeps its handlers, since an ignored signal is inherited by every child
    launched = "TORCHELASTIC_RUN_ID" in os.environ or _distributed()
    if launched and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def agree(error: ConfigError | None) -> None:
    """Collective: raise on every rank if any rank's start-up check failed (also a barrier).

    Args:
        error: this rank's failure, or None.

    Raises:
        ConfigError: on rank 0, its own error, or else the first failing rank's message
            (prefixed with ``rank N:``).
        ErrorOnAnotherRank: on the other ranks, when any rank failed (rank 0 prints the message).
    """
    if not _distributed():
        if error is not None:
            raise error
        return
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else str(error))
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if dist.get_rank() != 0:
        raise _shared(ErrorOnAnotherRank(failed[0][1])) from error
    if error is not None:
        raise _shared(error)
    rank, message = failed[0]
    raise _shared(ConfigError(f"rank {rank}: {message}"))


def on_main(check: Callable[[], None]) -> None:
    """Run ``check()`` on rank 0 only and share its outcome (collective).

    Raises:
        ConfigError: on rank 0, ``check()``'s error.
        ErrorOnAnotherRank: on the other ranks when ``check()`` failed on rank 0.
    """
    if not _distributed():
        check()
        return
    error: ConfigError | None = None
    if dist.get_rank() == 0:
        try:
            check()
        except ConfigError as e:
            error = e
    box = [None if error is None else str(error)]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise _shared(error)
    if box[0] is not None:
        raise _shared(ErrorOnAnotherRank(box[0]))


def main_first(step: Callable[[], T]) -> T:
    """Run ``step()`` on rank 0, then, once it succeeded there, on every other rank (collective).

    Rank 0's outcome (None or its error message) is broadcast before the other ranks start, so a
    rank-0 failure ends them without running the step, and no rank waits for a rank that failed.

    Returns:
        ``step()``'s result on this rank.

    Raises:
        ConfigError: ``step()`` failed on rank 0 (raised there), or on another rank (see :func:`agree`).
        ErrorOnAnotherRank: on ranks other than 0 when any rank failed.
    """
    if not _distributed():
        return step()
    main = dist.get_rank() == 0
    result: T | None = None
    error: ConfigError | None = None
    if main:
        try:
            result = step()
        except ConfigError as e:
            error = e
    box = [None if error is None else str(error)]
    dist.broadcast_object_list(box, src=0)
    if main and error is not None:
        raise _shared(error)
    if box[0] is not None:
        raise _shared(ErrorOnAnotherRank(box[0]))
    if not main:
        try:
            result = step()
        except ConfigError as e:
            error = e
    agree(error)
    return result  # type: ignore[return-value]
