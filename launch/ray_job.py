"""Train a recipe on a Ray cluster: ``python launch/ray_job.py recipe=NAME [key=value ...] --num-workers N
--gpus-per-worker G [--address ADDR] [--storage-path PATH] [--max-failures K]``.

Ray Train's TorchTrainer runs one worker per GPU (``--gpus-per-worker 0``: CPU workers with gloo);
after a lost worker or node Ray restarts the workers (up to ``--max-failures`` times) and they
continue from the latest lctrain checkpoint in ``train.out_dir``, which must be on shared storage.
Submit to a running cluster with ``ray job submit --address http://HEAD:8265 -- python
launch/ray_job.py ...`` (see docs/cluster.md). Needs ``pip install -e ".[ray]"``.
Exit codes: 0 done, 1 job failed after the allowed restarts, 2 bad configuration, 3 non-finite
loss, 4 Ray not installed. The logic lives in :mod:`lctrain.cluster.ray`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lctrain.cluster.ray import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
