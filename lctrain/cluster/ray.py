"""Run a recipe on a Ray cluster with Ray Train's ``TorchTrainer``; restarts resume from lctrain checkpoints.

One Ray worker per GPU (``--gpus-per-worker 1``), or CPU workers with gloo when no GPU is asked
for. Ray Train starts the ``torch.distributed`` process group over its workers (NCCL on GPUs, gloo
on CPUs) and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`lctrain.parallel.mesh.init_distributed`
reuses that group, so the recipe's ``dp x cp`` mesh is built over the Ray workers exactly as over
torchrun's processes and the training code is the same.

Fault tolerance. Ray's own checkpoint mechanism is not used: every worker runs
:func:`lctrain.train.trainer.train` with ``train.resume=auto``, and ``FailureConfig(max_failures=K)``
makes Ray start a fresh worker group after a lost worker or node (up to ``K`` times). The new group
finds the latest complete lctrain checkpoint (DCP, atomic) under ``train.out_dir/checkpoints`` and
continues from it, with the data sampler, optimizer, scheduler and RNG state restored, so the losses
equal an uninterrupted run. ``train.out_dir`` (and the data cache beside it) must therefore be on
storage every node sees (NFS, Lustre, a shared volume); the Ray run state goes to the same place.

Each worker writes its process id to ``<out_dir>/ray_workers/rank<r>.pid`` when it starts (which
process is which rank, for operators and for the fault test that kills one from outside).

Workers import lctrain by name: install it on every node (the Docker image does), submit with
``ray job submit --working-dir <checkout>``, or start the driver from the checkout's root (Ray puts the
driver's working directory on the workers' ``sys.path``).

Importing this module does not import Ray; :func:`require_ray` does, and names the extra to install
when it is missing. Exit codes of :func:`main` follow ``launch/train.py``: 0 done, 1 the job failed
(after ``max_failures`` restarts), 2 bad configuration, 3 non-finite loss, 4 Ray is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lctrain.config import ConfigError, load_config

RAY_INSTALL_HINT = 'pip install -e ".[ray]" (from the lctrain checkout)'
PID_DIR = "ray_workers"
STATUS_FILE = "ray_status.json"
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_NONFINITE, EXIT_NO_RAY = 0, 1, 2, 3, 4


class RayNotInstalledError(ImportError):
    """Ray (with its Train and job-submission parts) is not importable; install the ``ray`` extra."""


def require_ray() -> ModuleType:
    """Import and return ``ray`` with ``ray.train`` and ``ray.train.torch`` loaded.

    Raises:
        RayNotInstalledError: Ray or Ray Train is missing; the message says ``pip install -e ".[ray]"``.
    """
    try:
        import ray
        import ray.train
        import ray.train.torch
    except ImportError as e:
        raise RayNotInstalledError(
            f"launching on Ray needs Ray Train, which is not installed ({e}); install it with: "
            f"{RAY_INSTALL_HINT}  (this installs ray[train,default])"
        ) from e
    return ray


@dataclass
class RayJobSpec:
    """Everything the driver needs to start one Ray training job.

    Attributes:
        overrides: ``recipe=NAME [scale=NAME] key=value ...`` passed to every worker's
            :func:`~lctrain.config.load_config`; ends with an absolute ``train.out_dir``.
        out_dir: absolute run directory (checkpoints, summary.json); must be on shared storage.
        num_workers: Ray workers = ranks of the process group (``dp x cp`` of the recipe).
        gpus_per_worker: GPUs reserved per worker; 0 runs CPU workers with gloo.
        cpus_per_worker: CPUs reserved per worker (Ray also sets ``OMP_NUM_THREADS`` to this).
        backend: ``nccl`` or ``gloo`` (from ``parallel.backend``, ``auto`` -> by device).
        address: Ray cluster address (``auto``, ``HOST:PORT``, ``ray://...``); None uses
            ``RAY_ADDRESS`` when set (as under ``ray job submit``) or starts a local Ray.
        storage_path: Ray Train's storage path; the Ray run state lands in ``storage_path/name``.
        name: Ray run name.
        max_failures: worker-group restarts Ray may make (``-1``: unlimited, 0: none).
    """

    overrides: list[str]
    out_dir: Path
    num_workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    backend: str
    address: str | None
    storage_path: Path
    name: str
    max_failures: int


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/ray_job.py",
        description="Train a recipe on a Ray cluster (Ray Train TorchTrainer); restarts resume from the "
        "latest lctrain checkpoint.",
        epilog='Example: python launch/ray_job.py recipe=hybrid_gdn_3to1 train.out_dir=/shared/runs/a '
        "--num-workers 8 --gpus-per-worker 1 --max-failures 3. Needs: " + RAY_INSTALL_HINT,
    )
    p.add_argument("overrides", nargs="*", help="recipe=NAME [scale=NAME] [key=value ...] as for launch/train.py")
    p.add_argument("--num-workers", type=int, required=True, help="number of Ray workers (= ranks)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="GPUs per worker; 0 for CPU workers (gloo)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default 1)")
    p.add_argument("--address", default=None, help="Ray cluster address; default: $RAY_ADDRESS or a local Ray")
    p.add_argument(
        "--storage-path", default=None,
        help="shared directory for the run; train.out_dir defaults to STORAGE_PATH/NAME (default: Ray state "
        "goes beside train.out_dir)",
    )
    p.add_argument("--name", default=None, help="run name (default: the last part of train.out_dir, or lctrain-RECIPE)")
    p.add_argument(
        "--max-failures", type=int, default=3,
        help="worker-group restarts after a lost worker/node, each resuming from the latest checkpoint "
        "(-1 unlimited, 0 none; default 3)",
    )
    return p


def make_spec(argv: list[str]) -> RayJobSpec:
    """Parse ``launch/ray_job.py`` arguments and check the run before anything starts on the cluster.

    Raises:
        ConfigError: invalid recipe/overrides, a mesh that does not fit ``--num-workers``,
            ``parallel.backend=nccl`` without GPUs, or ``train.resume`` other than ``auto``
            with ``--max-failures`` != 0 (a restart must resume from the run's own checkpoints).
        SystemExit: bad command-line options (argparse; code 2).
    """
    from lctrain.parallel.mesh import resolve_dims

    args = _parser().parse_intermixed_args(argv)  # overrides may come before or after the options
    overrides = list(args.overrides)
    if args.num_workers < 1:
        raise ConfigError(f"--num-workers={args.num_workers}: must be >= 1")
    if args.gpus_per_worker < 0 or args.cpus_per_worker <= 0:
        raise ConfigError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
    # A recipe given as a file path must be found from every worker's working directory too.
    for i, item in enumerate(overrides):
        key, _, value = item.partition("=")
        if key == "recipe" and (value.endswith((".yaml", ".yml")) or os.sep in value) and Path(value).exists():
            overrides[i] = f"recipe={Path(value).resolve()}"
    cfg = load_config(overrides)
    dims = resolve_dims(cfg.parallel, args.num_workers)  # raises ConfigError naming the keys
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dims.dp) != 0:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} x data-parallel degree {dims.dp} (--num-workers={args.num_workers}); change "
            f"--num-workers or the batch sizes"
        )
    if cfg.parallel.backend == "nccl" and args.gpus_per_worker == 0:
        raise ConfigError("parallel.backend=nccl needs GPU workers; pass --gpus-per-worker 1 or use parallel.backend=gloo")
    if args.max_failures != 0 and cfg.train.resume != "auto":
        raise ConfigError(
            f"train.resume={cfg.train.resume!r} with --max-failures={args.max_failures}: a restarted worker group "
            f"must continue from this run's latest checkpoint; use train.resume=auto (or --max-failures 0)"
        )
    out_dir_given = any(o.startswith("train.out_dir=") for o in overrides)
    name = args.name
    if args.storage_path is not None and not out_dir_given:
        name = name or f"lctrain-{cfg.recipe}"
        out_dir = Path(args.storage_path).resolve() / name
    else:
        out_dir = Path(cfg.train.out_dir).resolve()
        name = name or out_dir.name
    storage = Path(args.storage_path).resolve() if args.storage_path is not None else out_dir.parent
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if args.gpus_per_worker > 0 else "gloo")
    return RayJobSpec(
        overrides=overrides + [f"train.out_dir={out_dir}"], out_dir=out_dir, num_workers=args.num_workers,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker, backend=backend,
        address=args.address, storage_path=storage, name=name, max_failures=args.max_failures,
    )


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


def train_worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: join Ray's process group and run the lctrain trainer.

    Args:
        config: ``{"overrides": [...], "out_dir": str}`` from :class:`RayJobSpec`.

    Rank 0 writes ``<out_dir>/ray_status.json`` at the end: ``{"status": "done", "steps": N}``,
    ``{"status": "nonfinite", "message": ...}`` or ``{"status": "config", "message": ...}`` (an
    error in the user's input found on the worker, e.g. data the driver could not see). These are
    recorded instead of raised, so that Ray does not restart a run that would fail the same way. (Ray Train keeps
    reported metrics only together with Ray checkpoints, which lctrain does not use.)
    """
    import ray.train
    import torch

    from lctrain.train.trainer import NonFiniteLossError, train

    rank = ray.train.get_context().get_world_rank()
    pid_dir = Path(config["out_dir"]) / PID_DIR
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank{rank}.pid.tmp").write_text(f"{os.getpid()}\n")
    os.replace(pid_dir / f"rank{rank}.pid.tmp", pid_dir / f"rank{rank}.pid")
    if torch.cuda.is_available():
        # Ray sets this worker's CUDA device; init_distributed derives the device from LOCAL_RANK.
        import ray.train.torch

        os.environ["LOCAL_RANK"] = str(ray.train.torch.get_device().index)
    status: dict[str, Any] = {"status": "done"}
    try:
        summary = train(load_config(config["overrides"]))
        status["steps"] = summary["steps"]
    except NonFiniteLossError as e:
        status = {"status": "nonfinite", "message": str(e)}
    except ConfigError as e:  # the user's input: a restart would fail the same way, so it is not raised
        status = {"status": "config", "message": str(e)}
    if rank == 0:
        _write_json(Path(config["out_dir"]) / STATUS_FILE, status)


def build_trainer(spec: RayJobSpec) -> Any:
    """The ``ray.train.torch.TorchTrainer`` for ``spec`` (Ray must be importable; see :func:`require_ray`)."""
    require_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = spec.gpus_per_worker > 0
    resources = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_worker,
        train_loop_config={"overrides": spec.overrides, "out_dir": str(spec.out_dir)},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=spec.backend),
        run_config=RunConfig(
            name=spec.name, storage_path=str(spec.storage_path),
            failure_config=FailureConfig(max_failures=spec.max_failures),
        ),
    )


