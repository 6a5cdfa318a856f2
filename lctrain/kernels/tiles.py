"""Which tile configuration a Triton kernel launches with: the interpreter's or the CUDA one.

Under ``TRITON_INTERPRET=1`` every kernel picks wide tiles (each program costs the same per op
whatever its size), so CPU tests would never run the tiles a GPU run takes: FlashAttention's
BLOCK_M=128 / BLOCK_N=64 forward, MoBA's 64-row tiles inside 512-token blocks, Lightning's
64-wide state tiles. :func:`force_cuda_tiles` (or ``LCTRAIN_CUDA_TILES=bf16|fp16|fp32`` in the
environment) makes each kernel's config function return the CUDA configuration *of the named
dtype* while the data stay fp32, so the interpreter checks the production tiling against the
fp32 references to rounding.

Read by ``_config`` in ``flash_attn/interface.py`` and ``moba/interface.py`` and by the state
tiles of ``lightning_attn/triton_chunk.py``. The Gated DeltaNet and MoE grouped-GEMM kernels use
the same tiles on both (chunk 64, full-width K, 64-wide V blocks; 32 x 32 x 32 GEMM tiles).
"""

from __future__ import annotations

import contextlib
import os

import torch

from lctrain.kernels.dispatch import triton_interpreting

__all__ = ["ENV_VAR", "force_cuda_tiles", "forced_tile_dtype", "tile_dtype"]

ENV_VAR = "LCTRAIN_CUDA_TILES"
_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_forced: list[torch.dtype] = []  # stack of force_cuda_tiles contexts (innermost last)


def forced_tile_dtype() -> torch.dtype | None:
    """The dtype whose CUDA tiles are forced (context first, then ``LCTRAIN_CUDA_TILES``), or None.

    Raises:
        ValueError: ``LCTRAIN_CUDA_TILES`` set to something other than bf16, fp16, fp32 or empty.
    """
    if _forced:
        return _forced[-1]
    name = os.environ.get(ENV_VAR, "")
    if not name:
        return None
    if name not in _NAMES:
        raise ValueError(f"{ENV_VAR}={name!r}: allowed values are {', '.join(_NAMES)} (or unset)")
    return _NAMES[name]


def tile_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype whose CUDA tile configuration a kernel config function should return.

    Args:
        dtype: the dtype of the kernel's inputs.

    Returns:
        None for the interpreter's own tiles (interpreting and nothing forced); else the forced
        dtype, or ``dtype`` itself on a GPU.
    """
    forced = forced_tile_dtype()
    if forced is not None:
        return forced
    return None if triton_interpreting() else dtype


@contextlib.contextmanager
def force_cuda_tiles(dtype: torch.dtype | str = torch.bfloat16):
    """Launch every kernel with the CUDA tiles of ``dtype`` (``torch.bfloat16`` or ``"bf16"``...).

    The inputs keep their own dtype (and dot precision): only BLOCK_M/BLOCK_N/state tiles and
    the launch options change, so fp32 inputs under the interpreter run the production tiling.
    """
    if isinstance(dtype, str):
        if dtype not in _NAMES:
            raise ValueError(f"dtype {dtype!r}: allowed values are {', '.join(_NAMES)}")
        dtype = _NAMES[dtype]
    _forced.append(dtype)
    try:
        yield dtype
    finally:
        _forced.pop()
