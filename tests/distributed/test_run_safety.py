"""Run safety as it fails on clusters: SIGKILLed jobs, dead launchers, a second job, SIGTERM.

Each test starts real launchers (``torchrun`` with 2 gloo ranks, or ``python launch/train.py``)
in subprocesses and kills them the way schedulers and people do. The reference for losses is the
same tiny run done uninterrupted in one process (data-parallel losses equal the single-process
ones to ~1e-7, see tests/distributed/test_seams_baseline.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lctrain.config import load_config
from lctrain.checkpoint import find_latest_checkpoint, list_checkpoints
from lctrain.train.safety import EXIT_PREEMPTED, LOCK_FILE
from lctrain.train.trainer import train
from tests.conftest import REPO, free_port, tiny_overrides

pytestmark = pytest.mark.distributed

TRAIN = str(REPO / "launch" / "train.py")


def _args(out: Path, corpus: Path, cache: Path, **extra) -> list[str]:
    base = {"train.eval_every": 0, "train.keep_last": 2, "model.gdn.chunk_size": 16}
    return tiny_overrides(out, corpus, cache, **{**base, **extra})


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


def _torchrun(nproc: int, args: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "--monitor-interval=0.2", TRAIN, *args]
    return _start(cmd, log)


def _python(args: list[str], log: Path) -> subprocess.Popen:
    return _start([sys.executable, TRAIN, *args], log)


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _wait_for(cond, proc: subprocess.Popen | None, timeout: float, poll: float = 0.005) -> bool:
    """Poll ``cond()`` until true (True) or ``proc`` ended / the timeout passed (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return cond()
        time.sleep(poll)
    return False


def _steps_saved(run: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(run / "checkpoints")]


def _tmp_save_in_progress(run: Path) -> bool:
    root = run / "checkpoints"
    return root.is_dir() and any(p.name.endswith(".tmp") for p in root.iterdir())


@pytest.fixture(scope="module")
def data(small_corpus, tmp_path_factory):
    """The corpus and a warm data cache (tokenizer and token streams built once)."""
    root = tmp_path_factory.mktemp("safety")
    cache = root / "cache"
    train(load_config(_args(root / "warm", small_corpus, cache, **{"train.max_steps": 1})))
    return small_corpus, cache, root


def _reference(data, name: str, **extra) -> list[float]:
    corpus, cache, root = data
    return train(load_config(_args(root / name, corpus, cache, **extra)))["losses"]


def _chaos(data, tmp_path, kills: int, max_steps: int, seed: int) -> dict:
    """Kill a 2-rank run (launcher and workers together, SIGKILL) ``kills`` times, restart until done."""
    corpus, cache, _ = data
    run = tmp_path / "run"
    args = _args(run, corpus, cache, **{"train.max_steps": max_steps, "train.checkpoint_every": 2})
    rng = random.Random(seed)
    log = tmp_path / "log.txt"
    killed: list[str] = []
    starts = 0
    t0 = time.monotonic()
    while True:
        starts += 1
        proc = _torchrun(2, args, log)
        if len(killed) < kills:
            mode = ["random", "during_save", "startup"][len(killed) % 3]
            if mode == "during_save":  # SIGKILL while a step_XXXXXXXX.tmp directory is being written
                hit = _wait_for(lambda: _tmp_save_in_progress(run), proc, timeout=120)
            elif mode == "startup":  # before or around the first step of this attempt
                hit = not _wait_for(lambda: False, proc, timeout=rng.uniform(0.5, 4.0))
            else:  # a random moment once this attempt has made progress
                before = len(_steps_saved(run))
                hit = _wait_for(lambda: len(_steps_saved(run)) > before, proc, timeout=120)
                hit = hit and not _wait_for(lambda: False, proc, timeout=rng.uniform(0.0, 0.4))
            procs = _tree(proc)
            if hit and proc.poll() is None:
                _kill_all(procs)
                proc.wait(timeout=30)
                killed.append(f"{mode}@{_steps_saved(run)[-1:] or 'none'}")
                continue
        rc = proc.wait(timeout=300)
        assert rc == 0, log.read_text()[-6000:]
        if (run / "summary.json").exists():
            break
    return {"run": run, "killed": killed, "starts": starts, "wall_s": time.monotonic() - t0,
            "log": log.read_text()}


def _check_chaos(result: dict, ref: list[float], max_steps: int) -> None:
    summary = json.loads((result["run"] / "summary.json").read_text())
    losses = summary["losses"]
    assert summary["steps"] == max_steps and len(losses) == max_steps  # each step once
    assert max(abs(a - b) for a, b in zip(losses, ref)) <= 1e-5, (losses, ref)
    assert not (result["run"] / LOCK_FILE).exists()
    print(f"chaos: survived {len(result['killed'])} kills {result['killed']} in {result['starts']} starts, "
          f"{result['wall_s']:.1f} s")


def test_chaos_sigkill_launcher_and_workers(data, tmp_path):
    """3 SIGKILLs (random moment, during a save, during start-up), restarts with resume=auto: exact losses."""
    ref = _reference(data, "chaos_ref", **{"train.max_steps": 16, "train.checkpoint_every": 2})
    result = _chaos(data, tmp_path, kills=3, max_steps=16, seed=0)
    assert len(result["killed"]) == 3, result["killed"]
    assert "took over the lock" in result["log"]  # the SIGKILLed rank 0 left its lock behind
    _check_chaos(result, ref, 16)


@pytest.mark.slow
def test_chaos_many_kills(data, tmp_path):
    ref = _reference(data, "chaos_ref_long", **{"train.max_steps": 40, "train.checkpoint_every": 2})
    result = _chaos(data, tmp_path, kills=9, max_steps=40, seed=1)
    assert len(result["killed"]) == 9, result["killed"]
    _check_chaos(result, ref, 40)


def test_workers_exit_when_launcher_is_killed(data, tmp_path):
    corpus, cache, _ = data
    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = _torchrun(2, _args(run, corpus, cache, **{"train.max_steps": 100000, "train.checkpoint_every": 1}), log)
    try:
        assert _wait_for(lambda: len(_steps_saved(run)) >= 1, proc, timeout=120), log.read_text()[-4000:]
        workers = _tree(proc)[1:]
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: torchrun's workers are in sessions of their own
        proc.wait(timeout=10)
        t0 = time.monotonic()
        _, alive = psutil.wait_procs(workers, timeout=10)
        elapsed = time.monotonic() - t0
        assert not alive, f"workers outlived their launcher: {alive}"
        assert elapsed < 5.0, elapsed
    finally:
        _kill_all(_tree(proc) + [p for p in psutil.process_iter() if p.pid != os.getpid() and _is_ours(p, run)])
    assert "the launcher" in log.read_text() and "is gone" in log.read_text()


def _is_ours(p: psutil.Process, run: Path) -> bool:
    try:
        return any(str(run) in a for a in p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def test_sigterm_saves_exits_4_and_resume_is_exact_and_second_job_is_refused(data, tmp_path):
    """One process: SIGTERM -> checkpoint of that step, exit code 4; a second job on the directory
    meanwhile fails naming the holder; resuming gives the uninterrupted run's losses.

    A constant learning rate makes the loss curve independent of ``train.max_steps``, so the
    signalled run can be endless and the resumed and reference runs stop a few steps later.
    """
    corpus, cache, _ = data
    run = tmp_path / "run"
    const = {"optim.schedule": "constant", "train.checkpoint_every": 1}
    first = _python(_args(run, corpus, cache, **const, **{"train.max_steps": 100000}), tmp_path / "first.txt")
    try:
        assert _wait_for(lambda: len(_steps_saved(run)) >= 2, first, timeout=120), (tmp_path / "first.txt").read_text()
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid
        second = subprocess.run([sys.executable, TRAIN, *_args(run, corpus, cache)], capture_output=True, text=True,
                                timeout=120, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert second.returncode == 2, second.stderr[-3000:]
        assert "in use by another lctrain job" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        rc = first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    text = (tmp_path / "first.txt").read_text()
    assert rc == EXIT_PREEMPTED, text[-4000:]
    stopped_at = int(text.split("stopped by SIGTERM after step ")[1].split()[0])
    assert stopped_at >= 2
    assert find_latest_checkpoint(run / "checkpoints").name == f"step_{stopped_at:08d}"
    assert not (run / LOCK_FILE).exists() and not (run / "summary.json").exists()
    end = {**const, "train.max_steps": stopped_at + 3}
    resumed = train(load_config(_args(run, corpus, cache, **end)))
    ref = _reference(data, "sigterm_ref", **end)
    assert len(resumed["losses"]) == stopped_at + 3
    assert max(abs(a - b) for a, b in zip(resumed["losses"], ref)) <= 1e-5


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step(data, tmp_path):
    """SIGTERM to torchrun (what srun forwards): it relays it to both ranks, which agree on the step,
    save it and stop; the restarted run continues the loss curve exactly."""
    corpus, cache, _ = data
    run = tmp_path / "run"
    const = {"optim.schedule": "constant", "train.checkpoint_every": 1}
    log = tmp_path / "log.txt"
    proc = _torchrun(2, _args(run, corpus, cache, **const, **{"train.max_steps": 100000}), log)
    try:
        assert _wait_for(lambda: len(_steps_saved(run)) >= 2, proc, timeout=120), log.read_text()[-4000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            _kill_all(_tree(proc))
    text = log.read_text()
    reports = [int(part.split()[0]) for part in text.split("stopped by SIGTERM after step ")[1:]]
    assert len(reports) == 2 and reports[0] == reports[1], text[-4000:]  # both ranks, the same step
    stopped_at = reports[0]
    assert find_latest_checkpoint(run / "checkpoints").name == f"step_{stopped_at:08d}"
    end = {**const, "train.max_steps": stopped_at + 3}
    resumed = train(load_config(_args(run, corpus, cache, **end)))
    ref = _reference(data, "sigterm2_ref", **end)
    assert len(resumed["losses"]) == stopped_at + 3
    assert max(abs(a - b) for a, b in zip(resumed["losses"], ref)) <= 1e-5
