"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards and back.

Jacobs et al., "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long
Sequence Transformer Models" (2023). Before attention, each of the U ranks of a Ulysses group
trades its ``[B, T/U, H, Dh]`` (all heads, a slice of the sequence) for ``[B, T, H/U, Dh]`` (a
slice of the heads, every token of the group); after attention the inverse exchange restores the
sequence shard. Tokens arrive in Ulysses-rank order (rank 0's zigzag chunks, then rank 1's, ...).

GQA with fewer KV heads than ranks: each KV head is replicated ``U / num_kv_heads`` times
(``repeat_interleave``, which keeps query head ``h`` reading its original KV head), so every
rank gets whole KV heads; their gradients sum back through the replication.
"""

from __future__ import annotations

import torch

from lctrain.parallel.context.comm import all_to_all


def replicate_kv_heads(x: torch.Tensor, ulysses_degree: int) -> torch.Tensor:
    """[B, T, Hkv, Dh] -> [B, T, max(Hkv, U), Dh]: repeat each KV head when ``Hkv < U``.

    Raises:
        ValueError: neither ``Hkv % U == 0`` nor ``U % Hkv == 0``.
    """
    Hkv, U = x.shape[2], ulysses_degree
    if Hkv % U == 0:
        return x
    if U % Hkv:
        raise ValueError(f"num_kv_heads={Hkv} must divide or be a multiple of the Ulysses degree {U}")
    return x.repeat_interleave(U // Hkv, dim=2)


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, T_local, H, Dh] (sequence shard) -> [B, U*T_local, H/U, Dh] (head shard), differentiable."""
    return all_to_all(x, group, scatter_dim=2, gather_dim=1)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: [B, U*T_local, H/U, Dh] -> [B, T_local, H, Dh]."""
    return all_to_all(x, group, scatter_dim=1, gather_dim=2)
