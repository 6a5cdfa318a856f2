"""Data pipeline: corpus -> document split -> tokenizer -> packed token streams -> windows.

``build_data`` ties the pieces together for the trainer::

    tokenizer, train_ds, val_ds = build_data(cfg.data, cfg.data.seq_len, cfg.model.vocab_size, cache_dir)
    sampler = DistributedBatchSampler(len(train_ds), gbs, mbs, dp_rank, dp_size, seed=cfg.data.seed)
    for micro in next_micro_batches(train_ds, sampler):   # one optimizer step
        ...  # micro["input_ids"]: int64 [1, mbs * seq_len], micro["cu_seqlens"]: int32 [N+1]

Modules: :mod:`~lctrain.data.corpus` (loading, split), :mod:`~lctrain.data.tokenizer`
(SentencePiece BPE), :mod:`~lctrain.data.packing` (EOS-joined stream, windows, ``cu_seqlens``),
:mod:`~lctrain.data.sampler` (deterministic data-parallel global batches),
:mod:`~lctrain.data.megatron` (``data.path=megatron:PREFIX``: Megatron ``.bin``/``.idx`` files,
memory-mapped, the same windows without re-tokenising; blends with weights),
:mod:`~lctrain.data.synthetic` (``data.path=synthetic:mqar?...``: generated MQAR examples).
:mod:`~lctrain.data.sources` holds the one table of ``data.path`` schemes that building, path
resolution and config validation all read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from lctrain.errors import ConfigError, DataError

from lctrain.data.corpus import default_cache_dir, load_documents, parse_filter, split_documents
from lctrain.data.packing import (
    IGNORE_INDEX,
    PackedDataset,
    collate_packed,
    load_or_pack,
    stream_dtype,
)
from lctrain.data.sampler import DistributedBatchSampler
from lctrain.data.sources import SOURCES, DataSource, resolve_path, source_for
from lctrain.data.tokenizer import Tokenizer, atomic_write, check_vocab, load_tokenizer, train_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "SOURCES",
    "DataSource",
    "DistributedBatchSampler",
    "PackedDataset",
    "Tokenizer",
    "build_data",
    "check_vocab",
    "collate_packed",
    "data_fingerprint",
    "default_cache_dir",
    "load_documents",
    "load_tokenizer",
    "next_micro_batches",
    "resolve_path",
    "source_for",
    "split_documents",
    "train_tokenizer",
]

log = logging.getLogger(__name__)


def build_data(
    data_cfg: Any,
    seq_len: int,
    vocab_size: int,
    cache_dir: str | Path | None = None,
    rank: int = 0,
) -> tuple[Tokenizer, PackedDataset, PackedDataset]:
    """Load the corpus, split it, get the tokenizer and the packed train / validation datasets.

    Steps: :func:`load_documents` (``data_cfg.path``, ``text_key``, ``split``, ``filter``) ->
    :func:`split_documents` (``val_fraction``, ``seed``; with a ``filter``, each of its ``|``
    alternatives is split on its own and the parts concatenated, so a run on ``A|B`` holds out
    exactly the documents the runs on ``A`` and on ``B`` hold out) -> :func:`load_tokenizer` (trained on the
    training documents only when ``data_cfg.tokenizer == 'auto'``) -> :func:`check_vocab` ->
    token streams cached as ``.npy`` -> :class:`PackedDataset` windows of ``seq_len``.
    Everything derived is cached in ``cache_dir`` keyed by content, so a second call (any rank,
    any run on the same corpus) only reads caches. Built-in corpus, vocab 4096, 2 CPU cores: the
    first call takes 8-13 s (Arrow conversion, tokenizer training about 3 s, encoding about 6 s),
    a later call in a new process about 1.4 s, of which about 1 s is importing ``datasets``.

    For a local corpus, ``cache_dir/prepared_<key>.json`` then records which tokenizer and token
    stream files these settings produced, keyed by each corpus file's path, size and modification
    time (and the tokenizer file's, and every ``data_cfg`` field that changes the result), so later
    calls read neither the documents nor ``datasets``; touching or replacing a corpus file
    rebuilds (an edit that keeps a file's size and modification time is not seen).

    Distributed runs should call this on rank 0 first and on the other ranks once it succeeded
    there (the trainer uses :func:`lctrain.train.startup.main_first`, which also hands rank 0's
    error to every rank); caches are written atomically, so ranks that do race only repeat work,
    never read partial files.

    Args:
        data_cfg: a :class:`lctrain.config.DataConfig` (``path``, ``text_key``, ``split``,
            ``val_fraction``, ``tokenizer``, ``cache_dir``, ``seed``).
        seq_len: tokens per sample (usually ``data_cfg.seq_len``).
        vocab_size: ``model.vocab_size``: the vocabulary requested for an ``'auto'`` tokenizer
            and the bound checked by :func:`check_vocab`.
        cache_dir: data cache; ``None``/empty falls back to ``data_cfg.cache_dir``, then to
            :func:`default_cache_dir`.
        rank: global rank, used only to log from rank 0.

    Returns:
        ``(tokenizer, train_dataset, val_dataset)``. ``val_dataset`` always exists but is empty
        (``len == 0``, check before evaluating) when ``data_cfg.val_fraction == 0``, the corpus has
        a single document, or the validation documents are shorter than one window (a warning
        is logged in that case).

    Raises:
        DataError: a data file cannot be used (missing, empty, malformed JSON with its line,
            invalid UTF-8 with its byte offset, missing text key, not a SentencePiece model), or
            reading or writing a data file failed (the OS error names the file).
        ConfigError: a training split too short for one window of ``seq_len``, a vocabulary
            mismatch, a bad filter. Both end a run with exit code 2 (:mod:`lctrain.cli`).
        ValueError: other invalid arguments.

    A failed read leaves nothing in ``cache_dir`` that a later call would take: ``datasets``
    removes the Arrow files of a dataset it did not finish, and the tokenizer, token streams and
    ``prepared_<key>.json`` are written (atomically) only from documents that were read whole.
    """
    try:
        return _build_data(data_cfg, seq_len, vocab_size, cache_dir, rank)
    except DataError:
        raise
    except OSError as e:  # permission denied, disk full, a file vanished: name it, exit code 2
        raise DataError(f"data: {e}") from e


def _build_data(data_cfg: Any, seq_len: int, vocab_size: int, cache_dir: str | Path | None, rank: int
                ) -> tuple[Tokenizer, PackedDataset, PackedDataset]:
    """:func:`build_data` without its translation of OS errors."""
    t0 = time.perf_counter()
    source = source_for(str(data_cfg.path))
    if source.build is not None:  # generated (synthetic:) or already tokenized (megatron:) data: no corpus
        return source.build(data_cfg, seq_len, vocab_size, cache_dir, rank)
    cache = Path(cache_dir or getattr(data_cfg, "cache_dir", "") or default_cache_dir())
    doc_filter = str(getattr(data_cfg, "filter", "") or "")
    manifest = _prepared_manifest_path(data_cfg, vocab_size, cache)
    prepared = _load_prepared(manifest, seq_len, vocab_size) if manifest is not None else None
    if prepared is not None:
        if rank == 0:
            log.info("data: prepared %s (tokenizer and token streams from %s), %.1fs", data_cfg.path, manifest.name,
                     time.perf_counter() - t0)
        return prepared
    # a tokenizer file is checked before the corpus is read (an unusable one fails in a second)
    tokenizer = load_tokenizer(data_cfg.tokenizer, None, vocab_size, cache) if data_cfg.tokenizer != "auto" else None
    train_docs, val_docs = [], []
    for alt in range(len(parse_filter(doc_filter))) if doc_filter.strip() else [None]:
        docs = load_documents(data_cfg.path, data_cfg.text_key, data_cfg.split, cache_dir=cache,
                              doc_filter=doc_filter, filter_alternative=alt, quiet=rank != 0)
        part_train, part_val = split_documents(docs, data_cfg.val_fraction, data_cfg.seed)
        train_docs += part_train
        val_docs += part_val
    if tokenizer is None:
        tokenizer = load_tokenizer(data_cfg.tokenizer, train_docs, vocab_size, cache)
    check_vocab(tokenizer, vocab_size)

    train_tokens = load_or_pack(train_docs, tokenizer, cache, "train")
    train_ds = PackedDataset(train_tokens, tokenizer.eos_id, seq_len)
    if len(train_ds) == 0:
        raise ConfigError(
            f"the training split of '{data_cfg.path}' has {len(train_tokens)} tokens, fewer than one window of "
            f"data.seq_len={seq_len} (+1); lower data.seq_len or use a larger corpus"
        )
    if val_docs:
        val_tokens = load_or_pack(val_docs, tokenizer, cache, "val")
    else:
        val_tokens = np.zeros(0, dtype=stream_dtype(tokenizer.vocab_size))
    val_ds = PackedDataset(val_tokens, tokenizer.eos_id, seq_len)
    if val_docs and len(val_ds) == 0 and rank == 0:
        log.warning(
            "data: the validation split (%d docs, %d tokens) is shorter than one window of data.seq_len=%d; "
            "validation is skipped. Raise data.val_fraction or lower data.seq_len.",
            len(val_docs), len(val_tokens), seq_len,
        )
    if rank == 0:
        log.info(
            "data: %d train docs (%d tokens, %d windows of %d), %d val docs (%d windows), vocab %d, %.1fs",
            len(train_docs), train_ds.num_tokens, len(train_ds), seq_len, len(val_docs),
            len(val_ds), tokenizer.vocab_size, time.perf_counter() - t0,
        )
    # the memory-mapped streams know their cache files (no second hash of the documents)
    train_file, val_file = getattr(train_tokens, "filename", None), getattr(val_tokens, "filename", None)
    if manifest is not None and tokenizer.path is not None and train_file and (val_file or not val_docs):
        record = {"tokenizer": str(tokenizer.path), "train": str(train_file), "val": str(val_file) if val_docs else None}
        atomic_write(manifest, lambda f: f.write(json.dumps(record).encode()))
    return tokenizer, train_ds, val_ds


_PREPARED_VERSION = 1  # bump when anything that decides the tokenizer or token streams changes


def _prepared_manifest_path(data_cfg: Any, vocab_size: int, cache: Path) -> Path | None:
    """``cache/prepared_<key>.json`` for a local corpus: the key hashes every corpus file's path, size
    and modification time and the settings that decide the tokenizer and token streams (None for
    hub datasets, whose content is not a file here)."""
    from lctrain.data.corpus import _files_in

    try:
        resolved = resolve_path(str(data_cfg.path))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(resolved, Path):
        return None
    files = _files_in(resolved) if resolved.is_dir() else [resolved]
    tok = str(data_cfg.tokenizer)
    if tok != "auto":
        t = Path(tok).expanduser()
        if not t.is_file():
            return None
        files = [*files, t]
    stats = [(str(f.resolve()), st.st_size, st.st_mtime_ns) for f in files for st in (f.stat(),)]
    key = json.dumps({"v": _PREPARED_VERSION, "files": stats, "text_key": data_cfg.text_key, "split": data_cfg.split,
                      "filter": str(getattr(data_cfg, "filter", "") or ""), "val_fraction": data_cfg.val_fraction,
                      "seed": data_cfg.seed, "tokenizer": tok, "vocab_size": int(vocab_size)}, sort_keys=True)
    return cache / f"prepared_{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}.json"


def _load_prepared(manifest: Path, seq_len: int, vocab_size: int) -> tuple | None:
    """The tokenizer and datasets a manifest names, or None when it (or a file it names) is missing.

    This skips reading the documents (and importing ``datasets``) on every run after the first on
    the same, unchanged corpus files: about 1 s and 100+ MB of resident memory per process.
    """
    try:
        record = json.loads(manifest.read_text())
        tokenizer = Tokenizer.from_file(record["tokenizer"])
        train_tokens = np.load(record["train"], mmap_mode="r", allow_pickle=False)
        val_tokens = (np.load(record["val"], mmap_mode="r", allow_pickle=False) if record["val"]
                      else np.zeros(0, dtype=stream_dtype(tokenizer.vocab_size)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    check_vocab(tokenizer, vocab_size)
    train_ds = PackedDataset(train_tokens, tokenizer.eos_id, seq_len)
    if len(train_ds) == 0:
        return None  # the full path gives the message
    return tokenizer, train_ds, PackedDataset(val_tokens, tokenizer.eos_id, seq_len)


def data_fingerprint(data_cfg: Any, tokenizer: Any, train_ds: Any, samples: int = 64) -> dict[str, Any]:
    """What a checkpoint's sampler position depends on: the tokenizer, the packing and the windows.

    Fields: ``tokenizer`` (the tokenizer's content hash), ``packing`` (``seq_len``, ``val_fraction``,
    split ``seed``, ``filter``: the parameters that place documents into windows), ``num_windows``
    and ``windows``: a 16-hex-digit hash of the token ids of ``samples`` evenly spaced training
    windows (first and last included). A changed corpus changes every window after the first
    changed document, so the sample catches it unless a document is replaced by one of the same
    token count at a spot no sampled window covers. The corpus location (``data.path``) is not
    part of it: a corpus moved to another directory resumes.

    Args:
        data_cfg: the run's :class:`~lctrain.config.DataConfig`.
        tokenizer: the run's tokenizer (anything with a ``fingerprint`` string).
        train_ds: the training dataset (``len`` and items with ``input_ids``).
        samples: windows hashed, >= 2.

    Returns:
        A JSON-serialisable dict, equal for equal data.
    """
    n = len(train_ds)
    h = hashlib.blake2b(str(n).encode(), digest_size=8)
    if n:
        for i in sorted({int(x) for x in np.linspace(0, n - 1, min(n, max(samples, 2))).round()}):
            h.update(np.asarray(train_ds[i]["input_ids"], dtype=np.int64).tobytes())
    return {
        "tokenizer": str(getattr(tokenizer, "fingerprint", "")),
        "packing": {"seq_len": int(data_cfg.seq_len), "val_fraction": float(data_cfg.val_fraction),
                    "seed": int(data_cfg.seed), "filter": str(getattr(data_cfg, "filter", "") or "")},
        "num_windows": n,
        "windows": h.hexdigest(),
    }


def next_micro_batches(dataset: PackedDataset, sampler: DistributedBatchSampler) -> list[dict]:
    """Advance ``sampler`` by one optimizer step and return this rank's collated micro-batches.

    Returns:
        ``sampler.grad_accum_steps`` dicts from :func:`collate_packed` (each ``[1, mbs * seq_len]``).
    """
    return [collate_packed([dataset[i] for i in micro]) for micro in sampler.next_global_batch()]
