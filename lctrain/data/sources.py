"""Data sources: the one table of ``data.path`` schemes.

Every reader of ``data.path`` goes through :data:`SOURCES`: :func:`lctrain.data.build_data`
(building), :func:`resolve_path` (:func:`lctrain.data.corpus.load_documents`, the prepared-data
cache) and :func:`check_data_path` (:func:`lctrain.config.validate`). A path belongs to the first
entry whose prefix it starts with; the last entry (no prefix) takes built-in corpus names and
local files and directories.

=============  ================================  ==============================================
scheme         form                              read by
=============  ================================  ==============================================
``synthetic``  ``synthetic:mqar?key=value&...``  :mod:`lctrain.data.synthetic` (generated examples)
``megatron``   ``megatron:PREFIX[,...]``         :mod:`lctrain.data.megatron` (``.bin``/``.idx``)
``hf``         ``hf:<owner/name>[:<config>]``    :mod:`lctrain.data.corpus` (hub dataset documents)
``files``      ``pd_english``, a file, a dir     :mod:`lctrain.data.corpus` (documents)
=============  ================================  ==============================================

Document sources (``build`` is None) go through the corpus pipeline: documents -> ``data.filter``
-> split -> tokenizer -> packed windows. The others build their tokenizer and datasets themselves.
Adding a source is one :class:`DataSource` entry in :data:`SOURCES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lctrain.data.corpus import BUILTIN_CORPORA, FILE_KINDS, HUB_PREFIX, resolve_local
from lctrain.data.megatron import build_megatron_data, parse_megatron_path
from lctrain.data.synthetic import build_synthetic_data, parse_synthetic
from lctrain.errors import ConfigError, DataError, DataFileNotFoundError

__all__ = ["SOURCES", "DataSource", "allowed_forms", "check_data_path", "resolve_path", "source_for"]


@dataclass(frozen=True)
class DataSource:
    """One ``data.path`` scheme.

    Attributes:
        name: the scheme's name (``synthetic``, ``megatron``, ``hf``, ``files``).
        prefix: the text a path of this scheme starts with; empty for the last entry (built-in
            names, local files and directories), which takes every other path.
        form: the accepted form, as error messages name it.
        resolve: ``path -> Path | str``: checks the path without reading the data (raises a
            ConfigError, DataError or FileNotFoundError naming the problem); a local source
            returns its :class:`Path`, the others the path itself.
        build: ``(data_cfg, seq_len, vocab_size, cache_dir, rank) -> (tokenizer, train, val)``, or
            None for a document source read by :func:`lctrain.data.corpus.load_documents`.
    """

    name: str
    prefix: str
    form: str
    resolve: Callable[[str], Path | str]
    build: Callable[[Any, int, int, Any, int], tuple] | None = None

    @property
    def documents(self) -> bool:
        """Whether the corpus pipeline reads it (documents, ``data.filter``, tokenizer training, packing)."""
        return self.build is None


def _check_synthetic(path: str) -> str:
    parse_synthetic(path)  # ConfigError naming the bad key
    return path


def _build_synthetic(data_cfg: Any, seq_len: int, vocab_size: int, cache_dir: Any, rank: int) -> tuple:
    return build_synthetic_data(data_cfg.path, seq_len, vocab_size, seed=getattr(data_cfg, "seed", 0))


def _check_megatron(path: str) -> str:
    parse_megatron_path(path)  # ConfigError naming the missing .idx / .bin
    return path


def _build_megatron(data_cfg: Any, seq_len: int, vocab_size: int, cache_dir: Any, rank: int) -> tuple:
    return build_megatron_data(data_cfg, seq_len, vocab_size, rank=rank)


def _check_hub(path: str) -> str:
    return path  # read (and checked) by the datasets library when loaded: it needs the network


def _resolve_files(path: str) -> Path:
    try:
        return resolve_local(path)
    except DataFileNotFoundError as e:
        raise DataFileNotFoundError(f"{e}; data.path must be {allowed_forms()}") from None
    except DataError as e:
        raise DataError(f"{e}; data.path must be {allowed_forms()}") from None


SOURCES: tuple[DataSource, ...] = (
    DataSource("synthetic", "synthetic:", "synthetic:mqar?key=value&...", _check_synthetic, _build_synthetic),
    DataSource("megatron", "megatron:", "megatron:PREFIX[,PREFIX...] (Megatron .bin/.idx)", _check_megatron,
               _build_megatron),
    DataSource("hf", HUB_PREFIX, f"{HUB_PREFIX}<owner/name>[:<config>]", _check_hub),
    DataSource("files", "", f"a built-in corpus name ({', '.join(BUILTIN_CORPORA)}), a local file "
               f"({', '.join(FILE_KINDS)}) or a directory of such files", _resolve_files),
)


def source_for(path: str) -> DataSource:
    """The :data:`SOURCES` entry that reads ``path`` (the first whose prefix it starts with)."""
    path = str(path)
    return next(s for s in SOURCES if path.startswith(s.prefix))


def allowed_forms() -> str:
    """Every accepted ``data.path`` form, for messages (local files first, then the schemes in table order)."""
    *first, last = (s.form for s in sorted(SOURCES, key=lambda s: s.prefix != ""))
    return f"{', '.join(first)} or {last}"


def resolve_path(path: str) -> Path | str:
    """Check ``path`` with its source: a local corpus as a :class:`Path` (built-in names included), else ``path``.

    Raises:
        DataFileNotFoundError: a local path that does not exist (the message lists the allowed forms).
        DataError: a local file whose extension no reader takes.
        ConfigError: a malformed ``synthetic:`` or ``megatron:`` path (the key or file named).
    """
    return source_for(path).resolve(str(path))


def check_data_path(path: str) -> None:
    """``data.path`` as :func:`lctrain.config.validate` checks it: any problem as a :class:`ConfigError`."""
    try:
        resolve_path(path)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
