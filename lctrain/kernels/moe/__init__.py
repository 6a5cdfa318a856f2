"""MoE expert compute: grouped SwiGLU over experts (``grouped.py``: torch ``_grouped_mm`` or a segment
loop; ``triton_grouped.py``: Triton grouped GEMM, imported lazily) and the per-expert reference (``naive.py``)."""

from lctrain.kernels.moe.grouped import grouped_mm_supported, grouped_swiglu
from lctrain.kernels.moe.naive import moe_ffn_reference

__all__ = ["grouped_mm_supported", "grouped_swiglu", "moe_ffn_reference"]
