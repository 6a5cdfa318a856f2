"""One-way structure: model code (layers, models, kernels) never imports parallel or training code,
and the config imports no parallel code (checked on the source text, as ``grep`` would)."""

from __future__ import annotations

import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent.parent / "lctrain"


def _mentions(paths, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    hits = []
    for path in paths:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if rx.search(line):
                hits.append(f"{path.relative_to(PKG.parent)}:{i}: {line.strip()}")
    return hits


def test_model_code_never_names_parallel_or_train():
    files = [p for sub in ("layers", "models", "kernels") for p in (PKG / sub).rglob("*.py")]
    assert len(files) > 20
    assert _mentions(files, r"lctrain\.parallel|lctrain\.train") == []


def test_config_imports_no_parallel_code():
    assert _mentions([PKG / "config.py"], r"lctrain\.parallel") == []


def test_parallel_code_takes_no_maths_from_layers():
    # parallel code may name layer *types* (e.g. MoE for expert sharding) and mark a recomputed
    # forward (activation checkpointing: routing statistics count once) but takes its maths from kernels
    files = list((PKG / "parallel").rglob("*.py"))
    hits = _mentions(files, r"^\s*(from|import) lctrain\.layers")
    assert all(h.endswith(("import MoE", "import recomputing")) for h in hits), hits
