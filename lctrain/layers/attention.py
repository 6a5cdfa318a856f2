"""Causal softmax attention with GQA, RoPE, packed documents and an optional output gate.

* Attention: Vaswani et al., "Attention Is All You Need" (2017), eq. 1,
  ``softmax(Q K^T / sqrt(Dh) + causal mask) V``.
* Grouped-query attention (GQA): Ainslie et al. (2023); query head ``h`` reads key/value head
  ``h // (num_heads / num_kv_heads)``.
* RoPE on q and k at explicit ``position_ids`` (:mod:`lctrain.layers.rope`).
* Output gate: Qiu et al., "Gated Attention for Large Language Models" (2025), the variant the
  paper finds best: a sigmoid gate after SDPA ("G1"), elementwise over each head's Dh dims and
  head-specific, computed from the layer input: ``o = SDPA(q, k, v) * sigmoid(x W_g)`` with
  ``W_g: D -> H*Dh``.
* Packed documents (B = 1 plus ``cu_seqlens``) never attend across document boundaries.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from lctrain.layers.dispatch import check_kernels, use_triton
from lctrain.layers.rope import RotaryEmbedding, default_position_ids


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    kernels: str = "torch",
) -> torch.Tensor:
    """Scaled dot-product attention in the ``[B, T, H, Dh]`` layout, GQA and packed documents.

    Triton path (``use_triton(kernels, q)``): :func:`lctrain.kernels.flash_attn.flash_attn_func`,
    or ``flash_attn_varlen_func`` on ``q[0]`` when ``cu_seqlens`` is given (FlashAttention-2).

    PyTorch path: ``F.scaled_dot_product_attention`` once for the batch, or once per document
    when ``cu_seqlens`` is given (a host loop over ``cu_seqlens``; it costs one device sync and
    no O(T^2) block mask).

    Args:
        q: [B, T, Hq, Dh] queries.
        k, v: [B, T, Hkv, Dh] keys and values; ``Hq`` must be a multiple of ``Hkv``.
        cu_seqlens: int32 [N + 1] document boundaries of a packed batch (requires B == 1).
        scale: logit scale; default ``Dh ** -0.5``.
        causal: mask keys after the query (within each document).
        kernels: ``"torch"`` (SDPA), ``"triton"`` (flash kernel) or ``"auto"`` (triton on CUDA).

    Returns:
        [B, T, Hq, Dh] in ``q.dtype``.

    Raises:
        ValueError: shape mismatch, ``Hq % Hkv != 0``, or ``cu_seqlens`` with B != 1 / wrong end.
    """
    B, T, Hq, Dh = q.shape
    Hkv = k.shape[2]
    if k.shape != (B, T, Hkv, Dh) or v.shape != k.shape or Hq % Hkv:
        raise ValueError(
            f"expected q [B,T,Hq,Dh], k and v [B,T,Hkv,Dh] with Hq % Hkv == 0; "
            f"got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if use_triton(kernels, q):
        from lctrain.kernels.flash_attn import flash_attn_func, flash_attn_varlen_func

        if cu_seqlens is None:
            return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
        if B != 1:
            raise ValueError(f"cu_seqlens requires the packed layout with batch size 1, got B={B}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T:
            raise ValueError(f"cu_seqlens must run from 0 to T={T}, got {bounds}")
        max_len = max((e - s for s, e in itertools.pairwise(bounds)), default=0)
        cu = cu_seqlens.to(torch.int32)
        o = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, max_len, max_len, softmax_scale=scale, causal=causal)
        return o[None]
    # SDPA wants heads before time
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = Hq != Hkv
    if cu_seqlens is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2)
    if B != 1:
        raise ValueError(f"cu_seqlens requires the packed layout with batch size 1, got B={B}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(f"cu_seqlens must run from 0 to T={T}, got {bounds}")
    outs = []
    for s, e in itertools.pairwise(bounds):
        if e > s:
            outs.append(
                F.scaled_dot_product_attention(
                    qt[:, :, s:e], kt[:, :, s:e], vt[:, :, s:e], is_causal=causal, scale=scale, enable_gqa=gqa
                )
            )
    return torch.cat(outs, dim=2).transpose(1, 2)


class Attention(nn.Module):
    """Causal multi-head softmax attention with GQA, RoPE and the Gated-Attention output gate.

    ``x -> q = x Wq, k = x Wk, v = x Wv`` (no biases) ``-> RoPE(q, k) -> SDPA (causal, per
    document) -> [* sigmoid(x Wg)] -> o_proj``.

    Args:
        d_model: D, model width.
        num_heads: Hq query heads.
        num_kv_heads: Hkv key/value heads (GQA); must divide ``num_heads``.
        head_dim: Dh per head (even, for RoPE).
        rope_theta: RoPE base.
        output_gate: add ``g_proj`` (D -> Hq*Dh) and multiply the attention output by its
            sigmoid elementwise (Qiu et al. 2025, G1 elementwise head-specific gate).
        kernels: ``"auto"`` | ``"torch"`` | ``"triton"``: :func:`softmax_attention` with SDPA
            (torch), the Triton FlashAttention-2 kernel (triton), or Triton on CUDA and SDPA
            elsewhere (auto).

    Parameters: ``q_proj [Hq*Dh, D]``, ``k_proj``/``v_proj [Hkv*Dh, D]``, ``g_proj [Hq*Dh, D]``
    (if gated), ``o_proj [D, Hq*Dh]`` (the residual-branch output projection).

    ``forward(x [B,T,D], position_ids [B,T] int | None, cu_seqlens int32 [N+1] | None) -> [B,T,D]``.
    ``position_ids=None`` means positions within documents of ``cu_seqlens`` (or ``0..T-1``).

    Raises:
        ValueError: inconsistent head counts or input shapes; ImportError: ``triton`` without
        the triton package.

    Context parallelism: :func:`lctrain.parallel.context.apply_context_parallel` sets
    ``context_parallel``; x is then this rank's zigzag shard, ``position_ids`` its true positions
    and ``cu_seqlens`` the global document boundaries (ring / Ulysses / USP attention).
    """

    supports_context_parallel = True
    context_parallel = None  # a ContextParallel handle, set by apply_context_parallel

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope_theta: float = 10000.0,
        output_gate: bool = True,
        kernels: str = "auto",
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
        self.kernels = kernels
        check_kernels(kernels, "softmax attention")
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=False)
        self.g_proj = nn.Linear(d_model, num_heads * head_dim, bias=False) if output_gate else None
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=False)
        self.rope = RotaryEmbedding(head_dim, rope_theta)

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
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = self.rope(q, k, position_ids)
        if self.context_parallel is not None:  # zigzag shard; cu_seqlens are the global boundaries
            from lctrain.parallel.context import context_parallel_attention

            o = context_parallel_attention(
                q, k, v, cu_seqlens, self.context_parallel, use_flash=use_triton(self.kernels, q)
            )
        else:
            o = softmax_attention(q, k, v, cu_seqlens=cu_seqlens, causal=True, kernels=self.kernels)
        if self.g_proj is not None:
            o = o * torch.sigmoid(self.g_proj(x)).view(B, T, self.num_heads, self.head_dim)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"output_gate={self.g_proj is not None}, kernels={self.kernels!r}"
        )
