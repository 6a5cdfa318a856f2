"""Document packing: one token stream with EOS separators, fixed windows, and ``cu_seqlens``.

Documents are tokenized, each followed by EOS, and concatenated into one stream (the layout of
Megatron-LM's GPT dataset). Sample ``i`` is the window ``tokens[i*L : (i+1)*L + 1]`` for
``L = seq_len``: inputs are its first ``L`` tokens and labels its last ``L``, so consecutive
windows overlap by one token and every stream token is an input exactly once per epoch. The
tail that does not fill a window (fewer than ``L`` tokens after the last whole window) is dropped.

Segments (the units attention and recurrent state may not cross, "document masking") start at
the beginning of each window and right after each EOS; the EOS belongs to the document it ends.
A micro-batch of ``S`` windows is flattened into one packed row ``[1, S*L]`` with
``cu_seqlens`` (int32 ``[N+1]``) as in FlashAttention's varlen interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lctrain.data.corpus import corpus_fingerprint
from lctrain.data.tokenizer import Tokenizer, atomic_write
from lctrain.kernels.varlen import attach_host_bounds

IGNORE_INDEX = -100
_ENCODE_CHUNK = 1024  # documents per batched encode call (bounds the Python-int lists held at once)


def stream_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (``vocab_size <= 65536``), else ``int32``."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def pack_documents(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """Tokenize ``docs`` (batched, multi-threaded) and join them, each followed by EOS.

    Returns:
        1-D array (dtype :func:`stream_dtype`) of length ``sum(len(encode(d)) + 1)``.
    """
    dtype = stream_dtype(tokenizer.vocab_size)
    parts: list[np.ndarray] = []
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    for start in range(0, len(docs), _ENCODE_CHUNK):
        for ids in tokenizer.encode_batch(docs[start:start + _ENCODE_CHUNK]):
            parts.append(np.asarray(ids, dtype=dtype))
            parts.append(eos)
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts)


def token_cache_path(docs: Sequence[str], tokenizer: Tokenizer, cache_dir: str | Path, split: str) -> Path:
    """``cache_dir/tokens_<corpus fp>_<tokenizer fp>_<split>.npy``."""
    return Path(cache_dir) / f"tokens_{corpus_fingerprint(docs)}_{tokenizer.fingerprint}_{split}.npy"


def load_or_pack(docs: Sequence[str], tokenizer: Tokenizer, cache_dir: str | Path, split: str) -> np.ndarray:
    """:func:`pack_documents` through an ``.npy`` cache keyed by corpus, tokenizer and split.

    The cache file is written under a temporary name and renamed (atomic), then memory-mapped
    read-only, so concurrent ranks share one copy in the page cache.

    Returns:
        Read-only 1-D token stream (``uint16`` or ``int32``).
    """
    path = token_cache_path(docs, tokenizer, cache_dir, split)
    if not path.is_file():
        tokens = pack_documents(docs, tokenizer)
        atomic_write(path, lambda f: np.save(f, tokens, allow_pickle=False))
    return np.load(path, mmap_mode="r", allow_pickle=False)


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length windows over a packed token stream, with per-document positions and segments.

    Args:
        tokens: 1-D integer array (any int dtype, e.g. a memory-mapped ``uint16`` stream) of
            documents each followed by ``eos_id``.
        eos_id: the EOS id; a segment starts right after each EOS.
        seq_len: ``L``, tokens per sample.

    ``len(dataset) == (len(tokens) - 1) // seq_len``; the last ``(len(tokens) - 1) % seq_len``
    tokens (plus the final label-only token) are never inputs.

    Raises:
        ValueError: ``seq_len < 1`` or ``tokens`` not 1-D.
    """

    def __init__(self, tokens: np.ndarray, eos_id: int, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
        if np.ndim(tokens) != 1:
            raise ValueError(f"tokens must be a 1-D stream, got shape {np.shape(tokens)}")
        self.tokens = tokens
        self.eos_id = int(eos_id)
        self.seq_len = int(seq_len)

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    @property
    def num_tokens(self) -> int:
        """Stream length in tokens (EOS included)."""
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Window ``i``.

        Returns:
            dict of CPU tensors, ``L = seq_len``:

            - ``input_ids`` int64 ``[L]``: ``tokens[i*L : (i+1)*L]``;
            - ``labels`` int64 ``[L]``: the next tokens, ``-100`` where the input is EOS (the
              next document's first token is not predictable under document masking);
            - ``position_ids`` int64 ``[L]``: position within the segment, 0 at the window start
              and right after each EOS;
            - ``doc_lens`` int32 ``[n]``: lengths of the window's segments (sum ``L``, all > 0).

        Raises:
            IndexError: ``i`` outside ``[-len, len)``.
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a dataset of {n} windows")
        i = i % n
        L = self.seq_len
        window = torch.from_numpy(np.array(self.tokens[i * L:(i + 1) * L + 1], dtype=np.int64))
        input_ids = window[:-1].clone()
        labels = window[1:].clone()
        is_eos = input_ids == self.eos_id
        labels[is_eos] = IGNORE_INDEX
        starts = torch.zeros(L, dtype=torch.bool)
        starts[0] = True
        starts[1:] = is_eos[:-1]
        ar = torch.arange(L, dtype=torch.int64)
        seg_start = torch.cummax(torch.where(starts, ar, torch.zeros_like(ar)), dim=0).values
        position_ids = ar - seg_start
        start_idx = ar[starts]
        doc_lens = torch.diff(start_idx, append=torch.tensor([L])).to(torch.int32)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "doc_lens": doc_lens}


def collate_packed(samples: Sequence[dict[str, torch.Tensor]]) -> dict:
    """Flatten a micro-batch of ``S`` windows into one packed row (``B = 1``).

    Args:
        samples: outputs of :meth:`PackedDataset.__getitem__`, all of the same ``seq_len`` ``L``.

    Returns:
        dict with

        - ``input_ids``, ``labels``, ``position_ids``: int64 ``[1, S*L]``;
        - ``cu_seqlens``: int32 ``[N+1]``, cumulative segment starts (document starts and window
          starts), ``cu_seqlens[0] == 0`` and ``cu_seqlens[-1] == S*L``, with its host record
          (:func:`lctrain.kernels.varlen.attach_host_bounds`; carry it to the device with
          :func:`lctrain.kernels.varlen.with_host_bounds`);
        - ``max_seqlen``: int, longest segment;
        - ``num_tokens``: int, number of labels ``!= -100`` (the loss denominator).

    Raises:
        ValueError: empty ``samples``.
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    input_ids = torch.cat([s["input_ids"] for s in samples]).unsqueeze(0)
    labels = torch.cat([s["labels"] for s in samples]).unsqueeze(0)
    position_ids = torch.cat([s["position_ids"] for s in samples]).unsqueeze(0)
    doc_lens = torch.cat([s["doc_lens"] for s in samples]).to(torch.int64)
    cu_seqlens = torch.zeros(len(doc_lens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(doc_lens, 0).to(torch.int32)
    attach_host_bounds(cu_seqlens)  # the one host copy of the boundaries every layer reads
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(doc_lens.max()),
        "num_tokens": int((labels != IGNORE_INDEX).sum()),
    }
