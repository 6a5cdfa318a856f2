"""Corpus loading through Hugging Face ``datasets`` and a document-level train/validation split.

A corpus is a list of documents (strings). ``data.path`` may name:

- a built-in corpus: ``pd_english`` (115 public-domain English documents shipped in
  ``lctrain/data/builtin``; see its README for provenance);
- a local file: ``.jsonl`` / ``.json`` / ``.jsonl.gz`` / ``.json.gz`` (one JSON object per
  document, the text under ``text_key``), ``.txt`` / ``.txt.gz`` (the whole file is one
  document), ``.parquet`` (one row per document, the text in column ``text_key``);
- a local directory: every file of the kinds above below it (recursively, hidden files skipped),
  in sorted path order;
- ``hf:<owner/name>`` or ``hf:<owner/name>:<config>``: a Hugging Face hub dataset (needs network).

Documents keep the order of the files and of the rows inside them, so the corpus (and every
fingerprint derived from it) is deterministic.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
BUILTIN_CORPORA: dict[str, Path] = {"pd_english": BUILTIN_DIR / "pd_english.jsonl.gz"}

# file-name ending -> datasets packaged builder; longest endings are matched first
_BUILDERS: dict[str, str] = {
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".jsonl": "json",
    ".json": "json",
    ".txt.gz": "text",
    ".txt": "text",
    ".parquet": "parquet",
}

_ALLOWED_FORMS = (
    f"a built-in corpus name ({', '.join(BUILTIN_CORPORA)}), a local file "
    f"({', '.join(sorted(_BUILDERS, key=len))}), a directory of such files, or hf:<owner/name>"
)


def default_cache_dir() -> Path:
    """The lctrain data cache used when no ``cache_dir`` is given: ``~/.cache/lctrain/data``."""
    return Path.home() / ".cache" / "lctrain" / "data"


def _builder_for(path: Path) -> str | None:
    name = path.name.lower()
    for ending, builder in _BUILDERS.items():
        if name.endswith(ending):
            return builder
    return None


def _files_in(directory: Path) -> list[Path]:
    files = []
    for p in directory.rglob("*"):
        rel = p.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if _builder_for(p) is not None:
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' progress bars while loading, restoring the caller's setting after."""
    import datasets
    from datasets.utils import logging as ds_logging

    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


def _column(ds, text_key: str, source: str) -> list[str]:
    columns = list(ds.column_names)
    if text_key not in columns:
        raise ValueError(
            f"{source} has no column '{text_key}'; columns found: {', '.join(columns) or '(none)'}. "
            f"Set data.text_key to the column holding the document text."
        )
    values = ds.with_format("arrow")[text_key].to_pylist()
    for i, v in enumerate(values):
        if v is not None and not isinstance(v, str):
            raise ValueError(
                f"{source}: column '{text_key}' must hold strings, row {i} holds {type(v).__name__}; "
                f"set data.text_key to a text column (columns found: {', '.join(columns)})"
            )
    return values


def _load_files(files: list[Path], text_key: str, cache_dir: Path) -> list[str]:
    import datasets

    docs: list[str] = []
    # consecutive files with the same builder are loaded together; order is preserved
    groups: list[tuple[str, list[Path]]] = []
    for f in files:
        builder = _builder_for(f)
        assert builder is not None
        if groups and groups[-1][0] == builder:
            groups[-1][1].append(f)
        else:
            groups.append((builder, [f]))
    for builder, group in groups:
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        source = str(group[0]) if len(group) == 1 else f"{len(group)} {builder} files under {group[0].parent}"
        with _quiet_datasets():
            try:
                ds = datasets.load_dataset(
                    builder,
                    data_files=[str(f) for f in group],
                    split="train",
                    cache_dir=str(cache_dir),
                    **kwargs,
                )
            except Exception as e:  # pyarrow / json parse errors: say which files
                raise ValueError(f"cannot read {source} with the datasets '{builder}' builder: {e}") from e
        docs += _column(ds, "text" if builder == "text" else text_key, source)
    return docs


def _load_hub(name: str, text_key: str, split: str, cache_dir: Path) -> list[str]:
    import datasets

    repo, _, config = name.partition(":")
    if not repo:
        raise ValueError(f"empty hub dataset name in 'hf:{name}'; use hf:<owner/name> or hf:<owner/name>:<config>")
    with _quiet_datasets():
        ds = datasets.load_dataset(repo, config or None, cache_dir=str(cache_dir))
    if split not in ds:
        raise ValueError(
            f"hub dataset '{repo}' has no split '{split}'; splits found: {', '.join(ds)}. Set data.split."
        )
    return _column(ds[split], text_key, f"hub dataset '{repo}' split '{split}'")