def run_job(spec: RayJobSpec) -> int:
    """Connect to (or start) Ray, run the job to the end, and return the exit code (see module doc)."""
    ray = require_ray()
    status_file = spec.out_dir / STATUS_FILE
    status_file.unlink(missing_ok=True)  # a status left by an earlier job in the same out_dir
    if not ray.is_initialized():
        ray.init(address=spec.address)
    try:
        build_trainer(spec).fit()
    except ray.train.TrainingFailedError as e:
        print(f"error: the Ray job failed (--max-failures={spec.max_failures}): {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    if not status_file.exists():
        print(
            f"[lctrain] ray job finished; {status_file} is not visible from this driver (is train.out_dir on "
            f"storage the driver also mounts?)", flush=True,
        )
        return EXIT_OK
    status = json.loads(status_file.read_text())
    if status.get("status") == "nonfinite":
        print(f"error: {status.get('message')}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    if status.get("status") == "config":
        print(f"error: {status.get('message')}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    print(f"[lctrain] ray job done: {status.get('steps')} steps; summary: {spec.out_dir / 'summary.json'}", flush=True)
    return EXIT_OK


def main(argv: list[str]) -> int:
    """CLI entry of ``launch/ray_job.py``; returns the process exit code."""
    try:
        spec = make_spec(argv)
        return run_job(spec)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except RayNotInstalledError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_NO_RAY
