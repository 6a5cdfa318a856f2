"""Memory planner: ``python launch/plan.py recipe=NAME [scale=NAME] [key=value ...] --gpu h100-80gb --gpus N [--fit]``.

The per-rank memory of one training step of lctrain's own model, traced on fake tensors with a
fake process group of N ranks; ``--fit`` searches the layout or the longest ``seq_len`` that fits
(:mod:`lctrain.planner.cli`). Same as the installed ``lctrain-plan`` script.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
os.environ.setdefault("TRITON_INTERPRET", "1")  # the CUDA plan's Triton ops are traced (fake), never launched

from lctrain.planner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
