"""Import a Hugging Face Qwen3-Next model: ``python launch/import_hf.py path=HF_DIR out=RUN_DIR [key=value ...]``.

Writes ``RUN_DIR/checkpoints/step_00000000`` (the weights at step 0 with a fresh optimizer),
``RUN_DIR/config.yaml`` and ``RUN_DIR/recipe.yaml``; ``python launch/train.py
recipe=RUN_DIR/recipe.yaml`` continues training from it and ``launch/eval.py run=RUN_DIR``
evaluates it. ``recipe=NAME`` (default ``qwen3_next``) and ``key=value`` overrides give the
non-model sections (``data.path=...``, ``train.max_steps=...``). Exit code 2 with one ``error:``
line for an input lctrain cannot express. See :mod:`lctrain.export.cli` and ``docs/export.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lctrain.export.cli import import_main

if __name__ == "__main__":
    sys.exit(import_main(sys.argv[1:]))
