"""Gated DeltaNet token mixer (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", ICLR 2025).

Per head ``h`` with key dim K and value dim V (``value_head_dim``, default K * expand_v) (Fig. 1
and eq. 10 of the paper, parameterised as in flash-linear-attention's ``GatedDeltaNet``):

    q = l2norm(silu(conv(x Wq)))          k = l2norm(silu(conv(x Wk)))      v = silu(conv(x Wv))
    beta = sigmoid(x Wb)                  [HV], write strength in (0, 1)
    g = -exp(A_log) * softplus(x Wa + dt_bias)   [HV], log decay (< 0), Mamba-2 style
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t / sqrt(K)
    y = o_proj( rmsnorm(o) * w * silu(x Wgate) )     (norm over each head's V dims)

Grouped value heads (``num_value_heads`` HV, a multiple of the H query/key heads; Qwen3-Next has
HV = 2H): each of the HV value heads has its own state, decay, write strength and output gate,
and value head ``j`` reads query/key head ``j // (HV / H)`` (the kernels' grouped layout).

``conv`` is the depthwise causal short convolution of :mod:`lctrain.layers.conv` (kernel
``conv_size``), masked at document starts through ``position_ids``; the recurrence restarts at
every ``cu_seqlens`` boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lctrain.errors import ConfigError
from lctrain.kernels.limits import GDN_TRITON_MAX_KEY_DIM, GDN_TRITON_MAX_VALUE_DIM, check_max
from lctrain.kernels.dispatch import check_kernels
from lctrain.kernels.norm import l2norm
from lctrain.kernels.ops import GatedDeltaRuleOp, ShortConvOp
from lctrain.layers.conv import ShortConvolution
from lctrain.layers.norm import GatedRMSNorm
from lctrain.layers.rope import default_position_ids


@dataclass
class GatedDeltaNetConfig:
    """Section ``model.gdn``: Gated DeltaNet layers (letter ``G``).

    ``num_heads`` query/key heads with key dim ``head_dim``; ``num_value_heads`` value heads (0:
    ``num_heads``; else a multiple of it, each query/key head serving ``num_value_heads /
    num_heads`` consecutive value heads); value dim ``value_head_dim`` per value head (0:
    ``head_dim * expand_v``; set one of the two); ``conv_size`` taps of the short convolutions on
    q, k, v; ``chunk_size`` the chunk length of the torch chunked kernel (the result does not
    depend on it; the Triton kernel uses 64).
    """

    num_heads: int = 4
    head_dim: int = 64
    expand_v: float = 1.0
    conv_size: int = 4
    chunk_size: int = 64
    num_value_heads: int = 0
    value_head_dim: int = 0

    @property
    def value_heads(self) -> int:
        """HV, the number of value heads (``num_value_heads``, or ``num_heads`` when 0)."""
        return self.num_value_heads or self.num_heads

    @property
    def head_v_dim(self) -> int:
        """V, the value dim per value head (``value_head_dim``, or ``head_dim * expand_v`` when 0)."""
        return self.value_head_dim or int(self.head_dim * self.expand_v)

    def check_kernel_limits(self, choice: dict[str, str], prefix: str = "model.gdn") -> None:
        """Start-up check of the head dims against the Gated DeltaNet kernel the plan picked.

        Raises:
            ConfigError: K (``head_dim``) or V (``value_head_dim`` / ``head_dim * expand_v``)
                above the Triton chunk kernels' limits.
        """
        if choice.get("gated_delta_rule") == "triton":
            what = "the Triton Gated DeltaNet kernels"
            check_max(self.head_dim, GDN_TRITON_MAX_KEY_DIM, f"{prefix}.head_dim", what)
            key = f"{prefix}.value_head_dim" if self.value_head_dim else f"{prefix}.head_dim * expand_v"
            check_max(self.head_v_dim, GDN_TRITON_MAX_VALUE_DIM, key, what)

    def validate(self, prefix: str = "model.gdn") -> None:
        """Raise :class:`~lctrain.errors.ConfigError` naming the bad key and what is allowed."""
        for key in ("num_heads", "head_dim", "conv_size", "chunk_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"invalid {prefix}.{key}={getattr(self, key)!r}: must be a positive integer")
        if self.expand_v <= 0 or not float(self.head_dim * self.expand_v).is_integer():
            raise ConfigError(
                f"invalid {prefix}.expand_v={self.expand_v!r}: must be > 0 with {prefix}.head_dim * expand_v an integer"
            )
        for key in ("num_value_heads", "value_head_dim"):
            if getattr(self, key) < 0:
                raise ConfigError(f"invalid {prefix}.{key}={getattr(self, key)!r}: must be >= 0 (0 = the default)")
        if self.num_value_heads % self.num_heads:
            raise ConfigError(
                f"invalid {prefix}.num_value_heads={self.num_value_heads!r}: must be 0 (= num_heads) or a multiple "
                f"of {prefix}.num_heads={self.num_heads} (each query/key head serves num_value_heads / num_heads "
                f"value heads)"
            )
        if self.value_head_dim and self.expand_v != 1.0:
            raise ConfigError(
                f"invalid {prefix}.value_head_dim={self.value_head_dim!r} with {prefix}.expand_v={self.expand_v!r}: "
                f"set the value dim one way only (value_head_dim, or expand_v with value_head_dim=0)"
            )

    def check_context_parallel(
        self, *, cp_degree: int, cp_impl: str, ulysses_degree: int, seq_len: int, prefix: str = "model.gdn"
    ) -> None:
        """Each zigzag chunk (``seq_len / (2 cp_degree)`` tokens) must hold the conv halo of ``conv_size - 1``.

        Raises:
            ConfigError: chunks shorter than the halo.
        """
        chunk = seq_len // (2 * cp_degree)
        if cp_degree > 1 and chunk < self.conv_size - 1:
            raise ConfigError(
                f"zigzag chunks of data.seq_len / (2 x cp_degree) = {chunk} tokens are shorter than the "
                f"short-convolution halo {prefix}.conv_size - 1 = {self.conv_size - 1}; raise data.seq_len or "
                f"lower parallel.cp_degree"
            )


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet layer: projections, short convs, gates, gated delta rule, gated norm, o_proj.

    Args:
        d_model: D, model width.
        num_heads: H query/key heads (``model.gdn.num_heads``).
        head_dim: K, the query/key dim per head (``model.gdn.head_dim``).
        expand_v: value dim per head is ``V = head_dim * expand_v`` (must be an integer) unless
            ``value_head_dim`` is given.
        conv_size: taps of the short convolutions on q, k, v.
        chunk_size: chunk length of the chunked kernel (kept for when the kernel takes it; the
            result does not depend on it).
        norm_eps: eps of the gated output RMSNorm.
        kernels: ``"auto"`` | ``"torch"`` | ``"triton"``; torch calls
            ``lctrain.kernels.gated_delta_rule.chunk_gated_delta_rule``, triton calls
            ``chunk_gated_delta_rule_triton`` (CUDA, or CPU under TRITON_INTERPRET=1), auto picks
            triton when x is on CUDA and triton imports, else torch.
        num_value_heads: HV value heads (None or 0: H); a multiple of H.
        value_head_dim: V per value head (None or 0: ``head_dim * expand_v``).

    Parameters: ``q_proj``/``k_proj [H*K, D]``, ``v_proj``/``g_proj [HV*V, D]``, ``a_proj``/
    ``b_proj [HV, D]``, ``q_conv``/``k_conv [H*K, conv_size]``, ``v_conv [HV*V, conv_size]``
    (depthwise), ``A_log [HV]``, ``dt_bias [HV]`` (both flagged ``_no_weight_decay``),
    ``o_norm.weight [V]``, ``o_proj [D, HV*V]`` (the residual-branch output projection).

    Init of the decay (:meth:`reset_decay_parameters`, as in Mamba-2 / fla):
    ``A_log = log(U(1, 16))``; ``dt ~ exp(U(log 1e-3, log 1e-1))`` floored at 1e-4 and
    ``dt_bias = softplus^{-1}(dt) = dt + log(-expm1(-dt))``.

    ``forward(x [B,T,D], position_ids [B,T] int | None, cu_seqlens int32 [N+1] | None) -> [B,T,D]``;
    ``g`` and ``beta`` are computed in fp32.

    Raises:
        ValueError: bad sizes or input shapes; ImportError: ``kernels='triton'`` without the
            triton package. RuntimeError: ``kernels='triton'`` on CPU without TRITON_INTERPRET=1,
            raised by the first forward.

    Sequence ops (the seams a parallel scheme swaps from outside, see :mod:`lctrain.kernels.ops`):
    ``delta_rule_op`` (:class:`GatedDeltaRuleOp`) and ``conv_op`` (:class:`ShortConvOp`, applied
    to each of ``q_conv``, ``k_conv``, ``v_conv``). Under context parallelism x is a zigzag
    shard; the convolutions then fetch their halo and the recurrence passes state across ranks.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        expand_v: float = 1.0,
        conv_size: int = 4,
        chunk_size: int = 64,
        norm_eps: float = 1e-6,
        kernels: str = "auto",
        num_value_heads: int | None = None,
        value_head_dim: int | None = None,
    ):
        super().__init__()
        num_value_heads = num_value_heads or num_heads
        if min(d_model, num_heads, head_dim, conv_size, chunk_size) < 1:
            raise ValueError(
                f"GatedDeltaNet needs positive sizes, got d_model={d_model} num_heads={num_heads} "
                f"head_dim={head_dim} conv_size={conv_size} chunk_size={chunk_size}"
            )
        if not value_head_dim and (expand_v <= 0 or not float(head_dim * expand_v).is_integer()):
            raise ValueError(f"head_dim * expand_v must be a positive integer, got {head_dim} * {expand_v}")
        if num_value_heads % num_heads or (value_head_dim is not None and value_head_dim < 0):
            raise ValueError(
                f"num_value_heads={num_value_heads} must be a multiple of num_heads={num_heads} and "
                f"value_head_dim={value_head_dim} >= 0"
            )
        check_kernels(kernels, "Gated DeltaNet")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.num_value_heads = num_value_heads
        self.head_v_dim = int(value_head_dim or head_dim * expand_v)
        self.conv_size, self.chunk_size, self.kernels = conv_size, chunk_size, kernels
        HV = num_value_heads
        key_dim, value_dim = num_heads * head_dim, HV * self.head_v_dim
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.q_conv = ShortConvolution(key_dim, conv_size, activation="silu")
        self.k_conv = ShortConvolution(key_dim, conv_size, activation="silu")
        self.v_conv = ShortConvolution(value_dim, conv_size, activation="silu")
        self.a_proj = nn.Linear(d_model, HV, bias=False)
        self.b_proj = nn.Linear(d_model, HV, bias=False)
        self.A_log = nn.Parameter(torch.empty(HV))
        self.dt_bias = nn.Parameter(torch.empty(HV))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.dt_bias._no_weight_decay = True  # type: ignore[attr-defined]
        self.g_proj = nn.Linear(d_model, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)
        self.delta_rule_op = GatedDeltaRuleOp(kernels, chunk_size)
        self.conv_op = ShortConvOp(kernels)
        self.reset_decay_parameters()

    def reset_parameters(self) -> None:
        """Model-level init hook (:meth:`HybridLM.reset_parameters`): the decay init below."""
        self.reset_decay_parameters()

    @torch.no_grad()
    def reset_decay_parameters(
        self,
        a_range: tuple[float, float] = (1.0, 16.0),
        dt_range: tuple[float, float] = (1e-3, 1e-1),
        dt_floor: float = 1e-4,
    ) -> None:
        """Mamba-2 decay init: ``A_log = log U(a_range)``, ``dt_bias = softplus^-1(log-uniform dt)``."""
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(*a_range).log())
        lo, hi = math.log(dt_range[0]), math.log(dt_range[1])
        dt = torch.exp(torch.rand_like(self.dt_bias, dtype=torch.float32) * (hi - lo) + lo).clamp(
            min=dt_floor
        )
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(g, beta)`` each [B, T, HV] from x [B, T, D] (log decay and write strength)."""
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        beta = torch.sigmoid(self.b_proj(x).float())
        return g, beta

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, D = x.shape
        if D != self.d_model:
            raise ValueError(f"GatedDeltaNet(d_model={self.d_model}) got x{tuple(x.shape)}")
        if position_ids is None:
            position_ids = default_position_ids(B, T, cu_seqlens, x.device)
        H, HV, K, V = self.num_heads, self.num_value_heads, self.head_dim, self.head_v_dim
        conv = self.conv_op
        q = l2norm(conv(self.q_conv, self.q_proj(x), position_ids).view(B, T, H, K))
        k = l2norm(conv(self.k_conv, self.k_proj(x), position_ids).view(B, T, H, K))
        v = conv(self.v_conv, self.v_proj(x), position_ids).view(B, T, HV, V)
        g, beta = self.gates(x)
        o = self.delta_rule_op(q, k, v, g, beta, scale=K**-0.5, cu_seqlens=cu_seqlens)
        o = self.o_norm(o, self.g_proj(x).view(B, T, HV, V))
        return self.o_proj(o.reshape(B, T, HV * V))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_value_heads={self.num_value_heads}, head_dim={self.head_dim}, "
            f"head_v_dim={self.head_v_dim}, "
            f"conv_size={self.conv_size}, chunk_size={self.chunk_size}, kernels={self.kernels!r}"
        )


def build_gated_deltanet(cfg: GatedDeltaNetConfig, d_model: int, *, norm_eps: float = 1e-6,
                         kernels: str = "auto", **_) -> GatedDeltaNet:
    """Registry builder: a :class:`GatedDeltaNet` layer from its ``model.gdn`` section."""
    return GatedDeltaNet(
        d_model, cfg.num_heads, cfg.head_dim, expand_v=cfg.expand_v, conv_size=cfg.conv_size,
        chunk_size=cfg.chunk_size, norm_eps=norm_eps, kernels=kernels, num_value_heads=cfg.value_heads,
        value_head_dim=cfg.head_v_dim,
    )


def gated_deltanet_flops_per_token(cfg: GatedDeltaNetConfig, seq_len: int) -> float:
    """Training FLOPs per token of the recurrence beyond its parameters: ``18 * HV * K * V``.

    The recurrence reads, corrects and writes one [K, V] state per value head (HV of them; HV = H
    without grouped value heads), ``3 * 2 * K * V`` forward each, times 3 for forward + backward;
    independent of T (the chunked kernel's intra-chunk work is an implementation cost, not counted).
    """
    return 18.0 * cfg.value_heads * cfg.head_dim * cfg.head_v_dim
