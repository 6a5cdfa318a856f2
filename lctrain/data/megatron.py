"""Megatron indexed datasets (``.bin`` / ``.idx``) as a data source: ``data.path=megatron:PREFIX``.

Writing: :func:`preprocess_corpus` (``python launch/preprocess.py``) tokenises any corpus
``data.path`` accepts, appends EOS to every document and writes ``PREFIX_text_document.bin`` /
``.idx`` with Megatron-Core's ``IndexedDatasetBuilder`` (one sequence per document, the layout
of Megatron-LM's ``tools/preprocess_data.py --append-eod``), plus the tokenizer beside them
(``PREFIX_text_document.model``) and a small ``PREFIX_text_document.json`` description.

Reading: :func:`build_megatron_data` (called by :func:`lctrain.data.build_data`) opens each
prefix with Megatron-Core's ``IndexedDataset`` (memory-mapped; the corpus is never loaded or
re-tokenised) and gives the trainer exactly what the text pipeline gives it:

* documents are Megatron's *documents* (``document_indices``; a document may consist of several
  sequences, e.g. sentences from ``--split-sentences``), in file order, empty ones skipped;
* the train / validation split is :func:`lctrain.data.corpus.split_documents`'s rule on document
  numbers (``data.val_fraction``, ``data.seed``), so the split of a preprocessed corpus is the
  split of the corpus itself;
* each split is a virtual token stream (:class:`DocumentStream`): its documents back to back,
  each ending in EOS. Files written with EOS (lctrain, Megatron-LM ``--append-eod``) are read
  as they are; files without (Megatron-LM without ``--append-eod``) get one EOS after each
  document from the index, so document boundaries always come from the index;
* windows, labels, positions and ``cu_seqlens`` are :class:`lctrain.data.packing.PackedDataset`'s
  over that stream, identical to the text pipeline's for the same corpus, tokenizer and seed.

Memory: only per-document metadata (a few int64 per document) is held; tokens are read from the
memory-mapped ``.bin`` window by window. Start-up checks read bounded samples with ``pread``
(not through the mapping), so peak RSS does not grow with the corpus.

Blends (Megatron's ``--data-path`` semantics): ``megatron:W1,PREFIX_1,W2,PREFIX_2,...`` draws
samples from the prefixes in proportion to the (normalised) weights, e.g.
``megatron:0.3,data/a,0.7,data/b``; without weights (``megatron:data/a,data/b``) each prefix
weighs its number of windows (all data used once per epoch). A blend of ``N`` windows (the sum of
its parts' windows, per split) assigns sample ``i`` to a part with Megatron-Core's
``build_blending_indices`` (greedy: the part furthest below its share so far), so every prefix
of the blend holds each part's share up to one sample; inside a part, its ``k``-th draw is window
``perm[k mod len]`` of a permutation seeded by ``data.seed`` (a part asked for more windows than
it has repeats itself). The trainer's sampler then shuffles the ``N`` blended samples per epoch.

``PREFIX`` is a dataset prefix (the path without ``.bin`` / ``.idx``, what Megatron-LM's
``--data-path`` takes) or the ``--output-prefix`` given to ``preprocess.py`` (``_text_document``
is then appended). Prefixes cannot contain commas. The tokenizer is ``data.tokenizer`` when it
names a model, else the ``.model`` file beside the prefix (``PREFIX.model``, or
``<output-prefix>.model``); all parts of a blend must share it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import struct
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lctrain.data.packing import PackedDataset
from lctrain.data.tokenizer import Tokenizer, atomic_write, check_vocab
from lctrain.errors import ConfigError

SCHEME = "megatron:"
DOCUMENT_SUFFIX = "_text_document"  # Megatron-LM's {output_prefix}_{json_key}_{level} for json key 'text'
_IDX_MAGIC = b"MMIDIDX\x00\x00"
# numpy dtypes of Megatron's DType codes (megatron.core.datasets.indexed_dataset.DType)
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                8: np.uint16}
_EOS_SAMPLE_DOCS = 4096  # documents whose last token is read to find out whether EOS is in the data
_ID_SAMPLE_CHUNKS, _ID_CHUNK_TOKENS = 64, 65536  # token ids checked against the vocabulary at start-up
_ENCODE_CHUNK = 1024

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class MegatronSource:
    """One prefix of a ``megatron:`` path: ``prefix`` (no ``.bin`` / ``.idx``) and its blend ``weight`` (or None)."""

    prefix: str
    weight: float | None


def _strip_suffix(p: str) -> str:
    for ext in (".bin", ".idx"):
        if p.endswith(ext):
            return p[: -len(ext)]
    return p


def resolve_prefix(prefix: str) -> str:
    """The dataset prefix whose ``.idx`` and ``.bin`` exist: ``prefix`` itself or ``prefix + '_text_document'``.

    Raises:
        ConfigError: neither pair exists; the message names the missing file(s) and how to build them.
    """
    p = _strip_suffix(os.path.expanduser(prefix.strip()))
    for cand in (p, p + DOCUMENT_SUFFIX):
        idx, bin_ = Path(cand + ".idx"), Path(cand + ".bin")
        if idx.is_file() and bin_.is_file():
            return cand
        if idx.is_file() or bin_.is_file():
            missing = bin_ if idx.is_file() else idx
            raise ConfigError(
                f"data.path megatron:{prefix}: {missing} is missing ({(idx if missing == bin_ else bin_).name} is there); "
                f"an indexed dataset needs both PREFIX.bin and PREFIX.idx"
            )
    raise ConfigError(
        f"data.path megatron:{prefix}: no Megatron indexed dataset (looked for {p}.idx/.bin and "
        f"{p}{DOCUMENT_SUFFIX}.idx/.bin); build one with python launch/preprocess.py --input CORPUS --output-prefix {p}"
    )


def _as_weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_megatron_path(path: str) -> list[MegatronSource]:
    """Parse ``megatron:PREFIX`` / ``megatron:P1,P2`` / ``megatron:W1,P1,W2,P2`` (see the module docstring).

    Returns:
        The sources, prefixes resolved (:func:`resolve_prefix`); weights normalised to sum 1, or
        all None (no weights given).

    Raises:
        ConfigError: empty list, weights on some prefixes only, a non-positive weight, or a
            prefix whose files are missing.
    """
    if not path.startswith(SCHEME):
        raise ConfigError(f"data.path={path!r} is not a {SCHEME} path")
    items = [x.strip() for x in path[len(SCHEME):].split(",") if x.strip()]
    if not items:
        raise ConfigError(f"data.path={path!r}: no prefix after '{SCHEME}'; e.g. megatron:data/corpus or "
                          f"megatron:0.3,data/a,0.7,data/b")
    weighted = len(items) % 2 == 0 and all(_as_weight(w) is not None for w in items[0::2])
    if weighted:
        weights = [float(w) for w in items[0::2]]
        prefixes = items[1::2]
        if any(w <= 0 for w in weights):
            raise ConfigError(f"data.path={path!r}: blend weights must be > 0, got {weights}")
        total = sum(weights)
        return [MegatronSource(resolve_prefix(p), w / total) for p, w in zip(prefixes, weights)]
    if any(_as_weight(x) is not None for x in items):
        raise ConfigError(
            f"data.path={path!r}: give a weight before every prefix (megatron:W1,PREFIX_1,W2,PREFIX_2) or none "
            f"(megatron:PREFIX_1,PREFIX_2); prefixes cannot be numbers"
        )
    return [MegatronSource(resolve_prefix(p), None) for p in items]


# ---------------------------------------------------------------------------------------------- reading
def _import_indexed_dataset():
    """``megatron.core.datasets.indexed_dataset`` without its import-time chatter (TE/Apex warnings, INFO logs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        try:
            from megatron.core.datasets import indexed_dataset
        except ImportError as e:
            raise ConfigError(
                f"data.path=megatron:... needs Megatron-Core ({e}); pip install megatron-core (or '.[megatron]')"
            ) from e
    logging.getLogger(indexed_dataset.__name__).setLevel(logging.WARNING)
    return indexed_dataset


def _read_idx_header(idx_path: str) -> tuple[np.dtype, int, int]:
    """``(token dtype, sequence count, document count)`` from an ``.idx`` header, with clear errors."""
    with open(idx_path, "rb") as f:
        head = f.read(len(_IDX_MAGIC) + 8 + 1 + 8 + 8)
    if len(head) < len(_IDX_MAGIC) + 25 or head[: len(_IDX_MAGIC)] != _IDX_MAGIC:
        raise ConfigError(f"{idx_path} is not a Megatron indexed-dataset index (bad header; expected MMIDIDX)")
    off = len(_IDX_MAGIC)
    (version,) = struct.unpack("<Q", head[off:off + 8])
    (code,) = struct.unpack("<B", head[off + 8:off + 9])
    n_seq, n_doc = struct.unpack("<QQ", head[off + 9:off + 25])
    if version != 1:
        raise ConfigError(f"{idx_path}: index version {version}, only version 1 is supported")
    if code not in _DTYPE_CODES:
        raise ConfigError(f"{idx_path}: unknown token dtype code {code} (known: {sorted(_DTYPE_CODES)})")
    dtype = np.dtype(_DTYPE_CODES[code])
    if dtype.kind not in "iu":
        raise ConfigError(f"{idx_path}: tokens are stored as {dtype} (code {code}); token ids must be integers")
    return dtype, int(n_seq), int(n_doc)


class IndexedDocuments:
    """The non-empty documents of one Megatron indexed dataset, checked against a tokenizer.

    Holds the memory-mapped ``IndexedDataset`` and per-document metadata only (``O(documents)``
    int64 arrays: first sequence, token count, whether an EOS must be appended).

    Args:
        prefix: dataset prefix (``.bin`` / ``.idx`` without suffix), as from :func:`resolve_prefix`.
        tokenizer: the tokenizer the files were written with (its ``eos_id`` and ``vocab_size``).

    Attributes:
        num_docs: number of non-empty documents.
        dtype: numpy dtype of the stored token ids.
        appends_eos: True when the documents carry no EOS and one is appended after each.

    Raises:
        ConfigError: bad header, a float dtype, a dtype too narrow for the tokenizer's ids, a
            ``.bin`` whose size disagrees with the index (other dtype or truncated), documents
            whose sequences are not contiguous, or token ids outside the tokenizer's vocabulary.
    """

    def __init__(self, prefix: str, tokenizer: Tokenizer):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        self.dtype, n_seq, _ = _read_idx_header(idx_path)
        info = np.iinfo(self.dtype)
        if info.max + 1 < tokenizer.vocab_size:
            raise ConfigError(
                f"{idx_path} stores tokens as {self.dtype} (ids up to {info.max}) but the tokenizer has "
                f"{tokenizer.vocab_size} ids: dtype mismatch, the files were not written for this tokenizer"
            )
        ind = _import_indexed_dataset()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            try:
                self.ds = ind.IndexedDataset(prefix, multimodal=False, mmap=True)
            except (AssertionError, ValueError) as e:
                raise ConfigError(f"cannot open Megatron indexed dataset {prefix}: {e}") from e
        itemsize = self.dtype.itemsize
        lengths = self.ds.sequence_lengths  # int32 [n_seq], views of the mapped .idx
        pointers = self.ds.index.sequence_pointers  # int64 [n_seq], byte offsets into .bin
        doc_idx = self.ds.document_indices  # int64 [n_doc + 1], sequence index where each document starts
        expected = int(pointers[-1]) + int(lengths[-1]) * itemsize if n_seq else 0
        actual = os.path.getsize(bin_path)
        if actual != expected:
            raise ConfigError(
                f"{bin_path} has {actual} bytes but {idx_path} describes {expected} ({n_seq} sequences of {self.dtype}): "
                f"dtype mismatch or a truncated/foreign .bin; rebuild both with launch/preprocess.py"
            )
        csum = np.zeros(n_seq + 1, dtype=np.int64)
        np.cumsum(lengths, out=csum[1:])
        first, last = doc_idx[:-1].astype(np.int64), doc_idx[1:].astype(np.int64)
        doc_len = csum[last] - csum[first]
        keep = np.flatnonzero(doc_len > 0)
        self.first_seq = first[keep]
        self.doc_len = doc_len[keep]
        self.num_docs = len(keep)
        starts = pointers[self.first_seq].astype(np.int64)
        ends = pointers[last[keep] - 1].astype(np.int64) + lengths[last[keep] - 1].astype(np.int64) * itemsize
        if np.any(ends - starts != self.doc_len * itemsize):
            raise ConfigError(f"{prefix}: the sequences of some documents are not contiguous in the .bin")
        self._byte_start = starts
        self._eos = int(tokenizer.eos_id)
        self._check_ids(bin_path, tokenizer.vocab_size)
        self.needs_eos = self._find_missing_eos(bin_path)
        self.appends_eos = bool(self.needs_eos.any())
        self.stream_len = self.doc_len + self.needs_eos

    def _pread(self, fd: int, byte_offset: int, count: int) -> np.ndarray:
        data = os.pread(fd, count * self.dtype.itemsize, int(byte_offset))
        return np.frombuffer(data, dtype=self.dtype)

    def _check_ids(self, bin_path: str, vocab_size: int) -> None:
        """Token ids of up to 64 evenly spread chunks of 64 K tokens must lie in ``[0, vocab_size)``."""
        total = os.path.getsize(bin_path) // self.dtype.itemsize
        if total == 0:
            return
        starts = np.unique(np.linspace(0, max(0, total - _ID_CHUNK_TOKENS), _ID_SAMPLE_CHUNKS).astype(np.int64))
        fd = os.open(bin_path, os.O_RDONLY)
        try:
            lo, hi = None, None
            for s in starts:
                chunk = self._pread(fd, int(s) * self.dtype.itemsize, int(min(_ID_CHUNK_TOKENS, total - s)))
                if len(chunk):
                    lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
                    hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
        finally:
            os.close(fd)
        if hi is not None and (hi >= vocab_size or lo < 0):
            raise ConfigError(
                f"{bin_path} holds token id {hi if hi >= vocab_size else lo}, outside the tokenizer's {vocab_size} ids: "
                f"the files were tokenised with another (larger) vocabulary; set data.tokenizer to that model"
            )

    def _find_missing_eos(self, bin_path: str) -> np.ndarray:
        """int64 ``[num_docs]``: 1 where a document does not end with EOS (one is appended when reading).

        Reads the last token of up to 4096 evenly spread documents; if they agree, that answer
        holds for all (EOS appended by the writer, or by nobody); if they disagree, every
        document's last token is read.
        """
        n = self.num_docs
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        fd = os.open(bin_path, os.O_RDONLY)
        try:
            def ends_with_eos(docs: np.ndarray) -> np.ndarray:
                item = self.dtype.itemsize
                return np.array([self._pread(fd, self._byte_start[d] + (self.doc_len[d] - 1) * item, 1)[0] == self._eos
                                 for d in docs], dtype=bool)

            sample = np.unique(np.linspace(0, n - 1, min(n, _EOS_SAMPLE_DOCS)).astype(np.int64))
            found = ends_with_eos(sample)
            if found.all():
                return np.zeros(n, dtype=np.int64)
            if not found.any() and len(sample) < n:
                return np.ones(n, dtype=np.int64)
            if len(sample) == n:
                return (~found).astype(np.int64)
            return (~ends_with_eos(np.arange(n))).astype(np.int64)
        finally:
            os.close(fd)

    def read(self, doc: int, offset: int, count: int) -> np.ndarray:
        """``count`` stored tokens of document ``doc`` from token ``offset`` (a view of the mapped ``.bin``)."""
        return self.ds.get(int(self.first_seq[doc]), offset=int(offset), length=int(count))


class DocumentStream:
    """A 1-D, read-only token stream over chosen documents of an :class:`IndexedDocuments`, built lazily.

    It behaves like the ``np.ndarray`` stream :class:`~lctrain.data.packing.PackedDataset` takes:
    ``len``, ``ndim == 1``, ``dtype``, and contiguous slices ``stream[a:b]`` (returned as new
    arrays of ``b - a`` tokens, copied from the memory map; an appended EOS is filled in).

    Args:
        docs: the dataset.
        selection: int64 document numbers, in stream order (e.g. the training split).
    """

    ndim = 1

    def __init__(self, docs: IndexedDocuments, selection: np.ndarray):
        self.docs = docs
        self.selection = np.asarray(selection, dtype=np.int64)
        self.offsets = np.zeros(len(self.selection) + 1, dtype=np.int64)
        np.cumsum(docs.stream_len[self.selection], out=self.offsets[1:])
        self.dtype = docs.dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            n = len(self)
            if not -n <= key < n:
                raise IndexError(f"token {key} out of range for a stream of {n}")
            return self[int(key) % n:int(key) % n + 1][0]
        if not isinstance(key, slice):
            raise TypeError(f"DocumentStream indices are ints or contiguous slices, got {type(key).__name__}")
        a, b, step = key.indices(len(self))
        if step != 1:
            raise ValueError("DocumentStream slices must be contiguous (step 1)")
        out = np.empty(max(0, b - a), dtype=self.dtype)
        pos = a
        d = int(np.searchsorted(self.offsets, a, side="right")) - 1
        while pos < b:
            doc = int(self.selection[d])
            start = pos - int(self.offsets[d])
            take = min(b - pos, int(self.offsets[d + 1]) - pos)
            real = int(self.docs.doc_len[doc])
            n_real = max(0, min(start + take, real) - start)
            if n_real:
                out[pos - a:pos - a + n_real] = self.docs.read(doc, start, n_real)
            if n_real < take:  # the appended EOS (the stream's last token of this document)
                out[pos - a + n_real:pos - a + take] = self.docs._eos
            pos += take
            d += 1
        return out


def split_document_ids(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Document numbers of the train and validation splits: :func:`lctrain.data.corpus.split_documents`'s rule.

    ``round(val_fraction * n)`` documents (at least one when ``val_fraction > 0`` and ``n >= 2``,
    always leaving one for training) drawn by a ``random.Random(seed)`` shuffle of ``0..n-1``; both
    parts in increasing order. Applied to the numbers of a preprocessed corpus it selects the same
    documents as ``split_documents`` on the corpus.

    Returns:
        ``(train_ids, val_ids)``, int64 arrays.

    Raises:
        ValueError: ``val_fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1) if val_fraction > 0 and n_docs >= 2 else 0
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[order[:n_val]] = True
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


class BlendedWindows(torch.utils.data.Dataset):
    """Windows drawn from several :class:`PackedDataset` parts in Megatron's blend proportions.

    ``len == sum(len(part))``; sample ``i`` comes from part ``dataset_index[i]`` (Megatron-Core's
    ``build_blending_indices`` with the normalised ``weights``), as that part's draw
    ``k = dataset_sample_index[i]``, i.e. its window ``perm[k % len(part)]`` (``perm`` a fixed
    permutation seeded with ``seed + part``). ``weights=None``: proportional to the parts' lengths.

    Args:
        parts: non-empty datasets of the same ``seq_len``.
        weights: one per part (any positive scale), or None.
        seed: seeds the per-part permutations.

    Raises:
        ValueError: no parts, an empty part, or a weight count that does not match.
    """

    def __init__(self, parts: Sequence[PackedDataset], weights: Sequence[float] | None, seed: int):
        if not parts or any(len(p) == 0 for p in parts):
            raise ValueError("BlendedWindows needs non-empty parts")
        sizes = np.array([len(p) for p in parts], dtype=np.float64)
        w = sizes if weights is None else np.asarray(weights, dtype=np.float64)
        if len(w) != len(parts):
            raise ValueError(f"{len(w)} weights for {len(parts)} parts")
        self.parts = list(parts)
        self.weights = w / w.sum()
        size = int(sizes.sum())
        self.dataset_index = np.zeros(size, dtype=np.int16)
        self.dataset_sample_index = np.zeros(size, dtype=np.int64)
        from megatron.core.datasets import helpers

        helpers.build_blending_indices(self.dataset_index, self.dataset_sample_index, self.weights, len(parts),
                                       size, False)
        self._perms = [np.random.default_rng(seed + i).permutation(len(p)) for i, p in enumerate(parts)]

    def __len__(self) -> int:
        return len(self.dataset_index)

    @property
    def num_tokens(self) -> int:
        """Tokens of all parts' streams together (for logging)."""
        return sum(p.num_tokens for p in self.parts)

    def source(self, i: int) -> tuple[int, int]:
        """``(part, window of that part)`` sample ``i`` reads."""
        d = int(self.dataset_index[i])
        k = int(self.dataset_sample_index[i])
        return d, int(self._perms[d][k % len(self.parts[d])])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """The window of :meth:`source` (see :meth:`PackedDataset.__getitem__` for the fields)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a blend of {n} windows")
        d, w = self.source(i % n)
        return self.parts[d][w]


def _beside_tokenizer(prefix: str) -> Path | None:
    for cand in (prefix + ".model", (prefix[: -len(DOCUMENT_SUFFIX)] + ".model")
                 if prefix.endswith(DOCUMENT_SUFFIX) else None):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def megatron_tokenizer(sources: Sequence[MegatronSource], cfg_tokenizer: str) -> Tokenizer:
    """``data.tokenizer`` when it names a model, else the one model beside every prefix.

    Raises:
        ConfigError: ``auto`` and a prefix without a ``.model`` beside it, or prefixes with
            different models beside them.
        FileNotFoundError, ValueError: a named model that does not exist / is no SentencePiece model.
    """
    if cfg_tokenizer and cfg_tokenizer != "auto":
        return Tokenizer.from_file(cfg_tokenizer)
    found = []
    for s in sources:
        path = _beside_tokenizer(s.prefix)
        if path is None:
            raise ConfigError(
                f"no tokenizer model beside {s.prefix} (looked for {s.prefix}.model); set data.tokenizer to the "
                f"SentencePiece .model the files were written with"
            )
        found.append(Tokenizer.from_file(path))
    if len({t.fingerprint for t in found}) > 1:
        names = ", ".join(str(t.path) for t in found)
        raise ConfigError(f"the prefixes of data.path were written with different tokenizers ({names}); a blend needs "
                          f"one vocabulary: re-run launch/preprocess.py with one --tokenizer, or set data.tokenizer")
    return found[0]


def build_megatron_data(data_cfg: Any, seq_len: int, vocab_size: int, rank: int = 0
                        ) -> tuple[Tokenizer, PackedDataset | BlendedWindows, PackedDataset | BlendedWindows]:
    """Tokenizer and train / validation datasets of a ``data.path=megatron:...`` (see the module docstring).

    Args:
        data_cfg: :class:`lctrain.config.DataConfig` (``path``, ``tokenizer``, ``val_fraction``, ``seed``;
            ``filter`` must be empty).
        seq_len: tokens per window.
        vocab_size: ``model.vocab_size`` (must cover the tokenizer, :func:`check_vocab`).
        rank: global rank (only rank 0 logs).

    Returns:
        ``(tokenizer, train, val)``: :class:`PackedDataset` for one prefix, :class:`BlendedWindows`
        for several; ``val`` may be empty (``len == 0``).

    Raises:
        ConfigError: any problem with the files, the tokenizer or the vocabulary; ``data.filter``
            set; a training split shorter than one window.
    """
    t0 = time.perf_counter()
    if str(getattr(data_cfg, "filter", "") or "").strip():
        raise ConfigError("data.filter selects documents by metadata, which Megatron indexed datasets do not keep; "
                          "filter when preprocessing (launch/preprocess.py on the filtered corpus) and leave data.filter empty")
    sources = parse_megatron_path(data_cfg.path)
    tokenizer = megatron_tokenizer(sources, data_cfg.tokenizer)
    check_vocab(tokenizer, vocab_size)
    train_parts, val_parts, weights, val_weights = [], [], [], []
    for s in sources:
        docs = IndexedDocuments(s.prefix, tokenizer)
        if docs.num_docs == 0:
            raise ConfigError(f"Megatron indexed dataset {s.prefix} holds no (non-empty) document")
        train_ids, val_ids = split_document_ids(docs.num_docs, data_cfg.val_fraction, data_cfg.seed)
        part = PackedDataset(DocumentStream(docs, train_ids), tokenizer.eos_id, seq_len)
        if len(part) == 0:
            raise ConfigError(f"the training split of {s.prefix} has {part.num_tokens} tokens, fewer than one window "
                              f"of data.seq_len={seq_len} (+1); lower data.seq_len or use a larger corpus")
        train_parts.append(part)
        weights.append(s.weight)
        vpart = PackedDataset(DocumentStream(docs, val_ids), tokenizer.eos_id, seq_len)
        if len(vpart):
            val_parts.append(vpart)
            val_weights.append(s.weight)
        if rank == 0:
            log.info("data: %s: %d docs (%d train / %d val), %s tokens%s", s.prefix, docs.num_docs, len(train_ids),
                     len(val_ids), docs.dtype, ", EOS appended from the index" if docs.appends_eos else "")

    def combine(parts, ws):
        if len(sources) == 1:
            return parts[0] if parts else None
        if not parts:
            return None
        return BlendedWindows(parts, None if ws[0] is None else ws, seed=data_cfg.seed)

    train = combine(train_parts, weights)
    val = combine(val_parts, val_weights)
    if val is None:
        val = PackedDataset(np.zeros(0, dtype=np.uint16), tokenizer.eos_id, seq_len)
    if rank == 0:
        log.info("data: megatron %d prefix(es): %d train windows, %d val windows of %d, vocab %d, %.1fs",
                 len(sources), len(train), len(val), seq_len, tokenizer.vocab_size, time.perf_counter() - t0)
    return tokenizer, train, val


# ---------------------------------------------------------------------------------------------- writing
def _tmp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def preprocess_corpus(
    input_path: str,
    output_prefix: str | os.PathLike,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    text_key: str = "text",
    val_fraction: float = 0.02,
    seed: int = 1234,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Tokenise a corpus into ``OUTPUT_PREFIX_text_document.{bin,idx}`` (+ ``.model``, ``.json``).

    Documents come from :func:`lctrain.data.corpus.load_documents` (any ``data.path`` form: a
    built-in name, a file or directory, ``hf:NAME``), in corpus order; each is encoded and
    followed by EOS, one Megatron sequence and document per corpus document, token dtype
    Megatron's ``DType.optimal_dtype(vocab)`` (``uint16`` below 65500 ids, else ``int32``).

    Tokenizer: ``tokenizer`` (a SentencePiece ``.model``) or, when None, a BPE of
    ``vocab_size`` pieces trained like ``data.tokenizer=auto`` does, i.e. on the training
    documents of ``split_documents(docs, val_fraction, seed)``: with the defaults (those of
    ``DataConfig``), ``megatron:OUTPUT_PREFIX`` then trains on exactly what ``data.path=INPUT``
    would. The model is written beside the data as ``OUTPUT_PREFIX_text_document.model``.

    Atomic: every file is written under a temporary name and renamed; ``.idx`` last, so a reader
    never sees an index without its complete ``.bin``.

    Args:
        input_path: the corpus (``data.path`` syntax, not ``megatron:``).
        output_prefix: where to write (directories are created).
        tokenizer, vocab_size, val_fraction, seed: see above.
        text_key: JSON / parquet text column.
        cache_dir: ``datasets`` cache for reading the corpus (default: lctrain's data cache).
        progress: show a tqdm bar over documents.

    Returns:
        ``{"prefix", "documents", "tokens", "dtype", "vocab_size", "tokenizer", "seconds"}``.

    Raises:
        ConfigError, FileNotFoundError, ValueError: from loading the corpus or the tokenizer.
    """
    from tqdm.auto import tqdm

    from lctrain.data.corpus import default_cache_dir, load_documents, split_documents
    from lctrain.data.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    if str(input_path).startswith(SCHEME):
        raise ConfigError(f"--input {input_path}: already a Megatron indexed dataset")
    docs = load_documents(str(input_path), text_key, "train", cache_dir=cache_dir or default_cache_dir())
    if tokenizer:
        tok = Tokenizer.from_file(tokenizer)
    else:
        train_docs, _ = split_documents(docs, val_fraction, seed)
        tok = train_tokenizer(train_docs, vocab_size)
    ind = _import_indexed_dataset()
    dtype = ind.DType.optimal_dtype(tok.vocab_size)
    prefix = Path(str(output_prefix) + DOCUMENT_SUFFIX)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    final_bin, final_idx = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    tmp_bin, tmp_idx = _tmp_sibling(final_bin), _tmp_sibling(final_idx)
    eos = np.array([tok.eos_id], dtype=dtype)
    n_tokens = 0
    try:
        builder = ind.IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        with tqdm(total=len(docs), unit="doc", desc="tokenising", disable=not progress) as bar:
            for start in range(0, len(docs), _ENCODE_CHUNK):
                for ids in tok.encode_batch(docs[start:start + _ENCODE_CHUNK]):
                    arr = np.concatenate([np.asarray(ids, dtype=dtype), eos])
                    builder.add_document(arr, [len(arr)])
                    n_tokens += len(arr)
                bar.update(min(_ENCODE_CHUNK, len(docs) - start))
        builder.finalize(str(tmp_idx))
        _fsync(tmp_bin)
        _fsync(tmp_idx)
        proto = tok._proto
        atomic_write(Path(f"{prefix}.model"), lambda f: f.write(proto))
        meta = {
            "source": str(input_path), "text_key": text_key, "documents": len(docs), "tokens": n_tokens,
            "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "tokenizer_fingerprint": tok.fingerprint, "eos_appended": True, "written_by": "lctrain launch/preprocess.py",
        }
        atomic_write(Path(f"{prefix}.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
        _fsync(prefix.parent)
    finally:
        for p in (tmp_bin, tmp_idx):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return {"prefix": str(prefix), "documents": len(docs), "tokens": n_tokens, "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size, "tokenizer": f"{prefix}.model", "seconds": time.perf_counter() - t0}
