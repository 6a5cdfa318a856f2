"""Causal softmax attention with GQA, RoPE, packed documents and an optional output gate.

* Attention: Vaswani et al., "Attention Is All You Need" (2017), eq. 1,
  ``softmax(Q K^T / sqrt(Dh) + causal mask) V``.
* Grouped-query attention (GQA): Ainslie et al. (2023); query head ``h`` reads key/value head
  ``h // (num_heads / num_kv_heads)``.
* RoPE on q and k at explicit ``position_ids`` (:mod:`lctrain.layers.rope`), optionally partial
  (``partial_rotary_factor``: only the first ``int(Dh * factor)`` dims of each head rotate, as in
  GPT-NeoX and Qwen3-Next).
* QK-norm (``qk_norm``): a per-head RMSNorm over Dh on q and on k before RoPE, each with its own
  learned [Dh] scale shared by the heads (Dehghani et al., "Scaling Vision Transformers to 22B
  Parameters", 2023; as in Qwen3 / Qwen3-Next).
* Output gate: Qiu et al., "Gated Attention for Large Language Models" (2025), the variant the
  paper finds best: a sigmoid gate after SDPA ("G1"), elementwise over each head's Dh dims and
  head-specific, computed from the layer input: ``o = SDPA(q, k, v) * sigmoid(x W_g)`` with
  ``W_g: D -> H*Dh``.
* Packed documents (B = 1 plus ``cu_seqlens``) never attend across document boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lctrain.errors import ConfigError
from lctrain.kernels.limits import FLASH_MAX_HEAD_DIM, check_max
from lctrain.kernels.dispatch import check_kernels
from lctrain.kernels.ops import SoftmaxAttentionOp
from lctrain.kernels.softmax_attn import softmax_attention
from lctrain.layers.norm import RMSNorm
from lctrain.layers.rope import RotaryEmbedding, default_position_ids

__all__ = ["Attention", "AttentionConfig", "softmax_attention"]


@dataclass
class AttentionConfig:
    """Section ``model.attn``: softmax attention layers (letter ``A``).

    ``num_heads`` query heads of ``head_dim`` each; ``num_kv_heads`` key/value heads (GQA, must
    divide ``num_heads``); ``rope_theta`` the RoPE base; ``output_gate`` the sigmoid output gate
    of Gated Attention (Qiu et al. 2025, G1); ``qk_norm`` a per-head RMSNorm on q and k before
    RoPE; ``partial_rotary_factor`` the fraction of each head's dims that RoPE rotates (the first
    ``int(head_dim * factor)``, which must be even; 1.0 rotates all).
    """

    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 10000.0
    output_gate: bool = True
    qk_norm: bool = False
    partial_rotary_factor: float = 1.0

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates: ``int(head_dim * partial_rotary_factor)``."""
        return int(self.head_dim * self.partial_rotary_factor)

    def check_kernel_limits(self, choice: dict[str, str], prefix: str = "model.attn") -> None:
        """Start-up check of the head dim against the softmax kernel the plan picked (``choice``:
        :attr:`lctrain.kernels.plan.KernelPlan.choice`).

        Raises:
            ConfigError: ``head_dim`` above the Triton FlashAttention kernels' limit.
        """
        if choice.get("softmax_attention") == "triton":
            check_max(self.head_dim, FLASH_MAX_HEAD_DIM, f"{prefix}.head_dim", "the Triton FlashAttention kernels")

    def validate(self, prefix: str = "model.attn") -> None:
        """Raise :class:`~lctrain.errors.ConfigError` naming the bad key and what is allowed."""
        for key in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"invalid {prefix}.{key}={getattr(self, key)!r}: must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"invalid {prefix}.num_kv_heads={self.num_kv_heads!r}: must divide {prefix}.num_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"invalid {prefix}.head_dim={self.head_dim!r}: RoPE needs an even head_dim")
        if self.rope_theta <= 0:
            raise ConfigError(f"invalid {prefix}.rope_theta={self.rope_theta!r}: must be > 0")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(
                f"invalid {prefix}.partial_rotary_factor={self.partial_rotary_factor!r}: must be in (0, 1] "
                f"(1.0 rotates every dim of a head)"
            )
        R = self.rotary_dim
        if R < 2 or R % 2:
            raise ConfigError(
                f"invalid {prefix}.partial_rotary_factor={self.partial_rotary_factor!r}: "
                f"int({prefix}.head_dim * partial_rotary_factor) = {R} dims would rotate; RoPE needs an even "
                f"number >= 2 (e.g. partial_rotary_factor=0.25 with head_dim a multiple of 8)"
            )

    def check_context_parallel(
        self, *, cp_degree: int, cp_impl: str, ulysses_degree: int, seq_len: int, prefix: str = "model.attn"
    ) -> None:
        """Ulysses splits heads over ``ulysses_degree`` ranks (the effective U): check the head counts allow it.

        Raises:
            ConfigError: ``num_heads`` not divisible by the Ulysses degree, or ``num_kv_heads``
                neither dividing nor divisible by it.
        """
        U = ulysses_degree
        if U <= 1:
            return
        if self.num_heads % U:
            raise ConfigError(
                f"{prefix}.num_heads={self.num_heads} must be divisible by the Ulysses degree {U} (each rank takes "
                f"num_heads / {U} heads); change {prefix}.num_heads, parallel.ulysses_degree or use cp_impl=ring"
            )
        if self.num_kv_heads % U and U % self.num_kv_heads:
            raise ConfigError(
                f"{prefix}.num_kv_heads={self.num_kv_heads} must divide or be divisible by the Ulysses degree {U} "
                f"(KV heads are replicated up to {U} when fewer); change {prefix}.num_kv_heads or the Ulysses degree"
            )



