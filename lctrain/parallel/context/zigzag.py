"""Zigzag load balancing of causal sequences over context-parallel ranks, at the data boundary.

A sequence of T tokens is cut into ``2P`` equal chunks; cp rank ``r`` holds chunks ``r`` and
``2P-1-r`` (in that order). Under a causal mask early chunks attend to little and late chunks to
much, so pairing them gives every rank the same attention work (the layout of Megatron-LM's
context parallelism and of zigzag ring attention, Brandon et al., "Striped Attention", 2023).

Labels and positions are sharded with the tokens; positions stay the true positions within each
document, so RoPE and the short-convolution masks see the unsharded values. ``cu_seqlens`` is
not sharded: every layer receives the *global* document boundaries and maps its tokens to them.
"""

from __future__ import annotations

import torch

from lctrain.data.packing import IGNORE_INDEX
from lctrain.kernels.varlen import default_position_ids


def zigzag_indices(global_len: int, cp_degree: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global token indices held by ``cp_rank``: chunk ``r`` then chunk ``2P-1-r``.

    Args:
        global_len: T, divisible by ``2 * cp_degree``.
        cp_degree: P >= 1.
        cp_rank: r in ``[0, P)``.

    Returns:
        int64 [T / P], increasing.

    Raises:
        ValueError: T not divisible by 2P, or r out of range.
    """
    P = cp_degree
    if global_len % (2 * P):
        raise ValueError(
            f"sequence length {global_len} is not divisible by 2 x cp_degree = {2 * P}; "
            f"zigzag sharding needs {2 * P} equal chunks (pad the batch or change data.seq_len)"
        )
    if not 0 <= cp_rank < P:
        raise ValueError(f"cp_rank={cp_rank} out of range for cp_degree={P}")
    c = global_len // (2 * P)
    a = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    b = torch.arange((2 * P - 1 - cp_rank) * c, (2 * P - cp_rank) * c, device=device)
    return torch.cat((a, b))


def doc_ids(cu_seqlens: torch.Tensor | None, token_index: torch.Tensor) -> torch.Tensor:
    """Document of each global token index (int64, same shape); all zeros without ``cu_seqlens``."""
    if cu_seqlens is None:
        return torch.zeros_like(token_index)
    cu = cu_seqlens.to(device=token_index.device, dtype=torch.long)
    return torch.searchsorted(cu[1:], token_index, right=True)


def shard_sequence(x: torch.Tensor, cp_degree: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's zigzag shard of ``x`` along ``dim`` (length T -> T / P)."""
    idx = zigzag_indices(x.shape[dim], cp_degree, cp_rank, x.device)
    return x.index_select(dim, idx)


def unshard_sequence(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the full sequence from the shards of ranks ``0..P-1``."""
    P = len(shards)
    local = shards[0].shape[dim]
    T = local * P
    full = torch.cat(shards, dim)
    order = torch.cat([zigzag_indices(T, P, r, full.device) for r in range(P)])
    inv = torch.empty_like(order)
    inv[order] = torch.arange(T, device=full.device)
    return full.index_select(dim, inv)


def shard_batch(batch: dict, cp_degree: int, cp_rank: int) -> dict:
    """Zigzag-shard a packed micro-batch (output of ``collate_packed``) for one cp rank.

    ``input_ids``, ``labels`` and ``position_ids`` ([B, T] each) become [B, T / P]; positions
    are computed from ``cu_seqlens`` first if missing, so they stay the true in-document positions.
    ``cu_seqlens`` (global boundaries, with their host record) and the other keys are passed
    through unchanged. Nothing is read back from the device.

    Raises:
        ValueError: T not divisible by ``2 * cp_degree``.
    """
    out = dict(batch)
    ids = batch["input_ids"]
    B, T = ids.shape
    if batch.get("position_ids") is None:
        out["position_ids"] = default_position_ids(B, T, batch.get("cu_seqlens"), ids.device)
    for key in ("input_ids", "labels", "position_ids"):
        if out.get(key) is not None:
            out[key] = shard_sequence(out[key], cp_degree, cp_rank, dim=1)
    return out
