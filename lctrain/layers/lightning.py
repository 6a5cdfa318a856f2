"""Lightning Attention layer: linear attention with fixed per-head exponential decay.

The layer of TransNormerLLM / MiniMax-01 (Qin et al., "Lightning Attention-2", arXiv:2401.04658;
MiniMax, "MiniMax-01: Scaling Foundation Models with Lightning Attention", arXiv:2501.08313, Sec. 2.2):

    q, k, v = silu(x W_q), silu(x W_k), silu(x W_v)                  (per head [T, Dh])
    o       = LightningAttn(q, k, v; decay exp(-slope_h))             (state [Dh, Dh] per head)
    y       = (RMSNorm(o) * sigmoid(x W_g)) W_o                       (norm per head, output gate)

Decay slopes: the ALiBi geometric sequence over heads (Press et al., ICLR 2022: for H a power of
two, ``slope_h = 2^(-8 (h + 1) / H)``; otherwise the first power of two below H, interleaved with
the next one's odd terms), scaled per layer by ``1 - layer_idx / (n_layers - 1) + 1e-5`` so that
early layers decay fast (local) and the last layer barely decays (global), as in TransNormerLLM.
The slopes are fixed (a non-persistent buffer rebuilt from the config), not learned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lctrain.errors import ConfigError
from lctrain.kernels.limits import LIGHTNING_TRITON_MAX_HEAD_DIM, check_chunk_size, check_max
from lctrain.kernels.dispatch import check_kernels
from lctrain.kernels.ops import LightningAttnOp
from lctrain.layers.norm import rms_norm


@dataclass
class LightningConfig:
    """Section ``model.lightning``: Lightning Attention layers (letter ``L``).

    ``num_heads`` heads of ``head_dim`` (state ``head_dim x head_dim`` per head, no KV grouping);
    ``chunk_size`` the block length of the chunked kernels (a power of two >= 16 for Triton).
    """

    num_heads: int = 4
    head_dim: int = 64
    chunk_size: int = 64

    def check_kernel_limits(self, choice: dict[str, str], prefix: str = "model.lightning") -> None:
        """Start-up check against the Lightning kernel the plan picked: head dim and chunk size.

        Under context parallelism the state pass carries ``head_dim + head_dim`` value columns;
        it runs in column blocks of at most the kernel's width, so no further limit applies.

        Raises:
            ConfigError: ``head_dim`` above the Triton kernels' limit, or ``chunk_size`` not a
                power of two >= 16.
        """
        if choice.get("lightning_attn") == "triton":
            what = "the Triton Lightning Attention kernels"
            check_max(self.head_dim, LIGHTNING_TRITON_MAX_HEAD_DIM, f"{prefix}.head_dim", what)
            check_chunk_size(self.chunk_size, f"{prefix}.chunk_size", what)

    def validate(self, prefix: str = "model.lightning") -> None:
        """Raise :class:`~lctrain.errors.ConfigError` naming the bad key and what is allowed."""
        for key in ("num_heads", "head_dim", "chunk_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"invalid {prefix}.{key}={getattr(self, key)!r}: must be a positive integer")


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes (Press et al. 2022), a geometric sequence in (0, 1), largest first.

    Raises:
        ValueError: ``num_heads < 1``.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    base = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(base) + power_of_two(2 * base)[0::2][: num_heads - base]


def lightning_slopes(num_heads: int, layer_idx: int, n_layers: int) -> torch.Tensor:
    """fp32 [H] decay rates of one layer: ALiBi slopes times ``1 - layer_idx/(n_layers-1) + 1e-5``.

    Raises:
        ValueError: ``layer_idx`` outside ``[0, n_layers)``.
    """
    if not 0 <= layer_idx < n_layers:
        raise ValueError(f"layer_idx must be in [0, n_layers={n_layers}), got {layer_idx}")
    factor = 1.0 - layer_idx / (n_layers - 1) + 1e-5 if n_layers > 1 else 1.0
    return torch.tensor(alibi_slopes(num_heads), dtype=torch.float32) * factor


class LightningAttention(nn.Module):
    """Lightning Attention token mixer (see module docstring).

    Args:
        d_model: model width D.
        num_heads: heads H.
        head_dim: Dh for queries, keys and values (state Dh x Dh per head).
        layer_idx, n_layers: position in the stack (sets the decay slopes).
        chunk_size: block size of the chunked kernel.
        norm_eps: epsilon of the per-head output RMSNorm.
        kernels: ``"auto"`` | ``"torch"`` | ``"triton"``: torch calls
            :func:`lctrain.kernels.lightning_attn.chunk_lightning_attn`, triton
            ``chunk_lightning_attn_triton`` (``chunk_size`` a power of two >= 16), auto the
            Triton kernel on CUDA and the torch path elsewhere.

    ``forward(x [B,T,D], position_ids [B,T] | None, cu_seqlens int32 [N+1] | None) -> [B,T,D]``;
    positions are not used (the decay encodes order); the state restarts at each document in
    ``cu_seqlens``.

    Raises:
        ValueError: non-positive sizes or an unknown ``kernels`` value;
        ImportError: ``kernels='triton'`` without the triton package.

    Sequence op: ``lightning_op`` (:class:`lctrain.kernels.ops.LightningAttnOp`), the seam a
    parallel scheme swaps from outside (context parallelism: state passing over zigzag shards,
    with the same kernel choice).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        layer_idx: int = 0,
        n_layers: int = 1,
        chunk_size: int = 64,
        norm_eps: float = 1e-6,
        kernels: str = "auto",
    ):
        super().__init__()
        if min(d_model, num_heads, head_dim, chunk_size) < 1:
            raise ValueError(
                f"LightningAttention needs positive sizes, got d_model={d_model} num_heads={num_heads} "
                f"head_dim={head_dim} chunk_size={chunk_size}"
            )
        check_kernels(kernels, "Lightning Attention")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.layer_idx, self.n_layers = layer_idx, n_layers
        self.chunk_size, self.norm_eps, self.kernels = chunk_size, norm_eps, kernels
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(d_model, 3 * inner, bias=False)
        self.g_proj = nn.Linear(d_model, inner, bias=False)
        self.o_norm_weight = nn.Parameter(torch.ones(head_dim))
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        self.register_buffer("slope", lightning_slopes(num_heads, layer_idx, n_layers), persistent=False)
        self.lightning_op = LightningAttnOp(kernels, chunk_size)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit output-norm scale and the slopes rebuilt (after ``to_empty``); Linears are set by the model."""
        self.o_norm_weight.fill_(1.0)
        self.slope.copy_(lightning_slopes(self.num_heads, self.layer_idx, self.n_layers))

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        q, k, v = F.silu(self.qkv_proj(x)).view(B, T, 3, H, Dh).unbind(2)
        o = self.lightning_op(q, k, v, self.slope, cu_seqlens=cu_seqlens)
        o = rms_norm(o, self.o_norm_weight, self.norm_eps) * torch.sigmoid(self.g_proj(x)).view(B, T, H, Dh)
        return self.o_proj(o.reshape(B, T, H * Dh))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"layer_idx={self.layer_idx}, kernels={self.kernels!r}"
        )


def build_lightning(cfg: LightningConfig, d_model: int, *, layer_idx: int = 0, n_layers: int = 1,
                    norm_eps: float = 1e-6, kernels: str = "auto", **_) -> LightningAttention:
    """Registry builder: a :class:`LightningAttention` layer from its ``model.lightning`` section."""
    return LightningAttention(
        d_model, cfg.num_heads, cfg.head_dim, layer_idx=layer_idx, n_layers=n_layers,
        chunk_size=cfg.chunk_size, norm_eps=norm_eps, kernels=kernels,
    )


def lightning_flops_per_token(cfg: LightningConfig, seq_len: int) -> float:
    """Training FLOPs per token beyond the parameters: ``12 * H * Dh^2``.

    Read and write the [Dh, Dh] state, ``2 * 2 * Dh^2`` forward per head, times 3 for training.
    """
    return 12.0 * cfg.num_heads * cfg.head_dim * cfg.head_dim
