"""Packed variable-length sequences: the ``cu_seqlens`` check, positions within documents, and the
step-major chunk layout shared by the gated delta rule and Lightning Attention torch paths.

Every sequence is padded to a multiple of the chunk size C on its own, and the chunks of all
sequences are gathered into one [num_chunks, H, C, ...] batch, laid out step-major (all first
chunks, then all second chunks, ...) with sequences sorted by chunk count, so a sequential pass
over chunks updates a contiguous prefix of the per-sequence state batch at each step.
"""

from __future__ import annotations

import itertools

import torch


def check_cu_seqlens(
    cu_seqlens: torch.Tensor, total_len: int | None = None, batch_size: int | None = None
) -> int:
    """Validate the boundaries of a packed batch; return the number of sequences N.

    Same checks and errors as :func:`cu_seqlens_bounds`, which also returns the boundaries.
    """
    return len(cu_seqlens_bounds(cu_seqlens, total_len, batch_size)) - 1


def cu_seqlens_bounds(
    cu_seqlens: torch.Tensor, total_len: int | None = None, batch_size: int | None = None
) -> list[int]:
    """Validate the boundaries of a packed batch and return them as Python ints (one host read).

    This is the one ``cu_seqlens`` check of lctrain: kernels, layers and the model call it (or
    :func:`check_cu_seqlens`).

    Args:
        cu_seqlens: int32 (or int64) [N + 1], ``cu_seqlens[0] == 0``, non-decreasing; sequence
            ``n`` spans tokens ``cu_seqlens[n]:cu_seqlens[n+1]`` (empty sequences allowed).
        total_len: the packed length T, checked against ``cu_seqlens[-1]`` when given.
        batch_size: B of the batch the boundaries describe, when known; must be 1 (packed layout).

    Raises:
        ValueError: B != 1; not a 1-D integer tensor [N + 1] with N >= 1; first entry not 0;
            decreasing entries; last entry different from ``total_len``.
    """
    if batch_size is not None and batch_size != 1:
        raise ValueError(
            f"cu_seqlens requires the packed layout with batch size 1 ([1, T], documents end to end), "
            f"got B={batch_size}; flatten the batch first"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be an integer tensor (int32), got {cu_seqlens.dtype}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if any(b > e for b, e in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    if total_len is not None and bounds[-1] != total_len:
        raise ValueError(
            f"cu_seqlens[-1]={bounds[-1]} must equal the packed length T={total_len} "
            f"(the batch is [1, T] with the documents laid end to end)"
        )
    return bounds


def num_sequences(cu_seqlens: torch.Tensor | None, B: int, T: int) -> int:
    """Number of sequences N of a [B, T, ...] kernel input: B, or ``len(cu_seqlens) - 1``.

    Raises:
        ValueError: see :func:`check_cu_seqlens`.
    """
    if cu_seqlens is None:
        return B
    return check_cu_seqlens(cu_seqlens, T, B)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total_len: int | None = None) -> torch.Tensor:
    """Position of every token within its document, for a packed batch.

    Args:
        cu_seqlens: int32 (or int64) [N + 1], non-decreasing, ``cu_seqlens[0] == 0``;
            document ``n`` spans tokens ``cu_seqlens[n]:cu_seqlens[n+1]``.
        total_len: expected packed length T (checked against ``cu_seqlens[-1]`` when given).

    Returns:
        int64 [1, T] with ``pos[0, t] = t - cu_seqlens[n]`` for the document ``n`` containing ``t``.

    Raises:
        ValueError: ``cu_seqlens`` is not 1-D, does not start at 0, decreases, or does not end at
            ``total_len``.
    """
    check_cu_seqlens(cu_seqlens, total_len)
    T = int(cu_seqlens[-1])
    cu = cu_seqlens.to(torch.long)
    t = torch.arange(T, device=cu_seqlens.device)
    # index of the document holding each token; right=True sends boundary tokens to the new document
    doc = torch.searchsorted(cu[1:], t, right=True)
    return (t - cu[doc]).unsqueeze(0)


def default_position_ids(
    batch_size: int, seq_len: int, cu_seqlens: torch.Tensor | None, device: torch.device | None = None
) -> torch.Tensor:
    """Positions to use when the caller gave none.

    Args:
        batch_size, seq_len: B and T of the batch.
        cu_seqlens: int32 [N + 1] boundaries of a packed batch (requires B == 1), or None.
        device: where to build the result.

    Returns:
        int64 [B, T]: positions within documents of ``cu_seqlens``, else ``0..T-1`` in every row.

    Raises:
        ValueError: ``cu_seqlens`` with B != 1 or not covering T (see :func:`check_cu_seqlens`).
    """
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, seq_len, batch_size)
        return position_ids_from_cu_seqlens(cu_seqlens.to(device), seq_len)
    return torch.arange(seq_len, device=device).expand(batch_size, seq_len)


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
