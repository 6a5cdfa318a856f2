"""Model families. :class:`HybridLM` builds a Gated DeltaNet / softmax-attention stack from a pattern."""

from lctrain.models.hybrid import HybridBlock, HybridLM, expand_layer_pattern

__all__ = ["HybridBlock", "HybridLM", "expand_layer_pattern"]
