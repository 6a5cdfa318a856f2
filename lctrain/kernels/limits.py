"""Limits of the Triton kernels, in one place: the kernels enforce them on their inputs, and the
mixer config sections check them at start-up from the configuration (``check_kernel_limits``
hooks, called with the resolved kernel plan), so a GPU run that would fail at its first forward
stops before anything is built, with the key named.

Grid sizes: every kernel puts the counts that grow with the batch (sequences x heads, chunks,
blocks) on grid axis x (2^31 - 1 programs) and only head or tile counts on axes y and z (65,535),
so no micro-batch size is refused for its grid. Token offsets inside the kernels are int64.
"""

from __future__ import annotations

from lctrain.errors import ConfigError

FLASH_MAX_HEAD_DIM = 256  # FlashAttention-2 Triton kernels (softmax, ring blocks, Ulysses, MoH, MoA)
MOBA_TRITON_MAX_HEAD_DIM = 256
GDN_TRITON_MAX_KEY_DIM = 256  # Gated DeltaNet Triton chunk kernels: K (key / query head dim)
GDN_TRITON_MAX_VALUE_DIM = 4096  # ... and V per value head
LIGHTNING_TRITON_MAX_HEAD_DIM = 128  # Lightning Triton kernels: K and V (the CP state pass is split to fit)
LIGHTNING_TRITON_MIN_CHUNK = 16  # and chunk_size: a power of two >= 16 (tl.dot tiles)


def check_max(value: int, limit: int, key: str, what: str) -> None:
    """Raise :class:`ConfigError` if ``value > limit``, naming ``key``, the limit and the alternative.

    Args:
        value: the configured size (e.g. a head dim).
        limit: the largest value the kernel takes.
        key: the configuration key (``model.attn.head_dim``).
        what: the kernel (``the Triton FlashAttention kernels``).
    """
    if value > limit:
        raise ConfigError(
            f"invalid {key}={value}: {what} take at most {limit} (the kernel plan runs them on this target); "
            f"lower {key} to <= {limit}, or set model.kernels=torch for the (slow) reference paths"
        )


def check_chunk_size(value: int, key: str, what: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a power of two >= :data:`LIGHTNING_TRITON_MIN_CHUNK`."""
    if value < LIGHTNING_TRITON_MIN_CHUNK or value & (value - 1):
        raise ConfigError(
            f"invalid {key}={value}: {what} need a power of two >= {LIGHTNING_TRITON_MIN_CHUNK} "
            f"(16, 32, 64, ...); set {key} to one, or model.kernels=torch for the reference path"
        )
