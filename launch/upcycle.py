"""BAM / BTX upcycling: ``python launch/upcycle.py recipe=bam_hybrid_gdn_3to1 [scale=NAME] [key=value ...]``.

Trains a dense parent, one branch per domain (``upcycle.branches``: name + ``data.filter``
expression), mixes them into mixture-of-experts models (``upcycle.variants``: ``btx``, ``full``,
``shared_kv``), trains those and writes ``<train.out_dir>/bam_summary.json`` with per-domain
validation losses. ``upcycle.stage=branch|mix|train|all`` runs one step or all; every stage
resumes from its own directory. Under torchrun::

    torchrun --nproc_per_node=2 launch/upcycle.py recipe=bam_hybrid_gdn_3to1 train.out_dir=runs/bam

Exit codes: 0 done, 2 bad configuration or input (the message names the key or the missing
checkpoint), 3 non-finite loss. See :mod:`lctrain.upcycle.pipeline` for the directory layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lctrain.upcycle.pipeline import upcycle_main

if __name__ == "__main__":
    sys.exit(upcycle_main(sys.argv[1:]))
