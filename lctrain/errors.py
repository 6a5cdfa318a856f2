"""Errors shared by every part of lctrain (a leaf module: it imports nothing from lctrain)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe, override or layer configuration is invalid; the message names the key and what is allowed."""


class DataError(ConfigError):
    """A data file cannot be used: a corpus, tokenizer or indexed-dataset file that is missing, empty,
    malformed, mis-encoded or too small. The message names the file and, where the reader can tell,
    the line, row or byte offset, and what was wrong."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file named by the configuration does not exist (a :class:`DataError` and a ``FileNotFoundError``)."""


class ErrorOnAnotherRank(ConfigError):
    """A start-up check failed on another rank, which reports it; this rank exits with code 2 silently.

    Raised on the ranks other than 0 by :func:`lctrain.train.startup.main_first` and
    :func:`lctrain.train.startup.agree`, so that a check that ran on one rank ends every rank
    before any collective waits for the failed one, and the message is printed once (by rank 0).
    """