def resolve_path(path: str) -> Path | str:
    """Resolve ``data.path`` to a local :class:`Path` (built-in names included) or keep ``hf:...``.

    Raises:
        FileNotFoundError: ``path`` is neither a built-in name, an existing file/directory nor
            ``hf:...``; the message names the path and the allowed forms.
        ValueError: an existing file whose extension no builder reads.
    """
    if path.startswith("hf:"):
        return path
    if path in BUILTIN_CORPORA:
        builtin = BUILTIN_CORPORA[path]
        if not builtin.exists():
            raise FileNotFoundError(f"built-in corpus file {builtin} is missing; reinstall lctrain")
        return builtin
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.path '{path}' does not exist; data.path must be {_ALLOWED_FORMS}")
    if p.is_file() and _builder_for(p) is None:
        raise ValueError(f"data.path '{path}' has an unsupported extension; data.path must be {_ALLOWED_FORMS}")
    return p


def load_documents(
    path: str,
    text_key: str = "text",
    split: str = "train",
    cache_dir: str | Path | None = None,
) -> list[str]:
    """Load a corpus as a list of non-empty documents, in a deterministic order.

    Args:
        path: ``pd_english``, a local file or directory, or ``hf:<owner/name>[:<config>]``
            (see the module docstring for the accepted file kinds).
        text_key: field / column holding the document text (JSON and parquet). ``.txt`` files
            always give their whole content as the document, whatever ``text_key`` says.
        split: dataset split; local files and built-in corpora only have ``train`` (the
            validation split is cut from it with :func:`split_documents`), hub datasets may have more.
        cache_dir: lctrain data cache; ``datasets`` keeps its Arrow cache in
            ``<cache_dir>/hf_datasets`` (default :func:`default_cache_dir`), never in ``~/.cache/huggingface``.

    Returns:
        Documents as Python strings, empty and whitespace-only documents (and nulls) removed.
        The whole corpus is held in memory (fine for corpora of a few GB of text).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message lists the allowed forms).
        ValueError: unsupported extension, a directory without corpus files, a split other than
            ``train`` for local data, ``text_key`` missing (the columns found are named), a
            non-string text column, or no non-empty document at all.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    hf_cache = cache / "hf_datasets"
    resolved = resolve_path(path)
    if isinstance(resolved, str):
        docs = _load_hub(resolved[len("hf:"):], text_key, split, hf_cache)
    else:
        if split != "train":
            raise ValueError(
                f"local corpus '{path}' has only the split 'train' (got data.split='{split}'); the "
                f"validation split is cut from it by data.val_fraction"
            )
        if resolved.is_dir():
            files = _files_in(resolved)
            if not files:
                raise ValueError(
                    f"directory '{path}' holds no corpus files (looked for {', '.join(sorted(_BUILDERS, key=len))})"
                )
        else:
            files = [resolved]
        docs = _load_files(files, text_key, hf_cache)
    docs = [d for d in docs if d is not None and d.strip()]
    if not docs:
        raise ValueError(f"corpus '{path}' is empty: no non-empty document under '{text_key}'")
    return docs


def corpus_fingerprint(docs: Sequence[str]) -> str:
    """A 16-hex-digit content hash of ``docs`` (order and boundaries included).

    Two corpora share a fingerprint only if they hold the same documents in the same order, so
    caches keyed by it (tokenizer, token streams) never serve stale data after a file changes.
    """
    h = hashlib.blake2b(digest_size=8)
    for d in docs:
        b = d.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def split_documents(docs: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split documents (not tokens) into train and validation sets.

    ``round(val_fraction * len(docs))`` documents, at least one when ``val_fraction > 0`` and
    there are two or more documents (and always leaving one for training), are drawn by a
    ``random.Random(seed)`` permutation; both parts keep the corpus order, so the result depends
    only on ``docs``, ``val_fraction`` and ``seed``.

    Args:
        docs: the corpus.
        val_fraction: fraction of documents held out, in ``[0, 1)``.
        seed: split seed (``data.seed``).

    Returns:
        ``(train_docs, val_docs)``; ``val_docs`` is empty when ``val_fraction == 0`` or only one
        document exists.

    Raises:
        ValueError: ``val_fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    n = len(docs)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(max(1, round(val_fraction * n)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_ids = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val
