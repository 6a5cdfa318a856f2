"""Sample from a trained run: ``python launch/generate.py run=RUN_DIR prompt="..." [checkpoint=PATH] [max_new_tokens=N] [temperature=T]``.

Also ``top_k``, ``top_p``, ``num_samples``, ``seed``, ``device``, ``dtype`` (``--help``).
``temperature=0`` decodes greedily. Exit codes: 0 done, 2 bad arguments or input. See
:mod:`lctrain.eval.cli` and :mod:`lctrain.generate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lctrain.eval.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main(sys.argv[1:]))
