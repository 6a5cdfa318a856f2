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

These are the document sources of the table in :mod:`lctrain.data.sources` (which also holds the
generated ``synthetic:`` and the tokenized ``megatron:`` sources).

Documents keep the order of the files and of the rows inside them, so the corpus (and every
fingerprint derived from it) is deterministic.

Document filter (``data.filter``, :func:`parse_filter`): rows of JSON / parquet / hub data are
kept by their metadata fields (the built-in corpus has ``title``, ``author``, ``source``)::

    filter      := alternative ("|" alternative)*     a document kept by any alternative
    alternative := clause (";" clause)*               every clause must hold
    clause      := FIELD "=" VALUE                    field equals VALUE exactly
                 | FIELD "!=" VALUE                   field differs from VALUE
                 | FIELD "~" TEXT                     field contains TEXT (case-insensitive)
                 | FIELD "!~" TEXT                    field does not contain TEXT

e.g. ``author=William Shakespeare``, ``author~King James``, ``author=John Milton;title!~Poemata``.
Spaces around names and values are stripped; values cannot hold ``|`` or ``;``. A document
belongs to its first matching alternative (see ``filter_alternative`` of :func:`load_documents`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lctrain.errors import ConfigError, DataError, DataFileNotFoundError

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

FILE_KINDS: tuple[str, ...] = tuple(sorted(_BUILDERS, key=len))  # the file endings a local corpus may have
HUB_PREFIX = "hf:"  # data.path=hf:<owner/name>[:<config>] (the hf entry of lctrain.data.sources.SOURCES)


log = logging.getLogger(__name__)


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
    """Silence datasets' progress bars and error log lines while loading, restoring the caller's settings after.

    A file the builder cannot read raises; :func:`_load_files` then reports it with its line.
    """
    import datasets
    from datasets.utils import logging as ds_logging

    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # its "Failed to load JSON ..." lines: lctrain names the line
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


def _column(ds, text_key: str, source: str, locate: Callable[[int], str] | None = None) -> list[str]:
    """The ``text_key`` column of ``ds`` as a list of strings (or None).

    Raises:
        DataError: no such column (the columns found are named), or a value that is not a string
            (its row, and with ``locate`` its file and line, are named).
    """
    columns = list(ds.column_names)
    if text_key not in columns:
        raise DataError(
            f"{source} has no column '{text_key}'; columns found: {', '.join(columns) or '(none)'}. "
            f"Set data.text_key to the column holding the document text."
        )
    feature = ds.features.get(text_key)
    if getattr(feature, "dtype", None) in ("string", "large_string"):  # fast: straight from Arrow
        values = ds.with_format("arrow")[text_key].to_pylist()
    else:  # numbers, or JSON values of mixed types (datasets' Json feature): decoded Python values
        values = list(ds.with_format(None)[text_key])
    for i, v in enumerate(values):
        if v is not None and not isinstance(v, str):
            where = locate(i) if locate is not None else ""
            raise DataError(
                f"{source}: column '{text_key}' must hold strings, row {i}{f' ({where})' if where else ''} holds "
                f"{type(v).__name__}; set data.text_key to a text column (columns found: {', '.join(columns)})"
            )
    return values


def _load_files(files: list[Path], text_key: str, cache_dir: Path, select: _RowFilter | None = None) -> list[str]:
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
            except Exception as e:  # pyarrow / json / decoding errors: find the file and line ourselves
                for f in group:
                    problem = _diagnose(f, builder, text_key)
                    if problem is not None:
                        raise DataError(problem) from e
                reason = str(e) or str(e.__cause__ or "") or type(e).__name__
                raise DataError(f"cannot read {source} with the datasets '{builder}' builder: {reason}") from e
        locate = None
        if select is None:  # rows are the files' rows: a bad value can be traced to its line
            locate = lambda row, group=group, builder=builder: _row_location(group, builder, row)  # noqa: E731
        try:
            if select is not None:
                ds = select(ds, source)
            docs += _column(ds, "text" if builder == "text" else text_key, source, locate)
        except UnicodeDecodeError as e:  # a reader that stored the bytes as they were (compressed JSON)
            problem = next((p for p in (_diagnose(f, builder, text_key) for f in group) if p is not None), None)
            raise DataError(problem or f"{source}: invalid UTF-8 ({e})") from e
    return docs


def _open_bytes(path: Path):
    """``path`` opened for binary reading, decompressed when it ends in ``.gz``."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _json_kind(value: object) -> str:
    """The JSON name of a parsed value's type (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _is_json_array_file(path: Path) -> bool:
    """Whether a ``.json`` file holds one JSON document (``[...]``) rather than JSON lines."""
    if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        return False
    with _open_bytes(path) as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _diagnose(path: Path, builder: str, text_key: str) -> str | None:
    """What is wrong with one corpus file the ``datasets`` builder could not read (None: nothing found).

    Reads the file line by line (decompressed for ``.gz``): invalid UTF-8 is reported with its byte
    offset and line, JSON lines with the line number and column of the first line that is not a JSON
    object or whose ``text_key`` is neither a string nor null; a file without content says so.
    """
    decompressed = " (after decompression)" if path.name.lower().endswith(".gz") else ""
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            pq.ParquetFile(path)
            return None
        array = builder == "json" and _is_json_array_file(path)
        offset, records = 0, 0
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return (
                        f"{path}: invalid UTF-8 at byte offset {offset + e.start}{decompressed} (line {lineno}): "
                        f"bytes {raw[e.start:e.end].hex(' ')} ({e.reason}); corpus files must be UTF-8: "
                        f"re-encode it (e.g. iconv -f latin1 -t utf-8) or remove those bytes"
                    )
                offset += len(raw)
                if builder != "json" or array or not line.strip():
                    continue
                records += 1
                try:
                    obj = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    return (f"{path} line {lineno}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); "
                            f"each line of a JSON-lines corpus must be one JSON object")
                if not isinstance(obj, dict):
                    return (f"{path} line {lineno}: a JSON {_json_kind(obj)}, not an object; each line of a JSON-lines "
                            f"corpus must be one JSON object with the text under '{text_key}' (data.text_key)")
                value = obj.get(text_key)
                if value is not None and not isinstance(value, str):
                    return (f"{path} line {lineno}: '{text_key}' holds a JSON {_json_kind(value)}, not a string; "
                            f"set data.text_key to the field holding the document text")
        if offset == 0 or (builder == "json" and not array and records == 0):
            what = "is empty" if offset == 0 else "holds only blank lines"
            return f"{path} {what}{decompressed}: no document to read"
        if array:
            with _open_bytes(path) as f:
                try:
                    json.loads(f.read().decode("utf-8"))
                except json.JSONDecodeError as e:
                    return f"{path} line {e.lineno}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
    except (OSError, EOFError, zlib.error) as e:
        return f"cannot read {path}: {e}"
    return None


def _row_location(files: list[Path], builder: str, row: int) -> str:
    """``FILE line N`` (JSON lines, ``.txt``) or ``FILE row N`` (parquet) of row ``row`` of ``files`` read
    together by ``builder``; ``""`` when it cannot be told (a ``.json`` array, unreadable files)."""
    try:
        if builder == "text":  # one document per file
            return str(files[row]) if row < len(files) else ""
        if builder == "parquet":
            import pyarrow.parquet as pq

            for f in files:
                n = pq.ParquetFile(f).metadata.num_rows
                if row < n:
                    return f"{f} row {row}"
                row -= n
            return ""
        for f in files:
            if _is_json_array_file(f):
                return ""
            with _open_bytes(f) as fh:
                for lineno, raw in enumerate(fh, 1):
                    if raw.strip():
                        if row == 0:
                            return f"{f} line {lineno}"
                        row -= 1
    except (OSError, EOFError, ValueError, zlib.error):
        pass
    return ""


def _load_hub(name: str, text_key: str, split: str, cache_dir: Path, select: _RowFilter | None = None) -> list[str]:
    import datasets

    repo, _, config = name.partition(":")
    if not repo:
        raise ConfigError(f"empty hub dataset name in 'hf:{name}'; use hf:<owner/name> or hf:<owner/name>:<config>")
    with _quiet_datasets():
        try:
            ds = datasets.load_dataset(repo, config or None, cache_dir=str(cache_dir))
        except Exception as e:  # not found, no network, a bad config name, unreadable files on the hub
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"cannot load hub dataset 'hf:{name}': {reason}") from e
    if split not in ds:
        raise DataError(
            f"hub dataset '{repo}' has no split '{split}'; splits found: {', '.join(ds)}. Set data.split."
        )
    source = f"hub dataset '{repo}' split '{split}'"
    return _column(ds[split] if select is None else select(ds[split], source), text_key, source)


