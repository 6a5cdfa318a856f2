"""Evaluate a trained run: ``python launch/eval.py run=RUN_DIR task=NAME[,NAME...] [checkpoint=PATH] [out=DIR] [key=value ...]``.

Tasks: perplexity, mqar, passkey, niah (``--help`` lists their parameters). Writes
``<task>.json`` and ``<task>.png`` to ``out`` (default ``RUN_DIR/eval``). Single process.
Exit codes: 0 done, 2 bad arguments or input. See :mod:`lctrain.eval.cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lctrain.eval.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main(sys.argv[1:]))
