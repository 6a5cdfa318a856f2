"""What a run prints when it starts (rank 0), and the metrics sinks it opens.

:func:`startup_report` is the block of ``[lctrain]`` lines printed before the first step: the
model, the kernel plan (:func:`kernel_plan_lines`), the parallel layout and batch, and where the
run writes (checkpoints, TensorBoard, ``metrics.jsonl`` / ``curves.png``, W&B).
:func:`open_sinks` opens the receivers that :class:`~lctrain.train.metrics.MetricsLogger` feeds
besides TensorBoard (:mod:`lctrain.train.curves`, :mod:`lctrain.train.wandb_logger`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def kernel_plan_lines(trainer: Any) -> list[str]:
    """The kernel plan part of the start-up report.

    A trainer with a ``kernel_plan`` (:class:`lctrain.kernels.plan.KernelPlan`, resolved before
    the data is built): its table, one line per op; without one, the ``model.kernels`` choice.
    """
    plan = getattr(trainer, "kernel_plan", None)
    if plan is not None:
        return plan.table().splitlines()
    kernels = trainer.cfg.model.kernels
    device = trainer.device.type
    if kernels == "auto":
        resolved = "Triton kernels where available, torch SDPA for dense attention" if device == "cuda" else "torch"
        return [f"kernels: model.kernels=auto -> {resolved} on {device}"]
    return [f"kernels: model.kernels={kernels} on {device}"]


def layout_line(trainer: Any) -> str:
    """World size, the parallel degrees and implementations, device and batch split."""
    cfg, dims, t = trainer.cfg, trainer.dims, trainer.cfg.train
    p = cfg.parallel
    parts = [f"{trainer.env.world_size} process{'es' if trainer.env.world_size > 1 else ''} on {trainer.device.type}"]
    if trainer.env.backend:
        parts[0] += f" ({trainer.env.backend})"
    parts.append(f"dp={dims.dp} ({p.dp_impl})")
    parts.append(f"cp={dims.cp}" + (f" ({p.cp_impl})" if dims.cp > 1 else ""))
    parts.append(f"ep={dims.ep}")
    accum = max(1, t.global_batch_size // (t.micro_batch_size * dims.dp))
    parts.append(f"batch {t.global_batch_size} x {cfg.data.seq_len} tokens = micro {t.micro_batch_size} x dp "
                 f"{dims.dp} x {accum} accumulation step{'s' if accum > 1 else ''}")
    return "layout: " + ", ".join(parts)


def outputs_lines(trainer: Any) -> list[str]:
    """Where the run writes."""
    t, out = trainer.cfg.train, Path(trainer.out_dir)
    lines = [f"writes: {out}/ (config.yaml, summary.json, checkpoints/"
             + (", tb/ for TensorBoard" if t.tensorboard else "")
             + (", metrics.jsonl and curves.png" if t.curves else "") + ")"]
    if t.wandb:
        lines.append(f"W&B: project {t.wandb_project}, mode {t.wandb_mode}"
                     + (" (files in wandb/; upload with `wandb sync`)" if t.wandb_mode == "offline" else ""))
    return lines


def startup_report(trainer: Any) -> str:
    """The start-up lines (each prefixed ``[lctrain]``): model, kernel plan, layout, outputs, resume point."""
    cfg = trainer.cfg
    m = cfg.model
    lines = [f"recipe {cfg.recipe or '(none)'}" + (f", scale {cfg.scale}" if cfg.scale else "")
             + f": {trainer.num_params / 1e6:.2f} M parameters, {m.n_layers} layers "
             f"({m.layer_pattern}{' + ' + m.final_layers if m.final_layers else ''}), d_model {m.d_model}, "
             f"vocab {m.vocab_size}"]
    lines += kernel_plan_lines(trainer)
    lines.append(layout_line(trainer))
    lines += outputs_lines(trainer)
    t = cfg.train
    start = trainer.state.step
    lines.append(f"training steps {start + 1}-{t.max_steps}" if start else f"training {t.max_steps} steps")
    return "\n".join(f"[lctrain] {line}" for line in lines)


def open_sinks(trainer: Any) -> list:
    """The metrics sinks of the run on rank 0: :class:`~lctrain.train.curves.RunHistory` (``train.curves``)
    and :class:`~lctrain.train.wandb_logger.WandbRun` (``train.wandb``); empty on other ranks.

    Collective when ``train.wandb`` is set (see :func:`lctrain.train.wandb_logger.open_wandb`).
    """
    from lctrain.train.curves import RunHistory
    from lctrain.train.wandb_logger import open_wandb

    cfg, t = trainer.cfg, trainer.cfg.train
    sinks: list = []
    run = open_wandb(cfg, trainer.out_dir, trainer.env.is_main)
    if run is not None:
        sinks.append(run)
    if t.curves and trainer.env.is_main:
        title = f"{cfg.recipe}{' (' + cfg.scale + ')' if cfg.scale else ''}: {t.out_dir}"
        sinks.append(RunHistory(trainer.out_dir, initial_step=trainer.state.step, title=title))
    return sinks
