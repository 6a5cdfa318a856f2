"""Loading a trained run for evaluation or generation, and the trainer's ``train.eval_tasks`` hook.

A run directory (``train.out_dir`` of a finished or running job) holds ``config.yaml`` (the
resolved config) and ``checkpoints/step_*``. :func:`load_run` reads them through the checkpoint
reader (:mod:`lctrain.checkpoint`): it rebuilds the model from the config, verifies the newest
complete checkpoint (or a given one) against its checksums, loads its weights and
gets the tokenizer and validation data exactly as the trainer did, through
:func:`lctrain.data.build_data` with the same data cache (``data.cache_dir``, by default
``<run dir>/../.cache/data``, where the trainer put it): the cached tokenizer and token streams
are reused; if the cache is gone they are rebuilt, deterministically, from the corpus.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lctrain.checkpoint import (
    checkpoint_state,
    find_latest_checkpoint,
    load_weights,
    open_checkpoint,
    read_run_config,
)
from lctrain.data.synthetic import is_synthetic
from lctrain.errors import ConfigError
from lctrain.eval.tasks import EvalContext, get_task, parse_task_spec, resolve_params, run_tasks

log = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    """A run ready to evaluate.

    Attributes:
        run_dir: the run directory.
        cfg: its :class:`lctrain.config.RunConfig`.
        model: the :class:`HybridLM` in eval mode on ``device``.
        tokenizer: the run's tokenizer (a :class:`SyntheticTokenizer` for synthetic data).
        checkpoint: the checkpoint loaded, or None (``checkpoint="none"``: initial weights).
        step: its optimizer step (0 without a checkpoint).
        val_tokens: validation token stream (text runs) or None.
        val_dataset: the validation dataset.
        cache_dir: the data cache used.
    """

    run_dir: Path
    cfg: Any
    model: torch.nn.Module
    tokenizer: Any
    checkpoint: Path | None
    step: int
    val_tokens: Any
    val_dataset: Any
    cache_dir: Path

    def context(self) -> EvalContext:
        """An :class:`EvalContext` over this run (generation enabled)."""
        return EvalContext(model=self.model, tokenizer=self.tokenizer, cfg=self.cfg, decode_model=self.model,
                           val_tokens=self.val_tokens, val_dataset=self.val_dataset, cache_dir=self.cache_dir)


def _device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_run(run_dir: str | Path, checkpoint: str | None = None, device: str | None = None,
             dtype: str = "fp32") -> LoadedRun:
    """Rebuild a trained run's model, weights, tokenizer and validation data.

    Args:
        run_dir: directory with ``config.yaml`` (and ``checkpoints/``).
        checkpoint: a checkpoint directory; None / ``"latest"``: the newest complete one under
            ``run_dir/checkpoints``; ``"none"``: keep the initial weights (seeded by ``train.seed``).
        device: ``cpu``, ``cuda[:i]`` or None / ``auto``.
        dtype: ``fp32`` or ``bf16`` (the weights are cast).

    Raises:
        FileNotFoundError: no config, or no checkpoint where one is required.
        ConfigError: bad config or arguments.
        CheckpointCorruptError: (a ConfigError) a file of the checkpoint is missing, truncated or
            fails its checksum; the message names it.
    """
    from lctrain.data import build_data
    from lctrain.models import HybridLM

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    dev = _device(device)
    if dev.type != "cuda" and cfg.model.kernels == "triton":
        cfg.model.kernels = "auto"  # Triton kernels need CUDA (or the interpreter); the torch paths compute the same
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir.parent / ".cache" / "data"
    tokenizer, _, val_ds = build_data(cfg.data, cfg.data.seq_len, cfg.model.vocab_size, cache_dir)
    torch.manual_seed(cfg.train.seed)
    model = HybridLM(cfg.model)
    path: Path | None
    if checkpoint in (None, "", "latest"):
        path = find_latest_checkpoint(run_dir / "checkpoints")
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}; pass checkpoint=PATH "
                                    f"(or checkpoint=none for the initial weights)")
    elif checkpoint == "none":
        path = None
    else:
        path = Path(checkpoint)
    step = 0
    if path is not None:
        path = open_checkpoint(path, "checkpoint")  # sizes and checksums, as resume checks them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_weights(path, model)
        step = int(checkpoint_state(path).get("train_state", {}).get("step", 0))
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"invalid dtype={dtype!r}: allowed values are fp32, bf16")
    model = model.to(device=dev, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    return LoadedRun(run_dir, cfg, model, tokenizer, path, step, getattr(val_ds, "tokens", None), val_ds, cache_dir)


# ------------------------------------------------------------------------------------------ trainer hook
def run_training_eval(trainer, step: int) -> dict[str, float]:
    """Run ``train.eval_tasks`` on the training model at ``step`` (the trainer's evaluation hook).

    With plain data parallelism (DDP over every rank, no expert parallelism) the ranks split the
    batches and examples as ``torchrun launch/eval.py`` does (DDP's forward without gradients is
    not collective) and gather the partial results. Otherwise (FSDP, DeepSpeed, expert
    parallelism: collective forwards) every rank runs every example through the wrapped model's
    forward, so the collectives stay in step. Rank 0 writes
    ``<out_dir>/eval/step_XXXXXXXX/<task>.json`` and appends the headline figures to
    ``<out_dir>/eval/history.jsonl``. Recall tasks are scored teacher-forced (``mode=forced``).
    Under context parallelism (the model then expects sequence shards) the tasks are skipped with
    a warning. Returns ``{"<task>/<key>": value}`` of the headline figures (for the MetricsLogger).

    Raises:
        ConfigError: an unknown task or parameter in ``train.eval_tasks``, or ``mode=generate``.
    """
    cfg = trainer.cfg
    specs = [parse_task_spec(s) for s in cfg.train.eval_tasks]
    for name, given in specs:
        params = resolve_params(get_task(name), given)
        if params.get("mode", "forced") != "forced":
            raise ConfigError(f"train.eval_tasks: {name} runs with mode=forced during training (generation needs the "
                              f"unwrapped model); use launch/eval.py for mode=generate")
    if trainer.dims.cp > 1:
        if not getattr(trainer, "_eval_tasks_cp_warned", False):
            warnings.warn("train.eval_tasks are skipped under context parallelism (parallel.cp_degree > 1): the "
                          "model takes sequence shards there; evaluate the checkpoints with launch/eval.py", stacklevel=2)
            trainer._eval_tasks_cp_warned = True
        return {}
    synthetic = is_synthetic(cfg.data.path)
    split = (trainer.env.world_size > 1 and trainer.dims.dp == trainer.env.world_size and trainer.ep is None
             and cfg.parallel.dp_impl == "ddp")
    ctx = EvalContext(model=trainer.model, rank=trainer.env.rank if split else 0,
                      world=trainer.env.world_size if split else 1, tokenizer=trainer.tokenizer, cfg=cfg, decode_model=None,
                      val_tokens=None if synthetic else getattr(trainer.val_set, "tokens", None),
                      val_dataset=trainer.val_set,
                      cache_dir=Path(cfg.data.cache_dir) if cfg.data.cache_dir else trainer.out_dir.parent / ".cache" / "data")
    was_training = trainer.model.training
    trainer.model.eval()
    amp = (torch.autocast(trainer.device.type, dtype=trainer.autocast_dtype) if trainer.autocast_dtype is not None
           else torch.autocast(trainer.device.type, enabled=False))
    try:
        with torch.no_grad(), amp:
            done = run_tasks(ctx, specs, out_dir=None, plots=False)
    finally:
        trainer.model.train(was_training)
    metrics: dict[str, float] = {}
    for r in done:
        for key in get_task(r.name).headline:
            if isinstance(r.result.get(key), (int, float)):
                metrics[f"{r.name}/{key}"] = float(r.result[key])
    if trainer.env.is_main:
        out = trainer.out_dir / "eval" / f"step_{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        for r in done:
            meta = {"step": step, "eval_ranks": ctx.world}  # ranks that split the examples
            (out / f"{r.name}.json").write_text(json.dumps({**r.result, "meta": meta}, indent=1, default=str))
        with open(trainer.out_dir / "eval" / "history.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
    return metrics
