"""Softmax attention with log-sum-exp: FlashAttention-2 in Triton and its fp32 reference.

``naive_attention`` needs only torch. The Triton functions (``flash_attn_func``,
``flash_attn_varlen_func``, ``flash_attn_fwd``, ``flash_attn_bwd``) are imported on first access,
so this package imports without triton installed.
"""

from lctrain.kernels.flash_attn.naive import attention_mask, naive_attention

_TRITON_API = ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_fwd", "flash_attn_bwd")

__all__ = [
    "naive_attention",
    "attention_mask",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_fwd",
    "flash_attn_bwd",
]


def __getattr__(name: str):
    if name in _TRITON_API:
        from lctrain.kernels.flash_attn import interface

        return getattr(interface, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
