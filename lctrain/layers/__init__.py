"""Model building blocks (``torch.nn.Module``), written for one device.

Token mixers share ``forward(x [B,T,D], position_ids [B,T], cu_seqlens int32 [N+1] | None)
-> [B,T,D]``: :class:`Attention` (softmax, GQA, RoPE, output gate) and :class:`GatedDeltaNet`.
"""

from lctrain.layers.attention import Attention, softmax_attention
from lctrain.layers.conv import ShortConvolution
from lctrain.layers.ffn import SwiGLU, default_ffn_hidden_size
from lctrain.layers.gated_deltanet import GatedDeltaNet, l2norm
from lctrain.layers.norm import GatedRMSNorm, RMSNorm, rms_norm
from lctrain.layers.rope import (
    RotaryEmbedding,
    apply_rotary,
    check_cu_seqlens,
    default_position_ids,
    position_ids_from_cu_seqlens,
    rotate_half,
)

__all__ = [
    "Attention",
    "GatedDeltaNet",
    "GatedRMSNorm",
    "RMSNorm",
    "RotaryEmbedding",
    "ShortConvolution",
    "SwiGLU",
    "apply_rotary",
    "check_cu_seqlens",
    "default_ffn_hidden_size",
    "default_position_ids",
    "l2norm",
    "position_ids_from_cu_seqlens",
    "rms_norm",
    "rotate_half",
    "softmax_attention",
]
