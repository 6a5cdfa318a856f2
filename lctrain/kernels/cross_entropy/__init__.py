"""Linear cross entropy (output projection + cross entropy): ``linear_cross_entropy`` (the chunked
torch path, which never holds the whole ``[N, V]`` logit matrix) and its fp32 reference."""

from lctrain.kernels.cross_entropy.chunk import linear_cross_entropy_chunked as linear_cross_entropy
from lctrain.kernels.cross_entropy.naive import linear_cross_entropy_naive

__all__ = ["linear_cross_entropy", "linear_cross_entropy_naive"]
