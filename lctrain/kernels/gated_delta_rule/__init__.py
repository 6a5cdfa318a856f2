"""Gated delta rule: ``chunk_gated_delta_rule`` (chunked, WY representation) and its fp32 reference."""

from lctrain.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule
from lctrain.kernels.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "naive_recurrent_gated_delta_rule"]
