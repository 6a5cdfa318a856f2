"""Lightning Attention: ``chunk_lightning_attn`` (block-parallel torch path) and its fp32 reference."""

from lctrain.kernels.lightning_attn.chunk import chunk_lightning_attn
from lctrain.kernels.lightning_attn.naive import naive_recurrent_lightning_attn

__all__ = ["chunk_lightning_attn", "chunk_lightning_attn_triton", "naive_recurrent_lightning_attn"]


def __getattr__(name: str):
    # the Triton path is imported on first use so this package imports without triton
    if name == "chunk_lightning_attn_triton":
        from lctrain.kernels.lightning_attn.triton_chunk import chunk_lightning_attn_triton

        return chunk_lightning_attn_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