def resolve_local(path: str) -> Path:
    """A built-in corpus name or a local file / directory as a :class:`Path` (the ``files`` data source).

    Raises:
        DataFileNotFoundError: ``path`` is neither a built-in name nor an existing file or
            directory (a ``FileNotFoundError``); :func:`lctrain.data.sources.resolve_path` adds
            the allowed forms to the message.
        DataError: an existing file whose extension no builder reads.
    """
    if path in BUILTIN_CORPORA:
        builtin = BUILTIN_CORPORA[path]
        if not builtin.exists():
            raise DataFileNotFoundError(f"built-in corpus file {builtin} is missing; reinstall lctrain")
        return builtin
    p = Path(path).expanduser()
    if not p.exists():
        raise DataFileNotFoundError(f"data.path '{path}' does not exist")
    if p.is_file() and _builder_for(p) is None:
        raise DataError(f"data.path '{path}' has an unsupported extension")
    return p


def load_documents(
    path: str,
    text_key: str = "text",
    split: str = "train",
    cache_dir: str | Path | None = None,
    doc_filter: str = "",
    filter_alternative: int | None = None,
    quiet: bool = False,
) -> list[str]:
    """Load a corpus as a list of non-empty documents, in a deterministic order.

    Args:
        path: ``pd_english``, a local file or directory, or ``hf:<owner/name>[:<config>]``
            (see the module docstring for the accepted file kinds; :mod:`lctrain.data.sources`
            for every ``data.path`` form).
        text_key: field / column holding the document text (JSON and parquet). ``.txt`` files
            always give their whole content as the document, whatever ``text_key`` says.
        split: dataset split; local files and built-in corpora only have ``train`` (the
            validation split is cut from it with :func:`split_documents`), hub datasets may have more.
        cache_dir: lctrain data cache; ``datasets`` keeps its Arrow cache in
            ``<cache_dir>/hf_datasets`` (default :func:`default_cache_dir`), never in ``~/.cache/huggingface``.
        doc_filter: ``data.filter`` expression (module docstring); empty keeps every document.
        filter_alternative: keep only the documents whose first matching alternative of
            ``doc_filter`` has this index (None: any alternative).
        quiet: do not log the count of skipped documents and files (ranks other than 0).

    Returns:
        Documents as Python strings, empty and whitespace-only documents (and nulls) removed;
        their number is logged (``data: skipped N of M documents ...``), as are empty files of a
        directory, which are skipped. The whole corpus is held in memory (fine for corpora of a
        few GB of text).

    Raises:
        DataFileNotFoundError: ``path`` does not exist (the message lists the allowed forms).
        DataError: unsupported extension, an empty file, a directory without a readable corpus
            file, a file the reader cannot parse (the file and line of malformed JSON, the byte
            offset of invalid UTF-8), ``text_key`` missing (the columns found are named), a
            non-string text value (its row and line), or no non-empty document at all.
        ConfigError: a split other than ``train`` for local data, a malformed ``doc_filter``, a
            filter field that is not a column, or a filter that keeps no non-empty document (the
            message lists the values found).

    Text is read as UTF-8 only: a file with invalid UTF-8 is an error naming the byte offset
    (nothing is replaced or dropped silently).
    """
    select = _RowFilter(parse_filter(doc_filter), filter_alternative) if doc_filter.strip() else None
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    hf_cache = cache / "hf_datasets"
    # here, not at the top: the table of sources names this module's readers (a cycle)
    from lctrain.data.sources import resolve_path, source_for

    source = source_for(path)
    if not source.documents:
        raise ValueError(f"'{path}' is a {source.name} data source, not documents: lctrain.data.build_data reads it")
    resolved = resolve_path(path)
    if isinstance(resolved, str):
        docs = _load_hub(resolved[len(HUB_PREFIX):], text_key, split, hf_cache, select)
    else:
        if split != "train":
            raise ConfigError(
                f"local corpus '{path}' has only the split 'train' (got data.split='{split}'); the "
                f"validation split is cut from it by data.val_fraction"
            )
        if resolved.is_dir():
            files = _readable_files(resolved, path, quiet)
        else:
            files = [resolved]
            if resolved.stat().st_size == 0:
                raise DataError(f"corpus file '{path}' is empty (0 bytes): no document to read")
        docs = _load_files(files, text_key, hf_cache, select)
    n_read, n_null = len(docs), sum(d is None for d in docs)
    docs = [d for d in docs if d is not None and d.strip()]
    if docs and len(docs) < n_read and not quiet:
        log.warning("data: skipped %d of %d documents of '%s' (%d null, %d empty or whitespace-only under '%s')",
                    n_read - len(docs), n_read, path, n_null, n_read - len(docs) - n_null, text_key)
    if not docs and select is not None:
        which = "" if filter_alternative is None else f" (alternative {filter_alternative}: {select.alternative_text})"
        raise ConfigError(
            f"data.filter={doc_filter!r}{which} selects no (non-empty) document of '{path}': {select.describe()}. "
            f"{FILTER_SYNTAX}"
        )
    if not docs:
        raise DataError(f"corpus '{path}' is empty: no non-empty document under '{text_key}' "
                        f"({n_read} read, {n_null} null, {n_read - n_null} empty or whitespace-only)")
    return docs


