"""State passing for linear-attention layers under context parallelism (zigzag layout, packed docs).

Linear recurrences ``S_t = A_t S_{t-1} + b_t`` (state ``[K, V]`` per head) are affine in the
incoming state, so a segment of tokens acts on it as ``S_out = M S_in + S^0`` with ``M`` the
product of the ``A_t`` (``[K, K]``) and ``S^0`` the segment's final state from a zero start, and
its outputs as ``o_t = o^0_t + (P_t S_in)^T (scale q_t)`` with ``P_t`` the partial product.
This is the state passing of LASP-2 (Sun et al., "LASP-2: Rethinking Sequence Parallelism for
Linear Attention and Its Hybrid", 2025) on the zigzag chunks:

* Gated DeltaNet: ``A_t = exp(g_t) (I - beta_t k_t k_t^T)``, ``b_t = beta_t k_t v_t^T``.
* Lightning attention: ``A_t = exp(-slope) I``, ``b_t = k_t v_t^T``.

Two kernel calls per rank. The value columns of the state evolve independently, so a *state
pass* with values ``[v | 0]`` from the state ``[0 | I]`` has final state ``[S^0 | M]`` (its
outputs are discarded; it is recomputed in backward with ``torch.utils.checkpoint``, so it keeps
no activations). Each rank all-gathers ``(S^0, M)`` of its two chunks (differentiable, fp32),
chains the ``2P`` chunks in sequence order (``S_in(c+1) = M_c S_in(c) + S^0_c``), and the
*output pass*, the ordinary call started from ``S_in`` on each chunk, gives its outputs exactly.
Context parallelism thus stores nothing beyond what the single-device layer stores (the output
pass's own saved tensors) and the small ``[K, V+K]`` states; the price is the state pass, a
kernel call on ``V + K`` value columns, in forward and again in backward.

Document boundaries (global ``cu_seqlens``) split chunks into pieces passed to the kernel as
separate sequences; only a chunk's first piece continues the state of the previous chunk, and a
chunk with a boundary inside (or starting a document) has ``M = 0``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from lctrain.kernels.varlen import attach_host_bounds, host_bounds, with_host_bounds
from lctrain.parallel.context.comm import all_gather_stack
from lctrain.parallel.context.handle import ContextParallel


def chunk_pieces(
    cu_seqlens: torch.Tensor | None, global_len: int, cp_degree: int, chunk: int
) -> tuple[list[int], bool]:
    """Document pieces of zigzag chunk ``chunk``: ``(piece lengths, continues previous chunk)``."""
    c = global_len // (2 * cp_degree)
    s, e = chunk * c, (chunk + 1) * c
    if cu_seqlens is None:
        return [c], s > 0
    starts = set(host_bounds(cu_seqlens)[:-1])
    inner = sorted(x for x in starts if s < x < e)
    edges = [s, *inner, e]
    return [b - a for a, b in itertools.pairwise(edges)], s not in starts


def state_passing(
    kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    per_token: tuple[torch.Tensor, ...],
    cu_seqlens: torch.Tensor | None,
    cp: ContextParallel,
    max_value_dim: int | None = None,
) -> torch.Tensor:
    """Run a linear recurrence on this rank's zigzag shard with the exact incoming states.

    Args:
        kernel: ``kernel(q, k, v, *per_token, initial_state=[N,H,K,V'] | None, cu_seqlens=int32
            [N+1]) -> (o [1,T',H,V'], final_state [N,H,K,V'])`` on a packed row (e.g. the chunked gated
            delta rule with ``output_final_state=True``).
        q, k: [B, T/P, H, K]; v: [B, T/P, HV, V]: this rank's tokens (chunks ``r, 2P-1-r``);
            the state has HV heads (HV = H, or a multiple for grouped value heads).
        per_token: further [B, T/P, HV] inputs of the kernel (gates), sharded like q.
        cu_seqlens: int32 [N + 1] *global* document boundaries (B == 1), or None.
        cp: the handle.
        max_value_dim: the widest value head the kernel takes (e.g. 128 for the Lightning Triton
            kernel); the state pass, whose values are ``V + K`` wide, then runs in column blocks
            of at most this width (the columns of a linear recurrence evolve independently).
            None: one call.

    Returns:
        o [B, T/P, HV, V] in ``v.dtype``, equal to this rank's rows of the single-device run.
    """
    B, Tl, _, K = q.shape
    H, V = v.shape[2], v.shape[3]  # state heads follow the value heads (grouped value heads allowed)
    P = cp.degree
    T = Tl * P
    dev = q.device
    chunks = cp.chunk_ids()
    lengths, first_idx, last_idx, single = [], [], [], []
    continues = []
    for _b in range(B):
        for ch in chunks:
            pieces, cont = chunk_pieces(cu_seqlens, T, P, ch)
            first_idx.append(len(lengths))
            lengths.extend(pieces)
            last_idx.append(len(lengths) - 1)
            single.append(len(pieces) == 1 and cont)
            continues.append(cont)
    N = len(lengths)
    bounds_local = [0, *itertools.accumulate(lengths)]
    cu_local = attach_host_bounds(torch.tensor(bounds_local, dtype=torch.int32), bounds_local)
    cu_local = with_host_bounds(cu_local, dev, non_blocking=True)  # built on the host: no device read
    flat = lambda t: t.reshape(1, B * Tl, *t.shape[2:])
    gates = tuple(flat(t) for t in per_token)
    # state pass: value columns evolve independently, so one call with values [v | 0] from the
    # state [0 | I] (identity on continuing first pieces) gives every piece's final [S^0 | M]. Only
    # those states are used; the call exists only because of context parallelism, so it is
    # recomputed in backward (activation checkpointing) instead of keeping its activations.
    init = torch.zeros(N, H, K, V + K, dtype=torch.float32, device=dev)
    eye = torch.eye(K, dtype=torch.float32, device=dev)
    for i, cont in zip(first_idx, continues):
        if cont:
            init[i, :, :, V:] = eye

    W = V + K
    step = W if max_value_dim is None else max(1, min(W, int(max_value_dim)))

    def final_states(q_, k_, v_, *g_):
        v_aug = torch.cat((v_, v_.new_zeros(()).expand(*v_.shape[:-1], K)), -1)
        finals = [
            kernel(q_, k_, v_aug[..., a:a + step].contiguous(), *g_,
                   initial_state=init[..., a:a + step].contiguous(), cu_seqlens=cu_local)[1]
            for a in range(0, W, step)
        ]
        return finals[0] if len(finals) == 1 else torch.cat(finals, -1)

    if torch.is_grad_enabled():
        final = checkpoint(final_states, flat(q), flat(k), flat(v), *gates, use_reentrant=False)
    else:
        final = final_states(flat(q), flat(k), flat(v), *gates)
    final = final.float()
    s0 = final[torch.tensor(last_idx, device=dev), ..., :V]  # [B*2, H, K, V]
    keep = torch.tensor(single, device=dev).float()[:, None, None, None]
    first = torch.tensor(first_idx, device=dev)  # each (row, chunk)'s first piece
    m = final[first, ..., V:] * keep  # [B*2, H, K, K]
    mine = torch.cat((s0, m), -1).reshape(B, 2, H, K, V + K)
    every = all_gather_stack(mine, cp.group)  # [P, B, 2, H, K, V+K], fp32
    S = torch.zeros(B, H, K, V, dtype=torch.float32, device=dev)
    s_in = {}
    for ch in range(max(chunks) + 1):
        s_in[ch] = S
        owner, slot = (ch, 0) if ch < P else (2 * P - 1 - ch, 1)
        x = every[owner, :, slot]
        S = x[..., V:] @ S + x[..., :V]
    # output pass: the ordinary call, started from the exact incoming state on each continuing
    # first piece (zero on pieces that start a document), gives this rank's outputs directly
    starts = torch.stack([s_in[ch][b] for b in range(B) for ch in chunks])  # [B*2, H, K, V], first_idx order
    starts = starts * torch.tensor(continues, device=dev).float()[:, None, None, None]
    s_start = torch.zeros(N, H, K, V, dtype=torch.float32, device=dev).index_put((first,), starts)
    o, _ = kernel(flat(q), flat(k), flat(v), *gates, initial_state=s_start, cu_seqlens=cu_local)
    return o.reshape(B, Tl, H, V).to(v.dtype)


def cp_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cp: ContextParallel,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    kernel: Callable | None = None,
) -> torch.Tensor:
    """Gated delta rule on a zigzag shard (Yang et al., ICLR 2025, eq. 10) with state passing.

    Args:
        q, k: [B, T/P, H, K] (keys L2-normalised); v: [B, T/P, H, V]; g, beta: [B, T/P, H]
            log decay and write strength (fp32 recommended).
        cp: the handle; cu_seqlens: int32 global document boundaries or None.
        scale: default ``K ** -0.5``; chunk_size: the kernel's chunk length.
        kernel: a function with the signature of ``chunk_gated_delta_rule`` without
            ``chunk_size`` (e.g. ``chunk_gated_delta_rule_triton``); default: the torch chunked
            kernel with ``chunk_size``.

    Returns:
        o [B, T/P, H, V] in ``v.dtype``; differentiable w.r.t. q, k, v, g, beta.
    """
    if kernel is None:
        from functools import partial

        from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule

        kernel = partial(chunk_gated_delta_rule, chunk_size=chunk_size)
    if scale is None:
        scale = q.shape[-1] ** -0.5

    def run(q_, k_, v_, g_, b_, initial_state, cu_seqlens):
        return kernel(
            q_, k_, v_, g_, b_, scale=scale, initial_state=initial_state, output_final_state=True,
            cu_seqlens=cu_seqlens,
        )

    return state_passing(run, q, k, v, (g, beta), cu_seqlens, cp)


def cp_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    cp: ContextParallel,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    kernel: Callable | None = None,
    max_value_dim: int | None = None,
) -> torch.Tensor:
    """Lightning attention (Qin et al., arXiv:2401.04658) on a zigzag shard with state passing.

    ``S_t = exp(-slope_h) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``; a chunk's transition
    is ``exp(-slope * len) I``, carried by the same identity-column trick as the delta rule.

    Args:
        q, k: [B, T/P, H, K]; v: [B, T/P, H, V]; slope: [H] (>= 0).
        cp, scale, cu_seqlens, chunk_size: as in :func:`cp_gated_delta_rule`.
        kernel: signature of ``chunk_lightning_attn`` (default: the torch chunked kernel).
        max_value_dim: widest value head ``kernel`` takes (128 for the Triton kernel); the
            ``V + K``-wide state pass is split into column blocks of at most this width.

    Returns:
        o [B, T/P, H, V] in ``v.dtype``.
    """
    if kernel is None:
        from lctrain.kernels.lightning_attn import chunk_lightning_attn as kernel
    if scale is None:
        scale = q.shape[-1] ** -0.5

    def run(q_, k_, v_, initial_state, cu_seqlens):
        return kernel(
            q_, k_, v_, slope, scale=scale, initial_state=initial_state, output_final_state=True,
            cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        )

    return state_passing(run, q, k, v, (), cu_seqlens, cp, max_value_dim=max_value_dim)
