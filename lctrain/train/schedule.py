"""Learning-rate schedules as multipliers of the peak learning rate ``optim.lr``.

All schedules share a linear warmup: ``m(s) = (s + 1) / W`` for ``s < W`` (``W`` =
``warmup_steps``), so the very first optimizer step (``s = 0``) already has a non-zero learning
rate and step ``W - 1`` reaches the peak. After warmup:

- ``cosine`` (Loshchilov & Hutter, "SGDR", ICLR 2017, without restarts):
  ``m = r + (1 - r) * 0.5 * (1 + cos(pi * p))`` with ``p = (s - W) / (S - W)`` clamped to [0, 1],
  ``r = min_lr_ratio`` and ``S = max_steps``; ``m(W) = 1`` and ``m(S) = r``.
- ``wsd`` warmup-stable-decay (Hu et al., "MiniCPM", 2024, Sec. 4.2): ``m = 1`` until the decay
  start ``D = max(W, S - round(decay_fraction * S))``, then a linear cool-down
  ``m = 1 - (1 - r) * (s - D) / (S - D)`` reaching ``r`` at ``s = S``. MiniCPM used an
  exponential cool-down; the linear one is among the forms studied by Hägele et al. ("Scaling
  Laws and Compute-Optimal Training Beyond Fixed Training Durations", NeurIPS 2024).
- ``constant``: ``m = 1``.

Steps at or past ``max_steps`` keep the final value. ``step`` counts optimizer steps from 0, which
is ``LambdaLR``'s ``last_epoch``: the scheduler is stepped once after each optimizer step.
"""

from __future__ import annotations

import math

import torch

from lctrain.config import OptimConfig

SCHEDULES = ("cosine", "wsd", "constant")


def _check(cfg: OptimConfig, max_steps: int) -> None:
    if cfg.schedule not in SCHEDULES:
        allowed = ", ".join(SCHEDULES)
        raise ValueError(f"optim.schedule={cfg.schedule!r} is invalid; allowed values are {allowed}")
    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps} must be >= 1")
    if cfg.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps={cfg.warmup_steps} must be >= 0")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    if cfg.schedule == "wsd" and not 0.0 < cfg.decay_fraction <= 1.0:
        raise ValueError(f"optim.decay_fraction={cfg.decay_fraction} must be in (0, 1] for schedule=wsd")


def wsd_decay_start(cfg: OptimConfig, max_steps: int) -> int:
    """First step of the WSD cool-down.

    ``max(warmup_steps, max_steps - round(decay_fraction * max_steps))``.
    """
    return max(cfg.warmup_steps, max_steps - round(cfg.decay_fraction * max_steps))


def lr_lambda(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based); see the module docstring.

    Args:
        step: optimizer steps already taken (0 for the first step), >= 0.
        cfg: ``schedule``, ``warmup_steps``, ``min_lr_ratio`` and ``decay_fraction`` are read.
        max_steps: total optimizer steps of the run (``train.max_steps``), >= 1.

    Returns:
        The multiplier in ``(0, 1]`` (``min_lr_ratio`` may make it 0 at the very end).

    Raises:
        ValueError: unknown schedule, ``step < 0``, ``max_steps < 1`` or out-of-range settings.
    """
    _check(cfg, max_steps)
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    r = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
    start = wsd_decay_start(cfg, max_steps)
    if step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, max_steps - start))
    return 1.0 - (1.0 - r) * progress


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_lambda` to every parameter group.

    Call ``scheduler.step()`` once after each ``optimizer.step()``. The multiplier is a plain
    closure, so ``scheduler.state_dict()`` holds only numbers (``last_epoch``, ``base_lrs``, ...)
    and is JSON-serialisable; to resume, rebuild the scheduler from the config and call
    ``load_state_dict`` with the saved dict.

    Args:
        optimizer: its groups' current ``lr`` becomes the peak (``initial_lr`` when resuming).
        cfg: the optimiser config (see :func:`lr_lambda`).
        max_steps: total optimizer steps of the run.

    Returns:
        ``torch.optim.lr_scheduler.LambdaLR``; on construction it sets each group's lr to
        ``peak * lr_lambda(0)``.

    Raises:
        ValueError: as :func:`lr_lambda`.
    """
    _check(cfg, max_steps)

    def multiplier(step: int) -> float:
        return lr_lambda(step, cfg, max_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
