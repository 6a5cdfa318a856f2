"""Packed variable-length sequences for the chunked kernels: ``cu_seqlens`` checks and the
step-major chunk layout shared by the gated delta rule and Lightning Attention torch paths.

Every sequence is padded to a multiple of the chunk size C on its own, and the chunks of all
sequences are gathered into one [num_chunks, H, C, ...] batch, laid out step-major (all first
chunks, then all second chunks, ...) with sequences sorted by chunk count, so a sequential pass
over chunks updates a contiguous prefix of the per-sequence state batch at each step.
"""

from __future__ import annotations

import itertools

import torch


def num_sequences(cu_seqlens: torch.Tensor | None, B: int, T: int) -> int:
    """Number of sequences N of a [B, T, ...] kernel input: B, or ``len(cu_seqlens) - 1``.

    Raises:
        ValueError: ``cu_seqlens`` with B != 1, not a 1-D integer tensor [N + 1] with N >= 1, not
            starting at 0 and ending at T, or decreasing.
    """
    if cu_seqlens is None:
        return B
    if B != 1:
        raise ValueError(f"cu_seqlens requires batch size 1 (packed layout), got B={B}; flatten the batch first")
    integer = not (cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or not integer:
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor [N + 1] with N >= 1, got dtype {cu_seqlens.dtype} "
            f"shape {tuple(cu_seqlens.shape)}"
        )
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got first={bounds[0]} last={bounds[-1]}")
    if any(b > e for b, e in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    return len(bounds) - 1


def chunk_layout(B: int, T: int, cu_seqlens: torch.Tensor | None, chunk_size: int, device: torch.device):
    """Index maps for B sequences of T tokens, or the packed sequences of ``cu_seqlens`` (B == 1).

    Returns:
        (gather [NC, C] int64 on ``device``: token index per chunk slot, ``B * T`` for padding;
         scatter [B * T] int64 on ``device``: flat slot of each token;
         order [N] int64 (CPU): sequences sorted by chunk count, descending;
         active list[int]: number of live sequences at each chunk step)
    """
    if cu_seqlens is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    else:
        lengths = torch.diff(cu_seqlens.detach().to("cpu", torch.long))
    gather, scatter, order, active = _layout_from_lengths(lengths, chunk_size, pad_index=B * T)
    return gather.to(device), scatter.to(device), order, active


def gather_chunks(x: torch.Tensor, gather: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, *] -> [NC, H, C, *] in ``dtype``; padding slots read a row of zeros."""
    NC, C = gather.shape
    flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).to(dtype)
    flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])], 0)
    return flat[gather.reshape(-1)].reshape(NC, C, *flat.shape[1:]).transpose(1, 2)


def _layout_from_lengths(lengths: torch.Tensor, chunk_size: int, pad_index: int):
    """Index maps between packed tokens and the step-major chunk layout.

    Args:
        lengths: int64 [N] sequence lengths (CPU).
        chunk_size: C.
        pad_index: token index that reads a row of zeros.

    Returns:
        (gather [NC, C] int64 token index per chunk slot (``pad_index`` for padding),
         scatter [sum(lengths)] int64 flat slot of each token,
         order [N] sequences sorted by chunk count (descending),
         active list[int] number of live sequences at each chunk step)
    """
    C = chunk_size
    N = lengths.numel()
    starts = torch.cumsum(lengths, 0) - lengths
    nch = (lengths + C - 1) // C
    order = torch.sort(nch, descending=True, stable=True).indices
    nch_s, len_s, start_s = nch[order], lengths[order], starts[order]
    max_chunks = int(nch_s[0]) if N > 0 else 0
    steps = torch.arange(max_chunks)
    active_t = (nch_s[None, :] > steps[:, None]).sum(1)
    step_offset = torch.cumsum(active_t, 0) - active_t
    NC = int(nch_s.sum())
    # one row per chunk, enumerated sequence-major: (rank r of its sequence, chunk index c)
    rank = torch.repeat_interleave(torch.arange(N), nch_s)
    c_idx = torch.arange(NC) - torch.repeat_interleave(torch.cumsum(nch_s, 0) - nch_s, nch_s)
    slot = step_offset[c_idx] + rank  # position in the step-major layout
    within = c_idx[:, None] * C + torch.arange(C)[None, :]  # [NC, C] offset inside the sequence
    valid = within < len_s[rank][:, None]
    tok = start_s[rank][:, None] + within
    gather = torch.full((NC, C), pad_index, dtype=torch.long)
    gather[slot] = torch.where(valid, tok, torch.full_like(tok, pad_index))
    scatter = torch.empty(int(lengths.sum()), dtype=torch.long)
    scatter[tok[valid]] = (slot[:, None] * C + torch.arange(C)[None, :])[valid]
    return gather, scatter, order, active_t.tolist()
