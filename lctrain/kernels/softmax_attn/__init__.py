"""Local softmax attention maths, below both the layers and the parallel schemes.

* :func:`softmax_attention`: the dispatcher the attention mixers call in the ``[B, T, H, Dh]``
  layout (GQA, packed documents): torch SDPA or the Triton FlashAttention-2 kernel of
  :mod:`lctrain.kernels.flash_attn`, chosen by ``kernels``.
* :mod:`.block`: one (query block, key block) pair with its log-sum-exp and the
  FlashAttention-2 style backward, plus the log-sum-exp merge: what ring attention computes
  per hop (:func:`block_attn_fwd`, :func:`block_attn_bwd`, :func:`merge_partial`,
  :func:`attention_mask`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from lctrain.kernels.dispatch import use_triton
from lctrain.kernels.softmax_attn.block import attention_mask, block_attn_bwd, block_attn_fwd, merge_partial
from lctrain.kernels.varlen import cu_seqlens_bounds, with_host_bounds

__all__ = ["attention_mask", "block_attn_bwd", "block_attn_fwd", "merge_partial", "softmax_attention"]


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    kernels: str = "torch",
) -> torch.Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017, eq. 1) in the ``[B, T, H, Dh]`` layout.

    Triton path (``use_triton(kernels, q, "softmax_attention")``: ``kernels="triton"``, or
    ``auto`` on CUDA; the kernel plan of :mod:`lctrain.kernels.plan`):
    :func:`lctrain.kernels.flash_attn.flash_attn_func`, or ``flash_attn_varlen_func`` on ``q[0]``
    when ``cu_seqlens`` is given (FlashAttention-2), with ``max_seqlen`` from the boundaries'
    host record (no device read).

    PyTorch path (the CPU path): ``F.scaled_dot_product_attention`` once for the batch, or once
    per document when ``cu_seqlens`` is given (a host loop over the recorded boundaries; no
    O(T^2) block mask). CUDA runs never take the per-document loop under ``kernels=auto``.

    Args:
        q: [B, T, Hq, Dh] queries.
        k, v: [B, T, Hkv, Dh] keys and values; ``Hq`` must be a multiple of ``Hkv`` (GQA,
            Ainslie et al. 2023: query head ``h`` reads key/value head ``h // (Hq / Hkv)``).
        cu_seqlens: int32 [N + 1] document boundaries of a packed batch (requires B == 1).
        scale: logit scale; default ``Dh ** -0.5``.
        causal: mask keys after the query (within each document).
        kernels: ``"torch"`` (SDPA), ``"triton"`` (flash kernel) or ``"auto"`` (triton on CUDA).

    Returns:
        [B, T, Hq, Dh] in ``q.dtype``.

    Raises:
        ValueError: shape mismatch, ``Hq % Hkv != 0``, or bad ``cu_seqlens`` (see
            :func:`lctrain.kernels.varlen.cu_seqlens_bounds`).
    """
    B, T, Hq, Dh = q.shape
    Hkv = k.shape[2]
    if k.shape != (B, T, Hkv, Dh) or v.shape != k.shape or Hq % Hkv:
        raise ValueError(
            f"expected q [B,T,Hq,Dh], k and v [B,T,Hkv,Dh] with Hq % Hkv == 0; "
            f"got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    bounds = None
    if cu_seqlens is not None:
        bounds = cu_seqlens_bounds(cu_seqlens, T, B)
    if use_triton(kernels, q, "softmax_attention"):
        from lctrain.kernels.flash_attn import flash_attn_func, flash_attn_varlen_func

        if bounds is None:
            return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
        max_len = max((e - s for s, e in itertools.pairwise(bounds)), default=0)  # host record: no read
        cu = with_host_bounds(cu_seqlens, dtype=torch.int32)
        o = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, max_len, max_len, softmax_scale=scale, causal=causal)
        return o[None]
    # SDPA wants heads before time
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = Hq != Hkv
    if bounds is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2)
    outs = []
    for s, e in itertools.pairwise(bounds):
        if e > s:
            outs.append(
                F.scaled_dot_product_attention(
                    qt[:, :, s:e], kt[:, :, s:e], vt[:, :, s:e], is_causal=causal, scale=scale, enable_gqa=gqa
                )
            )
    return torch.cat(outs, dim=2).transpose(1, 2)
