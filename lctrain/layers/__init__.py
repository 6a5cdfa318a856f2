"""Model building blocks (``torch.nn.Module``), written for one device.

Token mixers share ``forward(x [B,T,D], position_ids [B,T], cu_seqlens int32 [N+1] | None)
-> [B,T,D]`` and are registered by letter in :mod:`lctrain.layers.registry`:
:class:`Attention` (A: softmax, GQA, RoPE, output gate), :class:`GatedDeltaNet` (G) and
:class:`LightningAttention` (L). Each keeps its sequence mixing in a swappable op of
:mod:`lctrain.kernels.ops`. :mod:`lctrain.layers.routing` holds what routed layers share
(:class:`lctrain.layers.moe.MoE` today).
"""

from lctrain.kernels.norm import l2norm
from lctrain.kernels.softmax_attn import softmax_attention
from lctrain.layers.attention import Attention, AttentionConfig
from lctrain.layers.conv import ShortConvolution
from lctrain.layers.ffn import SwiGLU, default_ffn_hidden_size
from lctrain.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from lctrain.layers.lightning import LightningAttention, LightningConfig
from lctrain.layers.norm import GatedRMSNorm, RMSNorm, rms_norm
from lctrain.layers.registry import MIXERS, MixerSpec, get_mixer, register_mixer
from lctrain.layers.rope import (
    RotaryEmbedding,
    apply_rotary,
    check_cu_seqlens,
    default_position_ids,
    position_ids_from_cu_seqlens,
    rotate_half,
)

__all__ = [
    "MIXERS",
    "Attention",
    "AttentionConfig",
    "GatedDeltaNet",
    "GatedDeltaNetConfig",
    "GatedRMSNorm",
    "LightningAttention",
    "LightningConfig",
    "MixerSpec",
    "RMSNorm",
    "RotaryEmbedding",
    "ShortConvolution",
    "SwiGLU",
    "apply_rotary",
    "check_cu_seqlens",
    "default_ffn_hidden_size",
    "default_position_ids",
    "get_mixer",
    "l2norm",
    "position_ids_from_cu_seqlens",
    "register_mixer",
    "rms_norm",
    "rotate_half",
    "softmax_attention",
]
