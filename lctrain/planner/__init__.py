"""Memory planning: what one training step needs per rank, from lctrain's own code run on fake tensors."""

from lctrain.planner.memory import GPUS, MemoryEstimate, estimate, fake_process_group, trace_step

__all__ = ["GPUS", "MemoryEstimate", "estimate", "fake_process_group", "trace_step"]
