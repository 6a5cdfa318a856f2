"""Run safety: one writer per run directory, workers that die with their launcher, stop on a signal.

Three independent pieces the :class:`~lctrain.train.trainer.Trainer` switches on:

* :class:`RunLock`: rank 0 creates ``<train.out_dir>/run.lock`` with ``O_CREAT | O_EXCL`` (one
  atomic create, also on NFS v3+ and Lustre) holding the holder's host, pid, process start time
  and boot id. A second job on the same directory fails at start-up naming the holder. A lock
  whose process is gone (same host, pid dead, or the pid now belongs to another process, or the
  machine rebooted) is taken over with a warning. A lock held from another host cannot be checked
  from here and is never taken over: remove the file once that job is known to be dead.
* :func:`start_parent_watchdog`: under a launcher (torchrun sets ``TORCHELASTIC_RUN_ID``), a
  daemon thread polls the parent pid; when the launcher dies (the worker is re-parented) the rank
  exits at once with :data:`EXIT_PARENT_DIED`, instead of training on beside a restarted job.
  torchrun starts workers in sessions of their own, so a SIGKILL of torchrun alone reaches none
  of them.
* :class:`StopSignals`: SIGTERM / SIGUSR1 (what Slurm and most schedulers send before a kill)
  only set a flag; the trainer all-reduces it after each step so every rank stops after the same
  step, saves a checkpoint and exits with :data:`EXIT_PREEMPTED`.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

from lctrain.errors import ConfigError

__all__ = [
    "EXIT_CHECKPOINT_FAILED", "EXIT_PARENT_DIED", "EXIT_PREEMPTED", "LOCK_FILE", "LockHeldError", "RunLock",
    "StopSignals", "TrainingStopped", "start_parent_watchdog",
]

LOCK_FILE = "run.lock"
# Exit codes of lctrain's launchers beyond 0 (done), 2 (bad config or input), 3 (non-finite loss).
EXIT_PREEMPTED = 4  # stopped by SIGTERM/SIGUSR1 after saving a checkpoint: resume with train.resume=auto
EXIT_CHECKPOINT_FAILED = 5  # a checkpoint could not be written (disk full, permissions); the previous one is intact
EXIT_PARENT_DIED = 6  # the launcher (torchrun agent) died; this rank exited instead of training on


class LockHeldError(ConfigError):
    """Another live job holds the run directory's lock; the message names it and what to do."""


class TrainingStopped(RuntimeError):
    """Training stopped on a signal after saving a checkpoint (``train.save_on_signal``).

    Attributes:
        signum: the signal number received.
        step: the step of the checkpoint saved.
        checkpoint: its directory (None when ``train.checkpoint_every < 0`` disables checkpoints).
    """

    def __init__(self, message: str, signum: int, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


# ---------------------------------------------------------------------------------------------- run lock
def _proc_start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux ``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may contain spaces and parentheses: split after the last ')'
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder_is_dead(holder: dict) -> bool:
    """Whether the holder (same host) is gone: pid dead, pid reused by another process, or a reboot since."""
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
        return True
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return True
    ticks = _proc_start_ticks(pid)
    return holder.get("proc_start") is not None and ticks is not None and ticks != holder["proc_start"]


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} (started {when})"


_HELD: dict[str, list] = {}  # lock path -> [token, count]: re-entrant within one process
_HELD_GUARD = threading.Lock()


