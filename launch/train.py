"""Train a recipe: ``torchrun --nproc_per_node=N launch/train.py recipe=NAME [scale=NAME] [key=value ...]``.

Also runs as a single process (``python launch/train.py recipe=...``). Exit codes: 0 done,
2 bad configuration (the message names the key and the allowed values), 3 non-finite loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lctrain.config import ConfigError, load_config


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = load_config(argv)
        from lctrain.train.trainer import NonFiniteLossError, train

        try:
            train(cfg)
        except NonFiniteLossError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 3
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        from lctrain.parallel.mesh import destroy

        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
