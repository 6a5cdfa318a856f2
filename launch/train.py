"""Train a recipe: ``torchrun --nproc_per_node=N launch/train.py recipe=NAME [scale=NAME] [key=value ...]``.

Also runs as a single process (``python launch/train.py recipe=...``), and is the same as the
installed ``lctrain-train`` script (:mod:`lctrain.cli`). Exit codes: 0 done, 2 bad
configuration or input (the message names the key and the allowed values), 3 non-finite loss,
4 stopped by SIGTERM/SIGUSR1 after saving a checkpoint, 5 a checkpoint could not be written,
6 the launcher died.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lctrain.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
