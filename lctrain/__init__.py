"""lctrain: distributed long-context training for hybrid linear/full-attention models.

See README.md for the quickstart and DESIGN notes for the package layout:
``lctrain.config`` (typed recipes), ``lctrain.models`` (HybridLM), ``lctrain.layers``,
``lctrain.kernels`` (fp32 references, chunked torch paths, Triton kernels),
``lctrain.parallel`` (device mesh, data/context/expert parallelism), ``lctrain.data``
and ``lctrain.train`` (trainer, optimiser, schedules, checkpoints, metrics).
"""

__version__ = "0.1.0"
