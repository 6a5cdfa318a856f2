"""Gated delta rule: ``chunk_gated_delta_rule`` (chunked, WY representation, torch) and its fp32
reference; ``chunk_gated_delta_rule_triton`` (Triton fwd + bwd, registered as
``torch.ops.lctrain.chunk_gated_delta_rule_fwd/_bwd``) and ``fused_recurrent_gated_delta_rule``
(Triton, token by token, forward only). triton is imported only when a Triton function runs."""

from lctrain.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule
from lctrain.kernels.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule
from lctrain.kernels.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from lctrain.kernels.dispatch import triton_runnable as triton_available  # one check for every op
from lctrain.kernels.gated_delta_rule.triton_chunk import chunk_gated_delta_rule_triton

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_triton",
    "fused_recurrent_gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
    "triton_available",
]
