"""Process group start-up and the device meshes of one run, built in one place.

:class:`ParallelDims` holds the degrees and builds every mesh from the same world of ranks
``0..world-1`` (:meth:`ParallelDims.build_meshes`): the ``("dp", "cp")`` mesh (data and context
parallelism) and, when ``ep > 1``, the ``("edp", "ep")`` mesh of expert parallelism, which folds
over the same ``dp x cp`` ranks (Megatron's "parallel folding": flat rank ``r = edp_rank * ep +
ep_rank``) and so adds no dimension of its own. Meshes are passed down explicitly; layers never
read global process-group state.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lctrain.config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: ``rank``/``world_size`` over all processes, ``local_rank`` on its node."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when running as a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each parallel axis; ``dp * cp == world_size`` and ``ep`` divides it."""

    dp: int
    cp: int
    ep: int

    @property
    def world_size(self) -> int:
        return self.dp * self.cp

    @property
    def grad_average_degree(self) -> int:
        """Ranks over which replicated gradients are averaged (``dp * cp``: cp ranks replicate parameters too)."""
        return self.dp * self.cp

    def build_meshes(self, env: DistEnv) -> Meshes:
        """Every mesh of the run (collective over all ranks; empty :class:`Meshes` for one process)."""
        if env.backend is None:
            return Meshes(None, None)
        world = init_device_mesh(env.device.type, (self.dp, self.cp), mesh_dim_names=("dp", "cp"))
        ep = None
        if self.ep > 1:
            ep = init_device_mesh(env.device.type, (self.world_size // self.ep, self.ep), mesh_dim_names=("edp", "ep"))
        return Meshes(world, ep)


@dataclass(frozen=True)
class Meshes:
    """The meshes of a run: ``world`` ``("dp", "cp")`` and ``ep`` ``("edp", "ep")`` (None when not used)."""

    world: DeviceMesh | None
    ep: DeviceMesh | None

    def dp_rank(self) -> int:
        """This rank's index on the ``dp`` axis (0 for one process)."""
        return self.world["dp"].get_local_rank() if self.world is not None else 0

    def grad_mesh(self) -> DeviceMesh | None:
        """The 1-D mesh over which replicated gradients are averaged: ``dp``, or ``dp x cp`` flattened."""
        if self.world is None:
            return None
        return self.world["dp"] if self.world["cp"].size() == 1 else self.world["dp", "cp"]._flatten("dp_cp")


def resolve_dims(cfg: ParallelConfig, world_size: int) -> ParallelDims:
    """Fill in ``dp_degree = -1`` and check the layout against the world size.

    Raises:
        ConfigError: when ``dp * cp`` does not equal the number of processes, or the expert
            degree does not divide ``dp * cp``; the message names the keys to change.
    """
    cp = cfg.cp_degree
    if world_size % cp != 0:
        raise ConfigError(
            f"parallel.cp_degree={cp} does not divide the world size {world_size}; "
            f"launch a multiple of {cp} processes or change parallel.cp_degree"
        )
    dp = world_size // cp if cfg.dp_degree == -1 else cfg.dp_degree
    if dp * cp != world_size:
        raise ConfigError(
            f"mesh does not match the world size: parallel.dp_degree={dp} x parallel.cp_degree={cp} = {dp * cp} "
            f"but {world_size} processes were launched; set parallel.dp_degree=-1 (auto) or "
            f"launch {dp * cp} processes (torchrun --nproc_per_node={dp * cp})"
        )
    if cfg.ep_degree > 1 and (dp * cp) % cfg.ep_degree != 0:
        raise ConfigError(
            f"parallel.ep_degree={cfg.ep_degree} must divide dp x cp = {dp * cp} (experts fold over those ranks)"
        )
    return ParallelDims(dp=dp, cp=cp, ep=cfg.ep_degree)


def init_distributed(cfg: ParallelConfig, timeout_s: float = 600.0) -> DistEnv:
    """Join the process group started by torchrun (or Ray), or run as one process.

    Reads the launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun). The backend is
    NCCL on CUDA and gloo on CPU unless ``parallel.backend`` names one.

    Raises:
        ConfigError: ``parallel.backend=nccl`` without CUDA.
    """
    use_cuda = torch.cuda.is_available()
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ConfigError("parallel.backend=nccl needs CUDA devices; use parallel.backend=gloo (or auto) on CPU")
    n_gpu = torch.cuda.device_count() if use_cuda else 0
    if dist.is_initialized():  # a launcher made the group (Ray Train): this process still needs its device
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank % max(n_gpu, 1))))
        device = _set_device(local_rank, n_gpu)
    elif "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) >= 1 and "MASTER_ADDR" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = _set_device(local_rank, n_gpu)
        extra = {"device_id": device} if device.type == "cuda" else {}  # eager NCCL init bound to this GPU
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **extra)
    else:
        return DistEnv(0, 1, 0, _set_device(0, n_gpu), None)
    return DistEnv(rank, world, local_rank, device, dist.get_backend())


def _set_device(local_rank: int, n_gpu: int) -> torch.device:
    """This process's device: ``cuda:(local_rank mod visible GPUs)``, made current, or the CPU.

    Every process sets its device before any kernel launches, including processes whose group a
    launcher created (Ray Train), so no worker launches on GPU 0 by default. With fewer visible
    GPUs than local ranks (a launcher that restricts ``CUDA_VISIBLE_DEVICES`` per worker) the index
    wraps around.
    """
    if n_gpu == 0:
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % n_gpu)
    torch.cuda.set_device(device)
    return device


def barrier() -> None:
    """Barrier when a process group exists; no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    """Tear down the process group if this process started one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