def _readable_files(directory: Path, path: str, quiet: bool = False) -> list[Path]:
    """The corpus files of ``directory`` that hold bytes and can be opened (empty or unreadable ones are skipped).

    Raises:
        DataError: none is left; the message says what was found instead.
    """
    files = _files_in(directory)
    kinds = ", ".join(sorted(_BUILDERS, key=len))
    if not files:
        others = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))
        found = f"; found only {_some(others)}" if others else "; it is empty"
        raise DataError(f"directory '{path}' holds no corpus files (looked for {kinds}){found}")
    skipped: list[str] = []
    readable = []
    for f in files:
        name = f.relative_to(directory).as_posix()
        if f.stat().st_size == 0:
            skipped.append(f"{name} (empty)")
        elif not os.access(f, os.R_OK):
            skipped.append(f"{name} (not readable: permission denied)")
        else:
            readable.append(f)
    if not readable:
        raise DataError(f"directory '{path}' holds no readable corpus file: {_some(skipped)}")
    if skipped and not quiet:
        log.warning("data: skipped %d of %d files under '%s': %s", len(skipped), len(files), path, _some(skipped))
    return readable


def _some(names: Sequence[str], limit: int = 8) -> str:
    """Up to ``limit`` names, comma-separated, with the count of the rest."""
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


