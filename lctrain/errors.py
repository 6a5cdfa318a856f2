"""Errors shared by every part of lctrain (a leaf module: it imports nothing from lctrain)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe, override or layer configuration is invalid; the message names the key and what is allowed."""
