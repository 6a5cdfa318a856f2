"""lctrain: distributed long-context training for hybrid linear/full-attention models.

See README.md for the quickstart and docs/structure.md for the package layout and its import
order: ``lctrain.config`` (typed recipes), ``lctrain.models`` (HybridLM), ``lctrain.layers``,
``lctrain.kernels`` (fp32 references, chunked torch paths, Triton kernels),
``lctrain.parallel`` (device mesh, data/context/expert parallelism), ``lctrain.data`` (the
``data.path`` sources), ``lctrain.checkpoint`` (writing, verifying and reading checkpoints) and
``lctrain.train`` (trainer, optimiser, schedules, metrics).
"""

__version__ = "0.1.0"
