"""Softmax attention under context parallelism: ring, Ulysses, or both (USP).

Unified Sequence Parallelism (Fang & Zhao, "USP: A Unified Sequence Parallelism Approach for Long
Context Generative AI", 2024): Ulysses all-to-all inside groups of U ranks, ring attention across
the P/U groups. ``cp_impl=ring`` is U = 1 and ``cp_impl=ulysses`` is U = P (no ring).
"""

from __future__ import annotations

import torch

from lctrain.kernels.dispatch import use_triton
from lctrain.kernels.softmax_attn import softmax_attention
from lctrain.parallel.context.handle import ContextParallel
from lctrain.parallel.context.ring import ring_attention
from lctrain.parallel.context.ulysses import heads_to_seq, replicate_kv_heads, seq_to_heads


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    cp: ContextParallel,
    scale: float | None = None,
    causal: bool = True,
    kernels: str = "auto",
) -> torch.Tensor:
    """Attention of this rank's zigzag shard over the whole (global) sequence.

    Args:
        q: [B, T/P, Hq, Dh]; k, v: [B, T/P, Hkv, Dh]: this rank's tokens (zigzag chunks
            ``r, 2P-1-r``) after RoPE at their true positions.
        cu_seqlens: int32 [N + 1] *global* document boundaries (B == 1), or None.
        cp: the :class:`ContextParallel` handle (``impl``, groups).
        scale: logit scale, default ``Dh ** -0.5``.
        causal: causal mask in global token order.
        kernels: ``auto`` | ``torch`` | ``triton``, the layer's choice: Triton FlashAttention
            kernels for the ring blocks (or the whole local attention after the Ulysses
            all-to-all) when :func:`lctrain.kernels.dispatch.use_triton` says so, else torch.

    Returns:
        [B, T/P, Hq, Dh] in ``q.dtype``: equal to this rank's rows of single-device attention.

    Raises:
        ValueError: ``Hq`` not divisible by U, or ``Hkv`` neither dividing nor divisible by U.
    """
    _, Tl, Hq, _ = q.shape
    T = Tl * cp.degree
    U = cp.ulysses_degree
    if U > 1:
        if Hq % U:
            raise ValueError(f"num_heads={Hq} must be divisible by the Ulysses degree {U}")
        k, v = replicate_kv_heads(k, U), replicate_kv_heads(v, U)
        q, k, v = (seq_to_heads(t, cp.ulysses_group) for t in (q, k, v))
    if cp.ring_degree == 1:
        # every token of the sequence is here: attend in natural order with the fast local path
        order = torch.argsort(cp.ulysses_token_indices(T, device=q.device))
        inv = torch.argsort(order)
        qs, ks, vs = (t.index_select(1, order) for t in (q, k, v))
        o = softmax_attention(qs, ks, vs, cu_seqlens=cu_seqlens, scale=scale, causal=causal, kernels=kernels)
        o = o.index_select(1, inv)
    else:
        kv_runs = [cp.ulysses_token_runs(T, j) for j in range(cp.ring_degree)]
        ring = (cp.ring_group, cp.ring_rank, cp.ring_degree, cp.ring_global_ranks)
        o = ring_attention(
            q, k, v, kv_runs[cp.ring_rank], kv_runs, cu_seqlens, ring, scale=scale, causal=causal,
            use_flash=use_triton(kernels, q, "softmax_attention"),
        )
    if U > 1:
        o = heads_to_seq(o, cp.ulysses_group)
    return o


def ulysses_local_attention(q, k, v, cu_seqlens, cp: ContextParallel, local_fn) -> torch.Tensor:
    """Any attention that needs whole sequences, run under Ulysses (``cp.ring_degree == 1``).

    The all-to-all gives each rank every token of the sequence for ``Hq / P`` query heads (K/V
    heads replicated up to P when fewer); the rank runs ``local_fn(q, k, v, cu_seqlens) -> o`` in
    natural token order on the *global* ``cu_seqlens`` and the reverse all-to-all returns its
    shard. Used by attention variants whose maths spans the whole sequence (e.g. MoBA's block
    routing), for which a ring is not implemented.

    Args:
        q: [B, T/P, Hq, Dh]; k, v: [B, T/P, Hkv, Dh] this rank's zigzag shard.
        cu_seqlens: int32 [N + 1] global boundaries, or None.
        cp: the handle (must be pure Ulysses: ``ring_degree == 1``).
        local_fn: single-device attention in the ``[B, T, H, Dh]`` layout.

    Returns:
        [B, T/P, Hq, Dh]: this rank's rows of ``local_fn`` on the whole sequence.

    Raises:
        ValueError: ``cp`` has a ring part, or ``Hq`` is not divisible by the Ulysses degree.
    """
    if cp.ring_degree != 1:
        raise ValueError(
            f"this attention needs whole sequences per rank: use parallel.cp_impl=ulysses (got {cp.impl} with a "
            f"ring of {cp.ring_degree})"
        )
    _, Tl, Hq, _ = q.shape
    T = Tl * cp.degree
    U = cp.ulysses_degree
    if Hq % U:
        raise ValueError(f"num_heads={Hq} must be divisible by the Ulysses degree {U}")
    k, v = replicate_kv_heads(k, U), replicate_kv_heads(v, U)
    q, k, v = (seq_to_heads(t, cp.ulysses_group) for t in (q, k, v))
    order = torch.argsort(cp.ulysses_token_indices(T, device=q.device))
    inv = torch.argsort(order)
    o = local_fn(*(t.index_select(1, order) for t in (q, k, v)), cu_seqlens).index_select(1, inv)
    return heads_to_seq(o, cp.ulysses_group)
