"""Packed variable-length sequences: the ``cu_seqlens`` check, positions within documents, and the
step-major chunk layout shared by the gated delta rule and Lightning Attention torch paths.

Host copy of the boundaries: every kernel needs the document boundaries on the host (grid
sizes, chunk tables, per-document pieces). Reading them from a CUDA tensor stalls the host until
the GPU drains, so the boundaries are read (or handed over by the collator) **once per
micro-batch** and recorded on the ``cu_seqlens`` tensor itself (:func:`attach_host_bounds`);
:func:`cu_seqlens_bounds`, :func:`max_seqlen` and :func:`chunk_layout` then answer from that
record for every layer, so the number of host syncs of a forward + backward does not grow with
depth. The record is keyed on the tensor's version counter: an in-place change invalidates it.

Every sequence is padded to a multiple of the chunk size C on its own, and the chunks of all
sequences are gathered into one [num_chunks, H, C, ...] batch, laid out step-major (all first
chunks, then all second chunks, ...) with sequences sorted by chunk count, so a sequential pass
over chunks updates a contiguous prefix of the per-sequence state batch at each step.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

_HOST = "_lctrain_host_bounds"  # attribute on a cu_seqlens tensor: (version, bounds tuple, cache dict)


def check_cu_seqlens(
    cu_seqlens: torch.Tensor, total_len: int | None = None, batch_size: int | None = None
) -> int:
    """Validate the boundaries of a packed batch; return the number of sequences N.

    Same checks and errors as :func:`cu_seqlens_bounds`, which also returns the boundaries.
    """
    return len(cu_seqlens_bounds(cu_seqlens, total_len, batch_size)) - 1


def _validate_bounds(bounds, total_len: int | None) -> None:
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if any(b > e for b, e in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {list(bounds)}")
    if total_len is not None and bounds[-1] != total_len:
        raise ValueError(
            f"cu_seqlens[-1]={bounds[-1]} must equal the packed length T={total_len} "
            f"(the batch is [1, T] with the documents laid end to end)"
        )


def _check_shape(cu_seqlens: torch.Tensor, batch_size: int | None) -> None:
    if batch_size is not None and batch_size != 1:
        raise ValueError(
            f"cu_seqlens requires the packed layout with batch size 1 ([1, T], documents end to end), "
            f"got B={batch_size}; flatten the batch first"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be an integer tensor (int32), got {cu_seqlens.dtype}")


def _record(cu_seqlens: torch.Tensor):
    """The host record of ``cu_seqlens`` if it is current, else None."""
    rec = getattr(cu_seqlens, _HOST, None)
    if rec is not None and rec[0] == cu_seqlens._version:
        return rec
    return None


def attach_host_bounds(cu_seqlens: torch.Tensor, bounds=None) -> torch.Tensor:
    """Record the host copy of ``cu_seqlens`` on the tensor; every later query reads it.

    Args:
        cu_seqlens: int32 (or int64) [N + 1] boundaries, on any device.
        bounds: the same boundaries as Python ints (e.g. kept by the collator from the CPU tensor
            it built, or :func:`host_bounds` of the tensor it was copied from); read from the
            tensor (one host sync) when None.

    Returns:
        ``cu_seqlens`` itself (the record is an attribute of the tensor object; a copy made with
        ``.to(...)`` needs its own call).

    Raises:
        ValueError: not a 1-D integer tensor [N + 1], first entry not 0, decreasing entries, or
            ``bounds`` of another length.
    """
    _check_shape(cu_seqlens, None)
    if torch.compiler.is_compiling():  # tensor attributes are not traced; callers read the values
        return cu_seqlens
    if bounds is None:
        bounds = cu_seqlens.tolist()
    bounds = tuple(int(b) for b in bounds)
    if len(bounds) != cu_seqlens.numel():
        raise ValueError(f"{len(bounds)} host bounds for cu_seqlens of shape {tuple(cu_seqlens.shape)}")
    _validate_bounds(bounds, None)
    setattr(cu_seqlens, _HOST, (cu_seqlens._version, bounds, {}))
    return cu_seqlens


def host_bounds(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """The boundaries of ``cu_seqlens`` as Python ints: the recorded host copy, else one read.

    Raises:
        ValueError: see :func:`attach_host_bounds`.
    """
    rec = _record(cu_seqlens)
    if rec is None:
        attach_host_bounds(cu_seqlens)
        rec = _record(cu_seqlens)
        if rec is None:  # under torch.compile nothing is recorded
            bounds = tuple(cu_seqlens.tolist())
            _validate_bounds(bounds, None)
            return bounds
    return rec[1]


def with_host_bounds(cu_seqlens: torch.Tensor, device=None, dtype=None, non_blocking: bool = False) -> torch.Tensor:
    """``cu_seqlens.to(device, dtype)`` carrying the host record over (no host read when one exists)."""
    out = cu_seqlens.to(device=device, dtype=dtype, non_blocking=non_blocking)
    if out is not cu_seqlens and not torch.compiler.is_compiling():
        rec = _record(cu_seqlens)
        if rec is not None:
            setattr(out, _HOST, (out._version, rec[1], {}))
    return out


def host_cache(cu_seqlens: torch.Tensor) -> dict | None:
    """A per-micro-batch cache dict riding on the host record (derived tables), or None."""
    rec = _record(cu_seqlens)
    return None if rec is None else rec[2]


def max_seqlen(cu_seqlens: torch.Tensor) -> int:
    """Longest sequence of ``cu_seqlens`` (flash-attn's ``max_seqlen``), from the host record."""
    b = host_bounds(cu_seqlens)
    return max((e - s for s, e in itertools.pairwise(b)), default=0)


def cu_seqlens_bounds(
    cu_seqlens: torch.Tensor, total_len: int | None = None, batch_size: int | None = None
) -> list[int]:
    """Validate the boundaries of a packed batch and return them as Python ints.

    This is the one ``cu_seqlens`` check of lctrain: kernels, layers and the model call it (or
    :func:`check_cu_seqlens`). The values come from the host record (:func:`attach_host_bounds`),
    so only the first call of a micro-batch reads the device.

    Args:
        cu_seqlens: int32 (or int64) [N + 1], ``cu_seqlens[0] == 0``, non-decreasing; sequence
            ``n`` spans tokens ``cu_seqlens[n]:cu_seqlens[n+1]`` (empty sequences allowed).
        total_len: the packed length T, checked against ``cu_seqlens[-1]`` when given.
        batch_size: B of the batch the boundaries describe, when known; must be 1 (packed layout).

    Raises:
        ValueError: B != 1; not a 1-D integer tensor [N + 1] with N >= 1; first entry not 0;
            decreasing entries; last entry different from ``total_len``.
    """
    _check_shape(cu_seqlens, batch_size)
    bounds = host_bounds(cu_seqlens)
    _validate_bounds(bounds, total_len)
    return list(bounds)


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
    T = cu_seqlens_bounds(cu_seqlens, total_len)[-1]
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
        return position_ids_from_cu_seqlens(with_host_bounds(cu_seqlens, device), seq_len)
    return torch.arange(seq_len, device=device).expand(batch_size, seq_len)


def chunk_layout(B: int, T: int, cu_seqlens: torch.Tensor | None, chunk_size: int, device: torch.device):
    """Index maps for B sequences of T tokens, or the packed sequences of ``cu_seqlens`` (B == 1).

    Built on the host from the boundaries' host record (no device read after the first of the
    micro-batch) and cached there per ``(chunk_size, device)``, so every layer of a micro-batch
    shares one copy.

    Returns:
        (gather [NC, C] int64 on ``device``: token index per chunk slot, ``B * T`` for padding;
         scatter [B * T] int64 on ``device``: flat slot of each token;
         order [N] int64 (CPU): sequences sorted by chunk count, descending;
         active list[int]: number of live sequences at each chunk step)
    """
    cache = None
    if cu_seqlens is None:
        lengths = np.full(B, T, dtype=np.int64)
    else:
        lengths = np.diff(np.asarray(host_bounds(cu_seqlens), dtype=np.int64))
        cache = host_cache(cu_seqlens)
        key = ("chunk_layout", chunk_size, str(device))
        if cache is not None and key in cache:
            return cache[key]
    gather, scatter, order, active = _layout_from_lengths(lengths, chunk_size, pad_index=B * T)
    out = (torch.from_numpy(gather).to(device), torch.from_numpy(scatter).to(device), torch.from_numpy(order), active)
    if cache is not None:
        cache[key] = out
    return out


def gather_chunks(x: torch.Tensor, gather: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, *] -> [NC, H, C, *] in ``dtype``; padding slots read a row of zeros."""
    NC, C = gather.shape
    flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).to(dtype)
    flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])], 0)
    return flat[gather.reshape(-1)].reshape(NC, C, *flat.shape[1:]).transpose(1, 2)


def _layout_from_lengths(lengths: np.ndarray, chunk_size: int, pad_index: int):
    """Index maps between packed tokens and the step-major chunk layout (host arrays, numpy).

    Args:
        lengths: int64 [N] sequence lengths.
        chunk_size: C.
        pad_index: token index that reads a row of zeros.

    Returns:
        (gather [NC, C] int64 token index per chunk slot (``pad_index`` for padding),
         scatter [sum(lengths)] int64 flat slot of each token,
         order [N] sequences sorted by chunk count (descending),
         active list[int] number of live sequences at each chunk step)
    """
    C = chunk_size
    lengths = np.asarray(lengths, dtype=np.int64)
    N = lengths.size
    starts = np.cumsum(lengths) - lengths
    nch = (lengths + C - 1) // C
    order = np.argsort(-nch, kind="stable")
    nch_s, len_s, start_s = nch[order], lengths[order], starts[order]
    max_chunks = int(nch_s[0]) if N > 0 else 0
    steps = np.arange(max_chunks)
    active_t = (nch_s[None, :] > steps[:, None]).sum(1)
    step_offset = np.cumsum(active_t) - active_t
    NC = int(nch_s.sum())
    # one row per chunk, enumerated sequence-major: (rank r of its sequence, chunk index c)
    rank = np.repeat(np.arange(N), nch_s)
    c_idx = np.arange(NC) - np.repeat(np.cumsum(nch_s) - nch_s, nch_s)
    slot = step_offset[c_idx] + rank  # position in the step-major layout
    within = c_idx[:, None] * C + np.arange(C)[None, :]  # [NC, C] offset inside the sequence
    valid = within < len_s[rank][:, None]
    tok = start_s[rank][:, None] + within
    gather = np.full((NC, C), pad_index, dtype=np.int64)
    gather[slot] = np.where(valid, tok, pad_index)
    scatter = np.empty(int(lengths.sum()), dtype=np.int64)
    scatter[tok[valid]] = (slot[:, None] * C + np.arange(C)[None, :])[valid]
    return gather, scatter, order.astype(np.int64), [int(a) for a in active_t]
