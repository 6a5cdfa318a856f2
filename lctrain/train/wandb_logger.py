"""Weights & Biases logging of a run (``train.wandb=true``; the optional extra ``pip install -e ".[wandb]"``).

Rank 0 opens one W&B run with the resolved config and receives, through
:class:`~lctrain.train.metrics.MetricsLogger`, every scalar written to TensorBoard under the same
tag (``train/loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``, ``val/loss``, ``val/ppl``,
``moe/...``, ``<task>/...``) plus ``step`` (optimizer steps, the x-axis of every chart) and
``tokens`` (tokens trained). Routing loads per expert become W&B histograms with one bin per
expert.

The run id is kept in ``train.out_dir/wandb_run_id``: a run resumed from its checkpoints
(``train.resume=auto`` or a path) continues the same W&B run (``resume="allow"``); ``train.resume=none``
starts a new one. Charts use ``step`` rather than W&B's own step counter, so steps trained again
after a resume from an earlier checkpoint are kept rather than dropped as out of order.

``train.wandb_mode``: ``online`` (needs ``wandb login`` or ``WANDB_API_KEY``), ``offline`` (the run
is written under ``train.out_dir/wandb/offline-run-*``; ``wandb sync`` uploads it later; ``wandb
leet`` shows it in a terminal), ``disabled`` (every call is a no-op; for dry runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lctrain.config import check_wandb_installed
from lctrain.errors import ConfigError

RUN_ID_FILE = "wandb_run_id"


def run_id_for(out_dir: str | os.PathLike, resume: bool) -> tuple[str | None, bool]:
    """The W&B run id to use for ``out_dir``: ``(id, resuming)``.

    The stored id (``out_dir/wandb_run_id``) when ``resume`` and the file exists, else ``(None,
    False)`` (a new run; :class:`WandbRun` stores its id).
    """
    path = Path(out_dir) / RUN_ID_FILE
    if resume and path.is_file():
        run_id = path.read_text().strip()
        if run_id:
            return run_id, True
    return None, False


class WandbRun:
    """One W&B run fed by :class:`~lctrain.train.metrics.MetricsLogger` (a metrics sink; rank 0 only).

    Args:
        out_dir: run directory: W&B's files go to ``out_dir/wandb``, its run id to ``out_dir/wandb_run_id``.
        config: the resolved config as a nested dict (:func:`lctrain.config.to_dict`).
        project: ``train.wandb_project``.
        name: display name (``train.wandb_name``; empty: the name of ``out_dir``).
        mode: ``online`` | ``offline`` | ``disabled``.
        resume: continue the run whose id is stored in ``out_dir`` (when there is one).

    Raises:
        ConfigError: wandb is missing, or ``wandb.init`` refused (e.g. ``online`` without credentials);
            the message says what to do.
    """

    def __init__(self, out_dir: str | os.PathLike, config: dict, project: str, name: str = "",
                 mode: str = "online", resume: bool = True) -> None:
        check_wandb_installed()
        import wandb

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run_id, resuming = run_id_for(self.out_dir, resume)
        try:
            self.run = wandb.init(
                project=project, name=name or self.out_dir.resolve().name, dir=str(self.out_dir), mode=mode,
                id=run_id, resume="allow" if resuming else None,
            )
        except Exception as e:  # wandb raises its own UsageError / CommError / AuthenticationError
            raise ConfigError(
                f"train.wandb=true: wandb.init failed ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
                f"run `wandb login` or set WANDB_API_KEY, or use train.wandb_mode=offline (then `wandb sync`) "
                f"or train.wandb=false"
            ) from e
        self.resumed = resuming
        # every chart against optimizer steps (also after a resume from an earlier checkpoint)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run.config.update(config, allow_val_change=True)
        if mode != "disabled":
            (self.out_dir / RUN_ID_FILE).write_text(self.run.id + "\n")

    @property
    def id(self) -> str:
        """The W&B run id (the same across resumes)."""
        return self.run.id

    def log_scalars(self, step: int, tokens: int, values: dict[str, float], kind: str = "train") -> None:
        """Log ``values`` (TensorBoard tag -> number) at optimizer step ``step`` after ``tokens`` tokens.

        ``kind`` (``train`` or ``val``) is implied by the tags and not logged.
        """
        if values:
            self.run.log({**values, "step": step, "tokens": tokens})

    def log_histogram(self, tag: str, values: Any, step: int, tokens: int) -> None:
        """Per-expert counts ``values`` as a histogram with one bin per expert (bin ``i`` = expert ``i``)."""
        import numpy as np
        import wandb

        counts = np.asarray(values, dtype=np.float64).reshape(-1)
        hist = wandb.Histogram(np_histogram=(counts, np.arange(counts.size + 1, dtype=np.float64)))
        self.run.log({tag: hist, "step": step, "tokens": tokens})

    def checkpoint(self, step: int) -> None:
        """Nothing to do at a checkpoint (W&B streams as it goes)."""

    def close(self) -> None:
        """Finish the W&B run (idempotent)."""
        if self.run is not None:
            self.run.finish()
            self.run = None


def open_wandb(cfg: Any, out_dir: str | os.PathLike, is_main: bool) -> WandbRun | None:
    """The run's :class:`WandbRun` on rank 0 when ``train.wandb`` is set; None otherwise.

    Collective when a process group exists (through :func:`lctrain.train.startup.agree`): a
    failure on rank 0 ends every rank with exit code 2, rank 0 printing the message.

    Args:
        cfg: a validated :class:`~lctrain.config.RunConfig`.
        out_dir: ``train.out_dir``.
        is_main: whether this process is rank 0 (the only one that logs).
    """
    t = cfg.train
    if not t.wandb:
        return None
    from lctrain.config import to_dict
    from lctrain.train.startup import agree

    run, error = None, None
    if is_main:
        try:
            run = WandbRun(out_dir, to_dict(cfg), t.wandb_project, t.wandb_name, t.wandb_mode,
                           resume=t.resume != "none")
        except ConfigError as e:
            error = e
    agree(error)
    return run
