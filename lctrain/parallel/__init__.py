"""Parallelism applied to single-device models from outside: :func:`parallelize` (one documented order),
the meshes (:mod:`.mesh`), data-parallel backends (:mod:`.data_parallel`), context parallelism
(:mod:`.context`) and expert parallelism (:mod:`.expert`)."""

from lctrain.parallel.mesh import DistEnv, Meshes, ParallelDims, init_distributed, resolve_dims
from lctrain.parallel.parallelize import Parallelized, apply_activation_checkpointing, parallelize

__all__ = [
    "DistEnv", "Meshes", "ParallelDims", "Parallelized", "apply_activation_checkpointing", "init_distributed",
    "parallelize", "resolve_dims",
]
