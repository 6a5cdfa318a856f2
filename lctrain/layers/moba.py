"""MoBA attention mixer (letter ``M``, section ``model.moba``): softmax attention over routed key blocks.

Mixture of Block Attention (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context
LLMs", arXiv:2502.13189): keys are split into blocks of ``block_size`` (never crossing a
document boundary); each query attends its own block causally plus the ``top_k - 1`` past
blocks of its document whose mean-pooled key scores highest against it. The layer is
:class:`lctrain.layers.attention.Attention` (projections, GQA, RoPE, output gate) with its
sequence op replaced by :class:`lctrain.kernels.ops.MoBAAttentionOp`; the kernels are in
:mod:`lctrain.kernels.moba`.

The MoBA report's hybrid schedule (MoBA layers, the last layer(s) full attention) is one recipe
line: ``model.layer_pattern: GM`` with ``model.final_layers: A`` (recipe ``hybrid_gdn_moba``).

Sparsity statistic: in training each forward adds the fraction of causal (query, key) pairs it
attends (:func:`lctrain.kernels.moba.moba_selected_fraction`, ``unit="keys"``: the FLOP ratio to
dense causal attention, a function of the document lengths only) to ``attended_stats``; the
trainer reduces and logs it like routing statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lctrain.errors import ConfigError
from lctrain.kernels.limits import MOBA_TRITON_MAX_HEAD_DIM, check_max
from lctrain.kernels.moba import moba_selected_fraction
from lctrain.kernels.ops import MoBAAttentionOp
from lctrain.layers.attention import Attention, AttentionConfig
from lctrain.layers.routing import is_recomputing


@dataclass
class MoBAConfig:
    """Section ``model.moba``: MoBA layers.

    Attention shape keys as ``model.attn`` (``num_heads``, ``num_kv_heads``, ``head_dim``,
    ``rope_theta``, ``output_gate``); ``block_size`` keys per block; ``top_k`` blocks per query
    counting its own (``block_size * top_k >= T`` is full causal attention; ``top_k = 1`` is
    block-diagonal causal attention).
    """

    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 10000.0
    output_gate: bool = True
    block_size: int = 64
    top_k: int = 3

    def attention(self) -> AttentionConfig:
        """The attention-shape part of this section."""
        return AttentionConfig(self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta, self.output_gate)

    def check_kernel_limits(self, choice: dict[str, str], prefix: str = "model.moba") -> None:
        """Start-up check of the head dim against the MoBA kernel the plan picked.

        Raises:
            ConfigError: ``head_dim`` above the Triton MoBA kernels' limit.
        """
        if choice.get("moba") == "triton":
            check_max(self.head_dim, MOBA_TRITON_MAX_HEAD_DIM, f"{prefix}.head_dim", "the Triton MoBA kernels")

    def validate(self, prefix: str = "model.moba") -> None:
        """Raise :class:`~lctrain.errors.ConfigError` naming the bad key and what is allowed."""
        self.attention().validate(prefix)
        for key in ("block_size", "top_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"invalid {prefix}.{key}={getattr(self, key)!r}: must be a positive integer")

    def check_context_parallel(
        self, *, cp_degree: int, cp_impl: str, ulysses_degree: int, seq_len: int, prefix: str = "model.moba"
    ) -> None:
        """MoBA routes over the blocks of the whole sequence: only ``cp_impl=ulysses`` (whole sequences per rank).

        Raises:
            ConfigError: ``cp_impl`` ring or usp (naming ulysses), or head counts Ulysses cannot split.
        """
        if cp_degree > 1 and cp_impl != "ulysses":
            raise ConfigError(
                f"MoBA layers ({prefix}) under context parallelism need parallel.cp_impl=ulysses (each rank then holds "
                f"whole sequences for a subset of heads, so block routing stays local); got parallel.cp_impl={cp_impl}"
            )
        self.attention().check_context_parallel(cp_degree=cp_degree, cp_impl=cp_impl, ulysses_degree=ulysses_degree,
                                                seq_len=seq_len, prefix=prefix)


class MoBAAttention(Attention):
    """:class:`Attention` whose ``attn_op`` is MoBA block-sparse attention (see module docstring).

    Args: as :class:`Attention`, plus ``block_size`` and ``top_k`` (>= 1). Parameters and their
    names are those of :class:`Attention`, so a dense attention checkpoint loads into it.

    ``forward(x [B,T,D], position_ids [B,T] | None, cu_seqlens int32 [N+1] | None) -> [B,T,D]``.

    Raises:
        ValueError: bad sizes, ``block_size`` or ``top_k`` < 1.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int = 64,
                 top_k: int = 3, rope_theta: float = 10000.0, output_gate: bool = True, kernels: str = "auto"):
        super().__init__(d_model, num_heads, num_kv_heads, head_dim, rope_theta=rope_theta, output_gate=output_gate,
                         kernels=kernels)
        if block_size < 1 or top_k < 1:
            raise ValueError(f"MoBA needs block_size >= 1 and top_k >= 1, got {block_size}, {top_k}")
        self.block_size, self.top_k = int(block_size), int(top_k)
        self.attn_op = MoBAAttentionOp(kernels, self.block_size, self.top_k)
        self.attended_stats = torch.zeros(2, dtype=torch.float64)  # [sum of attended fractions, forward calls]

    def forward(self, x, position_ids=None, cu_seqlens=None):
        if self.training and torch.is_grad_enabled() and not is_recomputing():
            T = int(cu_seqlens[-1]) if cu_seqlens is not None else x.shape[1]
            frac = moba_selected_fraction(T, self.block_size, self.top_k, cu_seqlens, unit="keys")
            self.attended_stats += torch.tensor([frac, 1.0], dtype=torch.float64)
        return super().forward(x, position_ids, cu_seqlens)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block_size={self.block_size}, top_k={self.top_k}"


def build_moba(cfg: MoBAConfig, d_model: int, *, kernels: str = "auto", **_) -> MoBAAttention:
    """Registry builder: a :class:`MoBAAttention` layer from its ``model.moba`` section."""
    return MoBAAttention(d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, block_size=cfg.block_size,
                         top_k=cfg.top_k, rope_theta=cfg.rope_theta, output_gate=cfg.output_gate, kernels=kernels)


def moba_flops_per_token(cfg: MoBAConfig, seq_len: int) -> float:
    """Training FLOPs per token of the attention maths: ``6 * H * Dh * keys_attended``.

    ``keys_attended`` is the mean number of keys a query of a ``seq_len``-token document attends
    (:func:`moba_selected_fraction` times the causal mean ``(T + 1) / 2``), i.e. dense causal
    attention's ``6 H Dh T`` (which counts T/2 keys) scaled by the attended fraction. The block
    scoring (``2 * H * Dh * T / block_size`` per token, forward only) is added.
    """
    frac = moba_selected_fraction(seq_len, cfg.block_size, cfg.top_k, None, unit="keys")
    return 6.0 * cfg.num_heads * cfg.head_dim * seq_len * frac + 2.0 * cfg.num_heads * cfg.head_dim * seq_len / cfg.block_size