FILTER_SYNTAX = (
    "data.filter syntax: alternatives separated by '|', each clauses separated by ';' that must all hold: "
    "FIELD=VALUE (equal), FIELD!=VALUE, FIELD~TEXT (contains, case-insensitive), FIELD!~TEXT; "
    "e.g. 'author=William Shakespeare' or 'author~King James|title~Paradise'"
)
_FILTER_OPS = ("!=", "!~", "=", "~")


@dataclass(frozen=True)
class FilterClause:
    """One ``FIELD op VALUE`` test of ``data.filter`` (``op`` in ``=``, ``!=``, ``~``, ``!~``)."""

    field: str
    op: str
    value: str

    def matches(self, value: object) -> bool:
        """Whether a document whose ``field`` holds ``value`` (None counts as ``""``) passes."""
        text = "" if value is None else str(value)
        if self.op == "=":
            return text == self.value
        if self.op == "!=":
            return text != self.value
        found = self.value.lower() in text.lower()
        return found if self.op == "~" else not found


def parse_filter(spec: str) -> list[list[FilterClause]]:
    """Parse a ``data.filter`` expression into alternatives (lists of clauses that must all hold).

    Each clause splits at its leftmost operator, so values may contain ``=`` or ``~``.

    Raises:
        ConfigError: an empty expression, alternative or clause, or a clause without an operator
            or a field name; the message quotes the clause and the syntax.
    """
    if not spec.strip():
        raise ConfigError(f"data.filter is empty. {FILTER_SYNTAX}")
    alternatives = []
    for alt in spec.split("|"):
        clauses = []
        for raw in alt.split(";"):
            raw = raw.strip()
            hits = [(raw.find(op), op) for op in _FILTER_OPS if raw.find(op) > 0]
            if not hits:
                raise ConfigError(f"data.filter={spec!r}: clause {raw!r} has no FIELD before an operator. {FILTER_SYNTAX}")
            pos, op = min(hits, key=lambda h: (h[0], -len(h[1])))
            clauses.append(FilterClause(raw[:pos].strip(), op, raw[pos + len(op):].strip()))
        alternatives.append(clauses)
    return alternatives


