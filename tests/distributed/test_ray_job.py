"""``launch/ray_job.py`` on a local Ray cluster: 2 CPU workers (gloo) against the spawned 2-rank Trainer.

The cluster is started with ``ray start --head`` on 127.0.0.1 only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
keeps Ray from replacing the loopback address by the machine's routable one), with few CPUs and a
small object store, and stopped with ``ray stop`` at teardown. References: the same recipe, seed and
world size run by :class:`~lctrain.train.trainer.Trainer` in 2 processes spawned by torch (no Ray).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lctrain.cluster.ray import PID_DIR, STATUS_FILE, main
from lctrain.config import load_config
from lctrain.data import build_data
from tests.conftest import REPO, fit_worker, free_port, tiny_overrides

pytestmark = pytest.mark.distributed

RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",  # Ray 2.60 token auth: head and clients must agree; tests run without it
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP stays 127.0.0.1 (no traffic off the loopback)
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "OMP_NUM_THREADS": "1",
}
LOSS_ATOL = 1e-6  # Ray vs spawned ranks: same code, same gloo reductions -> equal up to float noise
RESUME_ATOL = 1e-5  # restarted vs uninterrupted (as in tests/distributed/test_train_e2e.py)


def _ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, **RAY_ENV}
    return subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", *args], check=False, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def ray_address():
    """A one-node Ray cluster on 127.0.0.1 (4 logical CPUs, 100 MB object store); ``ray stop`` afterwards."""
    if importlib.util.find_spec("ray") is None:
        pytest.fail('Ray is not installed; these tests need pip install -e ".[ray]" (CI: pip install -e ".[test]")')
    port = free_port()
    proc = _ray_cli(
        "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
        "--object-store-memory=100000000", "--include-dashboard=false", "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}",
    )
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield f"127.0.0.1:{port}"
    finally:
        _ray_cli("stop", "--force")


def _warm_data_cache(args: list[str]) -> None:
    """Build tokenizer and token caches once here, so the reference and the Ray workers only read them."""
    cfg = load_config(args)
    build_data(cfg.data, cfg.data.seq_len, cfg.model.vocab_size, cfg.data.cache_dir)


def _spawned_two_ranks(args: list[str], out_file: Path) -> dict:
    mp.start_processes(fit_worker, args=(2, free_port(), args, str(out_file)), nprocs=2, start_method="spawn")
    return json.loads(out_file.read_text())


def _ray_job(args: list[str], address: str, max_failures: int, cwd: Path = REPO) -> subprocess.Popen:
    cmd = [
        sys.executable, str(REPO / "launch" / "ray_job.py"), *args, "--num-workers", "2", "--gpus-per-worker", "0",
        "--address", address, "--max-failures", str(max_failures),
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **RAY_ENV}, cwd=cwd
    )


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail("ray job timed out:\n" + out[-5000:])
    assert proc.returncode == 0, f"ray job exit code {proc.returncode}:\n" + out[-6000:]
    return out


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _pids(out: Path) -> dict[int, int]:
    return {r: int((out / PID_DIR / f"rank{r}.pid").read_text()) for r in (0, 1)}


# ---------------------------------------------------------------- no cluster needed


def test_bad_worker_count_fails_before_ray_starts(small_corpus, tmp_path, capsys):
    args = tiny_overrides(tmp_path / "run", small_corpus, tmp_path / "cache")
    assert main([*args, "--num-workers", "3", "--gpus-per-worker", "0"]) == 2
    err = capsys.readouterr().err
    assert "train.global_batch_size=8" in err and "--num-workers=3" in err
    assert main([*args, "train.resume=none", "--num-workers", "2", "--gpus-per-worker", "0"]) == 2
    assert "train.resume=auto" in capsys.readouterr().err
    assert main([*args, "parallel.backend=nccl", "--num-workers", "2", "--gpus-per-worker", "0"]) == 2
    assert "--gpus-per-worker" in capsys.readouterr().err


def test_runs_without_ray_do_not_import_it_and_missing_extra_is_named(small_corpus, tmp_path):
    args = tiny_overrides(tmp_path / "run", small_corpus, tmp_path / "cache")
    code = (
        "import sys\n"
        "import lctrain.cluster.ray, lctrain.train.trainer, lctrain.parallel.mesh\n"
        "assert 'ray' not in sys.modules, 'importing lctrain imported ray'\n"
        "sys.modules['ray'] = None  # as if Ray were not installed\n"
        f"sys.exit(lctrain.cluster.ray.main({args!r} + ['--num-workers', '2', '--gpus-per-worker', '0']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert 'pip install -e ".[ray]"' in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


# ---------------------------------------------------------------- local Ray cluster


def test_ray_job_two_cpu_workers_match_spawned_ranks(ray_address, small_corpus, tmp_path):
    """2 Ray workers (gloo) give the per-step losses of 2 torch-spawned ranks, to 1e-6."""
    cache, out = tmp_path / "cache", tmp_path / "ray"
    _warm_data_cache(tiny_overrides(out, small_corpus, cache))
    proc = _ray_job(tiny_overrides(out, small_corpus, cache), ray_address, max_failures=0)
    # The reference trains while Ray starts its workers (both only read the data cache).
    ref = _spawned_two_ranks(tiny_overrides(tmp_path / "ref", small_corpus, cache), tmp_path / "ref.json")
    _finish(proc)
    got = _summary(out)
    assert got["world_size"] == 2 and got["dp_degree"] == 2 and got["steps"] == 4 and len(got["losses"]) == 4
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=LOSS_ATOL)
    assert abs(got["final_val_loss"] - ref["final_val_loss"]) < LOSS_ATOL
    assert json.loads((out / STATUS_FILE).read_text()) == {"status": "done", "steps": 4}
    pids = _pids(out)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()


def test_killed_worker_restarts_from_checkpoint(ray_address, small_corpus, tmp_path):
    """SIGKILL rank 1 (from outside, by its pid file) after the first checkpoint; Ray restarts the workers,
    which resume from the latest checkpoint; every step appears once and equals an uninterrupted run."""
    steps = 12
    extra = {"train.max_steps": steps}
    cache = tmp_path / "cache"
    ref = _spawned_two_ranks(tiny_overrides(tmp_path / "ref", small_corpus, cache, **extra), tmp_path / "ref.json")
    out = tmp_path / "ray"
    proc = _ray_job(tiny_overrides(out, small_corpus, cache, **extra), ray_address, max_failures=1)
    first_ckpt, pid_file = out / "checkpoints" / "step_00000002", out / PID_DIR / "rank1.pid"
    deadline = time.monotonic() + 300
    while not (first_ckpt.exists() and pid_file.exists()):
        assert proc.poll() is None, "ray job ended before its first checkpoint:\n" + proc.communicate()[0][-5000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    killed = int(pid_file.read_text())
    os.kill(killed, signal.SIGKILL)
    log = _finish(proc)
    # Ray Train may echo a worker's print twice (stdout and its log), hence the set.
    resumed = {int(s) for s in re.findall(r"\[lctrain\] resumed from \S+ at step (\d+)", log)}
    assert len(resumed) == 1, log[-5000:]
    (at,) = resumed
    assert at % 2 == 0 and 2 <= at < steps
    assert _pids(out)[1] != killed  # rank 1 is a new process
    got = _summary(out)
    assert got["steps"] == steps and len(got["losses"]) == steps and got["world_size"] == 2
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=RESUME_ATOL)
    assert abs(got["final_val_loss"] - ref["final_val_loss"]) < RESUME_ATOL