class RunLock:
    """Exclusive lock on a run directory, one file ``<directory>/run.lock`` (see the module docstring).

    Re-entrant within one process (a second :class:`RunLock` on the same directory in the same
    process shares the first; the file goes when the last is released). Released by
    :meth:`release` and at interpreter exit; a SIGKILLed holder leaves the file, which the next
    job on the same host takes over.

    Args:
        directory: the run directory (``train.out_dir``); created if missing.

    Raises:
        LockHeldError: a live process (or a process on another host) holds the lock.
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._released = False
        key = str(self.path.resolve())
        self._key = key
        with _HELD_GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
                return
            token = self._acquire()
            _HELD[key] = [token, 1]
        atexit.register(self.release)

    def _info(self, token: str) -> dict:
        return {
            "host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start_ticks(os.getpid()),
            "boot_id": _boot_id(), "started": time.time(), "token": token, "argv": sys.argv[:8],
        }

    def _acquire(self) -> str:
        token = uuid.uuid4().hex
        data = json.dumps(self._info(token)).encode()
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return token
        raise LockHeldError(f"could not take the lock {self.path}: other jobs keep taking it; is another job "
                            f"restarting on train.out_dir={self.path.parent}?")

    def _handle_existing(self) -> None:
        """Raise if the lock's holder may be alive; otherwise move the stale lock aside (then retry)."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile: retry
        except (OSError, ValueError):
            # a holder killed between create and write leaves an empty or partial file; give a live
            # writer a moment, then treat it as stale
            if time.time() - self._mtime() < 5.0:
                time.sleep(0.2)
                return
            holder = {}
        here = socket.gethostname()
        if holder and holder.get("host") != here:
            raise LockHeldError(
                f"train.out_dir={self.path.parent} is in use by another lctrain job on {_describe(holder)} "
                f"(lock file {self.path}). Stop that job first or use another train.out_dir; if that job is "
                f"gone (its node crashed), delete {self.path} and start again"
            )
        if holder and not _holder_is_dead(holder):
            raise LockHeldError(
                f"train.out_dir={self.path.parent} is in use by another lctrain job: {_describe(holder)}, "
                f"command {' '.join(holder.get('argv') or [])!r} (lock file {self.path}). Stop that job "
                f"(kill {holder.get('pid')}) or use another train.out_dir"
            )
        stale = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
        try:
            os.rename(self.path, stale)  # atomic: of several contenders at most one moves this file
        except FileNotFoundError:
            return
        os.unlink(stale)
        warnings.warn(
            f"took over the lock of train.out_dir={self.path.parent} from a job that is gone "
            f"({_describe(holder) if holder else 'unreadable lock file'})",
            stacklevel=4,
        )

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def release(self) -> None:
        """Drop this handle; the last handle in the process removes the file (if it is still ours)."""
        if self._released:
            return
        self._released = True
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _HELD[self._key]
            try:
                if json.loads(self.path.read_text()).get("token") == held[0]:
                    self.path.unlink()
            except (OSError, ValueError):
                pass


# ---------------------------------------------------------------------------------------------- parent watchdog
_WATCHDOG: threading.Thread | None = None


def launched_by_torchrun() -> bool:
    """Whether this process is a worker started by torchrun / torch elastic (``TORCHELASTIC_RUN_ID`` is set)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def start_parent_watchdog(interval_s: float = 0.5, before_exit=None) -> threading.Thread | None:
    """Exit this process (code :data:`EXIT_PARENT_DIED`) within ``interval_s`` of its parent's death.

    A daemon thread compares ``os.getppid()`` with the parent at start: when the parent dies the
    process is re-parented (to init or a subreaper) and the pid changes. ``os._exit`` ends the
    process even while the main thread waits in a collective whose peer is gone. Idempotent.

    Args:
        interval_s: polling period, seconds.
        before_exit: optional callable run just before exiting (e.g. releasing the run lock).

    Returns:
        The thread, or None when the process has no parent to watch (its parent is already pid 1).
    """
    global _WATCHDOG
    if _WATCHDOG is not None:
        return _WATCHDOG
    parent = os.getppid()
    if parent <= 1:
        return None
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            if os.getppid() != parent:
                print(f"[lctrain] pid {os.getpid()}: the launcher (pid {parent}) is gone; exiting "
                      f"(code {EXIT_PARENT_DIED}) instead of training on. Restart the job to resume from the "
                      f"last checkpoint.", file=sys.stderr, flush=True)
                try:
                    if before_exit is not None:
                        before_exit()
                finally:
                    os._exit(EXIT_PARENT_DIED)

    _WATCHDOG = threading.Thread(target=watch, name="lctrain-parent-watchdog", daemon=True)
    _WATCHDOG.start()

    def shut_down(thread: threading.Thread = _WATCHDOG) -> None:
        # a daemon thread still alive at interpreter teardown is ended with pthread_exit, which
        # aborts the process ("terminate called without an active exception") once torch's C++
        # runtime is loaded: stop and join it first
        stop.set()
        thread.join(timeout=2 * interval_s + 1.0)

    atexit.register(shut_down)
    return _WATCHDOG


# ---------------------------------------------------------------------------------------------- stop signals
class StopSignals:
    """Turn SIGTERM / SIGUSR1 into a request to stop after the current step (flag; no work in the handler).

    Installs handlers only in the main thread (Python's rule); elsewhere (e.g. a Ray Train worker
    thread) it does nothing and :attr:`requested` stays None. :meth:`restore` puts the previous
    handlers back.

    Args:
        signals: the signals to catch.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.requested: int | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.requested is None:
            print(f"[lctrain] got {signal.Signals(signum).name}: saving a checkpoint after this step, then "
                  f"exiting (code {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
        self.requested = signum

    def restore(self) -> None:
        """Reinstall the handlers that were there before."""
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