class _RowFilter:
    """Applies parsed alternatives to ``datasets`` tables and remembers what it saw (for messages)."""

    def __init__(self, alternatives: list[list[FilterClause]], only: int | None = None):
        if only is not None and not 0 <= only < len(alternatives):
            raise ValueError(f"filter_alternative={only} outside the {len(alternatives)} alternatives of the filter")
        self.alternatives, self.only = alternatives, only
        self.fields = sorted({c.field for alt in alternatives for c in alt})
        self.rows = 0
        self.seen: dict[str, Counter] = {f: Counter() for f in self.fields}

    @property
    def alternative_text(self) -> str:
        alt = self.alternatives[self.only if self.only is not None else 0]
        return ";".join(f"{c.field}{c.op}{c.value}" for c in alt)

    def __call__(self, ds, source: str):
        missing = [f for f in self.fields if f not in ds.column_names]
        if missing:
            raise ConfigError(
                f"data.filter uses the field(s) {', '.join(missing)}, which {source} does not have; columns found: "
                f"{', '.join(ds.column_names)}"
            )
        table = ds.with_format("arrow")
        values = {f: table[f].to_pylist() for f in self.fields}
        keep = []
        for i in range(len(ds)):
            row = {f: values[f][i] for f in self.fields}
            first = next((a for a, alt in enumerate(self.alternatives) if all(c.matches(row[c.field]) for c in alt)), None)
            if first is not None and (self.only is None or first == self.only):
                keep.append(i)
        self.rows += len(ds)
        for f in self.fields:
            self.seen[f].update("" if v is None else str(v) for v in values[f])
        return ds.select(keep)

    def describe(self, max_values: int = 8) -> str:
        parts = [f"{self.rows} documents read"]
        for f, counts in self.seen.items():
            common = counts.most_common()
            shown = ", ".join(f"{v!r} ({n})" for v, n in common[:max_values])
            more = f", ... {len(common) - max_values} more" if len(common) > max_values else ""
            parts.append(f"field '{f}' holds {shown}{more}")
        return "; ".join(parts)


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
