"""Command-line entry points: ``lctrain-train`` (installed script) and ``python -m lctrain.cli``.

``lctrain-train recipe=NAME [scale=NAME] [key=value ...]`` trains like ``launch/train.py``; under
torchrun use ``torchrun --nproc_per_node=N -m lctrain.cli recipe=...`` or
``torchrun --nproc_per_node=N --no-python lctrain-train recipe=...``. Exit codes: 0 done,
2 bad configuration or input (the message names the key and what is allowed; also: the run
directory is locked by another job, or the checkpoint to resume is corrupt), 3 non-finite loss,
4 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (restart to resume), 5 a checkpoint could
not be written (the previous one is intact), 6 the launcher died (the rank exited with it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def _launch_rank() -> int:
    """This process's global rank as set by the launcher (torchrun's ``RANK``), 0 when run alone."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def run_with_exit_codes(run: Callable[[], object]) -> int:
    """Call ``run()`` and map lctrain's errors to the launchers' exit codes (tearing the process group down).

    0 done; 2 :class:`~lctrain.errors.ConfigError` (bad configuration or input, one ``error:`` line,
    no traceback; printed by rank 0 only when several ranks run); 3 ``NonFiniteLossError``;
    4 ``TrainingStopped`` (signal, checkpoint saved); 5 ``CheckpointSaveError``; 6 is the parent
    watchdog's own exit (:mod:`lctrain.train.safety`).
    Shared by ``lctrain-train`` / ``launch/train.py`` and ``launch/upcycle.py``.
    """
    from lctrain.errors import ConfigError, ErrorOnAnotherRank

    try:
        from lctrain.checkpoint import CheckpointSaveError
        from lctrain.train.safety import EXIT_CHECKPOINT_FAILED, EXIT_PREEMPTED, TrainingStopped
        from lctrain.train.trainer import NonFiniteLossError

        try:
            run()
        except NonFiniteLossError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 3
        except TrainingStopped as e:
            print(f"[lctrain] {e}", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        except CheckpointSaveError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_CHECKPOINT_FAILED
    except ConfigError as e:
        # every rank runs the same checks on the same input, and a check that runs on one rank shares
        # its outcome with the others first (lctrain.train.startup), so rank 0 alone prints the line
        if not isinstance(e, ErrorOnAnotherRank) and _launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        from lctrain.train.startup import exit_together

        exit_together(e)  # the ranks leave together, after rank 0 printed, all with code 2
        return 2
    finally:
        from lctrain.parallel.mesh import destroy

        destroy()
    return 0


def train_main(argv: list[str]) -> int:
    """Run one training job from ``recipe=... key=value`` arguments; returns the exit code."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from lctrain.config import load_config

    def run() -> None:
        from lctrain.train.trainer import train

        train(load_config(argv))

    return run_with_exit_codes(run)


def train() -> None:
    """``lctrain-train`` console script."""
    sys.exit(train_main(sys.argv[1:]))


if __name__ == "__main__":
    train()