class Attention(nn.Module):
    """Causal multi-head softmax attention with GQA, RoPE and the Gated-Attention output gate.

    ``x -> q = x Wq, k = x Wk, v = x Wv`` (no biases) ``-> [q, k = rmsnorm_head(q), rmsnorm_head(k)]
    -> RoPE(q, k) -> SDPA (causal, per document) -> [* sigmoid(x Wg)] -> o_proj``.

    Args:
        d_model: D, model width.
        num_heads: Hq query heads.
        num_kv_heads: Hkv key/value heads (GQA); must divide ``num_heads``.
        head_dim: Dh per head (even, for RoPE).
        rope_theta: RoPE base.
        output_gate: add ``g_proj`` (D -> Hq*Dh) and multiply the attention output by its
            sigmoid elementwise (Qiu et al. 2025, G1 elementwise head-specific gate).
        qk_norm: add ``q_norm`` / ``k_norm`` (:class:`RMSNorm` over Dh, scales [Dh]) applied to
            each head of q and k before RoPE.
        partial_rotary_factor: RoPE rotates the first ``int(Dh * factor)`` dims of each head.
        norm_eps: eps of the q/k RMSNorms.
        kernels: ``"auto"`` | ``"torch"`` | ``"triton"``: the op's :func:`softmax_attention` with SDPA
            (torch), the Triton FlashAttention-2 kernel (triton), or Triton on CUDA and SDPA
            elsewhere (auto).

    Parameters: ``q_proj [Hq*Dh, D]``, ``k_proj``/``v_proj [Hkv*Dh, D]``, ``g_proj [Hq*Dh, D]``
    (if gated), ``o_proj [D, Hq*Dh]`` (the residual-branch output projection), ``q_norm.weight``
    / ``k_norm.weight [Dh]`` (if ``qk_norm``).

    ``forward(x [B,T,D], position_ids [B,T] int | None, cu_seqlens int32 [N+1] | None) -> [B,T,D]``.
    ``position_ids=None`` means positions within documents of ``cu_seqlens`` (or ``0..T-1``).

    Raises:
        ValueError: inconsistent head counts or input shapes; ImportError: ``triton`` without
        the triton package.

    Sequence op: ``attn_op`` (:class:`lctrain.kernels.ops.SoftmaxAttentionOp`), the seam a
    parallel scheme swaps from outside (context parallelism: x is then this rank's sequence
    shard, ``position_ids`` its true positions and ``cu_seqlens`` the global boundaries).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope_theta: float = 10000.0,
        output_gate: bool = True,
        kernels: str = "auto",
        qk_norm: bool = False,
        partial_rotary_factor: float = 1.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if min(d_model, num_heads, num_kv_heads, head_dim) < 1:
            raise ValueError(
                f"Attention needs positive sizes, got d_model={d_model} num_heads={num_heads} "
                f"num_kv_heads={num_kv_heads} head_dim={head_dim}"
            )
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = (
            d_model,
            num_heads,
            num_kv_heads,
            head_dim,
        )
        self.kernels = check_kernels(kernels, "softmax attention")
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=False)
        self.g_proj = nn.Linear(d_model, num_heads * head_dim, bias=False) if output_gate else None
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.rope = RotaryEmbedding(head_dim, rope_theta, rotary_dim=int(head_dim * partial_rotary_factor))
        self.attn_op = SoftmaxAttentionOp(kernels, causal=True)

    def project_qkv(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [B,T,Hq,Dh], k, v [B,T,Hkv,Dh]`` of ``x [B,T,D]``: projections, QK-norm (if on), RoPE.

        Shared by :meth:`forward` and the cached decoding of :mod:`lctrain.generate`.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, k, position_ids)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, D = x.shape
        if D != self.d_model:
            raise ValueError(f"Attention(d_model={self.d_model}) got x{tuple(x.shape)}")
        if position_ids is None:
            position_ids = default_position_ids(B, T, cu_seqlens, x.device)
        q, k, v = self.project_qkv(x, position_ids)
        o = self.attn_op(q, k, v, cu_seqlens)
        if self.g_proj is not None:
            o = o * torch.sigmoid(self.g_proj(x)).view(B, T, self.num_heads, self.head_dim)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"output_gate={self.g_proj is not None}, qk_norm={self.q_norm is not None}, "
            f"rotary_dim={self.rope.rotary_dim}, kernels={self.kernels!r}"
        )


def build_attention(cfg: AttentionConfig, d_model: int, *, kernels: str = "auto", norm_eps: float = 1e-6,
                    **_) -> Attention:
    """Registry builder: an :class:`Attention` layer from its ``model.attn`` section."""
    return Attention(
        d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rope_theta=cfg.rope_theta,
        output_gate=cfg.output_gate, kernels=kernels, qk_norm=cfg.qk_norm,
        partial_rotary_factor=cfg.partial_rotary_factor, norm_eps=norm_eps,
    )


def attention_flops_per_token(cfg: AttentionConfig, seq_len: int) -> float:
    """Training FLOPs per token of causal attention beyond its parameters: ``6 * H * Dh * T``.

    Forward ``2 * 2 * H * Dh * T/2`` (QK^T and PV over on average T/2 keys), times 3 for
    forward + backward. (Non-causal accountings, e.g. ``12 * H * Dh * T`` in the PaLM appendix,
    count the masked half too.) QK-norm and RoPE (partial or not) are elementwise, not counted.
    """
    return 6.0 * cfg.num_heads * cfg.head_dim * seq_len
