"""The training loop: data -> model -> loss -> AdamW, with data parallelism, checkpoints, metrics.

Loss normalisation. Each optimizer step consumes ``train.global_batch_size`` sequences split
over ``dp`` ranks and ``global_batch_size / (micro_batch_size * dp)`` accumulation micro-steps.
The step's loss is the mean next-token cross entropy over every labelled token of the global
batch: each micro-batch contributes ``sum(CE) / global_tokens``, with ``global_tokens`` counted
over all ranks before the forward passes. DDP/FSDP average gradients over ``dp``, so each rank's
loss is multiplied by ``dp``. The result is the same optimisation at any world size, which the
distributed tests check against a single process.

Context parallelism (``cp > 1``): the ``cp`` ranks of a dp group read the same micro-batches and
each keeps its zigzag shard (:func:`lctrain.parallel.context.shard_batch`); the loss sums CE over
local tokens only. Parameters are replicated over cp as well, so DDP/FSDP average over the
flattened ``dp x cp`` ranks and the loss is multiplied by ``dp * cp``; ``global_tokens`` counts
each micro-batch once (the per-rank full-batch counts are divided by ``cp``).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lctrain.checkpoint import (
    checkpoint_state,
    find_latest_checkpoint,
    find_resumable_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from lctrain.config import (
    ConfigError,
    RunConfig,
    check_mixers_context_parallel,
    check_mixers_kernel_limits,
    to_dict,
    to_yaml,
)
from lctrain.data import IGNORE_INDEX, build_data, collate_packed, data_fingerprint, next_micro_batches
from lctrain.data.sampler import DistributedBatchSampler
from lctrain.data.tokenizer import check_vocab
from lctrain.errors import DataError
from lctrain.layers.routing import routed_layers, set_aux_loss_scale
from lctrain.kernels.plan import KernelPlan, apply_kernel_plan, resolve_kernel_plan
from lctrain.kernels.varlen import host_bounds, with_host_bounds
from lctrain.models import HybridLM
from lctrain.parallel import parallelize
from lctrain.parallel.context import shard_batch
from lctrain.parallel.mesh import DistEnv, barrier, init_distributed, resolve_dims
from lctrain.train.console import open_sinks, startup_report
from lctrain.train.host_memory import peak_rss_mib, release_free_heap, set_malloc_mmap_threshold
from lctrain.train.metrics import (
    MetricsLogger,
    RoutingHistory,
    attention_sparsity_step,
    mfu,
    routing_step,
    write_summary,
)
from lctrain.train.optim import build_optimizer
from lctrain.train.safety import (
    RunLock,
    StopSignals,
    TrainingStopped,
    launched_by_torchrun,
    start_parent_watchdog,
)
from lctrain.train.schedule import build_scheduler
from lctrain.train.startup import main_first, on_main


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/Inf (``train.nan_policy=stop``)."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """What the loop carries between steps and through checkpoints."""

    step: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    val_history: list[list[float]] = field(default_factory=list)  # [step, val_loss]
    skipped_steps: list[int] = field(default_factory=list)


def build_kernel_plan(cfg: RunConfig, device: torch.device) -> KernelPlan:
    """The run's kernel plan: ``model.kernels`` for ``model.kernel_plan_device`` (``auto``: ``device``).

    On a CUDA target, a plan that takes a dense block or a per-document loop (only with
    ``model.kernels=torch``) is announced with a warning naming the ops.

    Raises:
        ConfigError: the plan cannot be built (e.g. ``auto`` on CUDA without triton).
    """
    m = cfg.model
    target = device.type if m.kernel_plan_device == "auto" else m.kernel_plan_device
    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and target == "cuda")
    try:
        plan = resolve_kernel_plan(m.kernels, target, expert_impl=m.moe.expert_impl,
                                   loss_chunk_size=m.loss_chunk_size,
                                   compute_dtype=torch.bfloat16 if use_bf16 else torch.float32)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"model.kernels={m.kernels}: {e}") from None
    slow = plan.slow_paths()
    if target == "cuda" and slow:
        warnings.warn(
            f"model.kernels={m.kernels} on CUDA takes reference paths for {', '.join(f'{k} ({v})' for k, v in slow.items())}: "
            "dense [Tq, Tk] blocks or per-document loops; use model.kernels=auto for the fused kernels",
            stacklevel=2,
        )
    return plan


def _all_reduce_sum(values: list, device: torch.device) -> list[float]:
    """Sum each value (float or 0-d tensor) over every rank; one host read for all of them."""
    t = torch.stack([torch.as_tensor(v, device=device).to(torch.float64) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class Trainer:
    """Runs one recipe: builds mesh, data, model and optimizer, then trains and checkpoints.

    Construction is a sequence of build steps (:meth:`_build_parallel_layout`,
    :meth:`_build_data`, :meth:`_build_model`, :meth:`_build_optimizer`), then resume.

    Args:
        cfg: a validated :class:`~lctrain.config.RunConfig`.

    Run safety (:mod:`lctrain.train.safety`): rank 0 locks ``train.out_dir`` first; under torchrun a
    watchdog ends the rank when its launcher dies; SIGTERM / SIGUSR1 stop training after a step
    with a checkpoint. :meth:`fit` (or :meth:`close`) releases the lock.

    Raises:
        ConfigError: the mesh does not match the world size, or the layout is impossible; another
            job holds ``train.out_dir`` (:class:`~lctrain.train.safety.LockHeldError`); the checkpoint
            to resume fails verification (:class:`~lctrain.checkpoint.CheckpointCorruptError`)
            or was trained on other data; :class:`~lctrain.errors.DataError` (a ConfigError): a
            data file cannot be used, or the corpus is smaller than one global batch. A check that
            runs on rank 0 only reaches every rank (:mod:`lctrain.train.startup`).
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        set_malloc_mmap_threshold(cfg.train.malloc_mmap_threshold_mib)
        self.lock: RunLock | None = None
        self.stop_signals: StopSignals | None = None
        self.saved_step = -1  # step of the last checkpoint this trainer wrote
        self._build_parallel_layout()
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self._take_run_directory()
        try:
            seed_everything(cfg.train.seed)
            self._build_data()
            seed_everything(cfg.train.seed)  # model init independent of how much randomness data prep used
            self._build_model()
            self._build_optimizer()
            self.state = TrainState()
            self.routing = RoutingHistory()
            self.routing_last: dict | None = None
            self.sparsity_last: dict | None = None
            self.sparsity_history: list[float] = []
            use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and self.device.type == "cuda")
            self.autocast_dtype = torch.bfloat16 if use_bf16 else None
            self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
            self._maybe_resume()
        except BaseException:
            self.close()  # a job that fails to start leaves the directory to the next
            raise

    # ------------------------------------------------------------------ run safety
    def _take_run_directory(self) -> None:
        """Rank 0 locks ``train.out_dir`` (every rank raises if it cannot); watchdog and signal handlers.

        See :mod:`lctrain.train.safety`. Runs before anything is written to the directory.
        """
        t = self.cfg.train

        def lock() -> None:
            self.lock = RunLock(self.out_dir)

        on_main(lock)  # every rank raises if rank 0 cannot lock; rank 0 prints the message
        if t.exit_with_parent and launched_by_torchrun():
            start_parent_watchdog(before_exit=self._release_lock)
        if t.save_on_signal:
            self.stop_signals = StopSignals()

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def close(self) -> None:
        """Release the run directory's lock and restore the signal handlers (idempotent; main thread)."""
        self._release_lock()
        if self.stop_signals is not None:
            self.stop_signals.restore()
            self.stop_signals = None

    def _stop_requested(self) -> int | None:
        """The signal any rank received since the last check (all ranks agree; one all-reduce), or None."""
        if self.stop_signals is None:
            return None
        mine = self.stop_signals.requested or 0
        if dist.is_initialized():
            t = torch.tensor([mine], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            mine = int(t.item())
        return mine or None

    # ------------------------------------------------------------------ build steps
    def _build_parallel_layout(self) -> None:
        """Process group, degrees (checked against the world size and the model) and meshes."""
        cfg, t, p = self.cfg, self.cfg.train, self.cfg.parallel
        self.env: DistEnv = init_distributed(p)
        self.dims = resolve_dims(p, self.env.world_size)
        if self.dims.cp > 1:  # also checked by config.validate; repeated for configs built in code
            check_mixers_context_parallel(cfg.model, self.dims.cp, p.cp_impl, p.ulysses_degree, cfg.data.seq_len)
        if self.dims.ep > 1 and p.dp_impl != "ddp":
            raise ConfigError(
                f"parallel.ep_degree={self.dims.ep} needs parallel.dp_impl=ddp (expert weights are excluded from "
                f"DDP and reduced over their expert-data-parallel group); FSDP with EP is not supported yet"
            )
        dp = self.dims.dp
        if t.global_batch_size % (t.micro_batch_size * dp) != 0:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} must be a multiple of train.micro_batch_size="
                f"{t.micro_batch_size} x data-parallel degree {dp} = {t.micro_batch_size * dp}"
            )
        self.meshes = self.dims.build_meshes(self.env)
        self.dp_rank = self.meshes.dp_rank()
        self.device = self.env.device
        # the kernel plan, resolved once for the target device; limits only a GPU kernel has are
        # checked here, from the config, before any data or model is built
        self.kernel_plan = build_kernel_plan(cfg, self.device)
        check_mixers_kernel_limits(cfg.model, self.kernel_plan.choice)  # the plan is printed by the start-up report

    def _build_data(self) -> None:
        """Tokenizer and packed datasets; rank 0 builds the caches first, the others then read them.

        A data error on rank 0 (or later on any rank) reaches every rank through
        :func:`~lctrain.train.startup.main_first`: all end with exit code 2, rank 0 prints the message.
        """
        cfg = self.cfg
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else self.out_dir.parent / ".cache" / "data"

        def build() -> tuple:
            data = build_data(cfg.data, cfg.data.seq_len, cfg.model.vocab_size, cache_dir, rank=self.env.rank)
            gbs, windows = cfg.train.global_batch_size, len(data[1])
            if windows < gbs:
                raise DataError(
                    f"the training split of data.path='{cfg.data.path}' has {windows} windows of data.seq_len="
                    f"{cfg.data.seq_len}, fewer than one global batch (train.global_batch_size={gbs}); use a larger "
                    f"corpus, a smaller data.seq_len, or a smaller train.global_batch_size"
                )
            return data

        self.tokenizer, self.train_set, self.val_set = main_first(build)
        check_vocab(self.tokenizer, cfg.model.vocab_size)
        self.data_fingerprint = data_fingerprint(cfg.data, self.tokenizer, self.train_set)

    def _build_model(self) -> None:
        """The single-device model, then :func:`lctrain.parallel.parallelize` from outside."""
        model = HybridLM(self.cfg.model).to(self.device)
        apply_kernel_plan(model, self.kernel_plan)  # every sequence op follows the plan from here on
        self.num_params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = model.flops_per_token(self.cfg.data.seq_len)
        self.has_routing = bool(routed_layers(model))
        self.has_sparse_attention = any(hasattr(m, "attended_stats") for m in model.modules())
        self.head_routed = [m for m in model.modules() if callable(getattr(m, "active_head_fraction", None))]
        par = parallelize(model, self.dims, self.meshes, self.cfg, self.env)
        self.model, self.dp, self.cp, self.ep = par.model, par.dp, par.cp, par.ep

    def _build_optimizer(self) -> None:
        """AdamW, the LR schedule and the data-parallel batch sampler."""
        t = self.cfg.train
        self.optimizer = build_optimizer(self.model, self.cfg.optim, self.device.type)
        self.model = self.dp.attach_optimizer(self.optimizer)  # DeepSpeed: its engine; DDP/FSDP: unchanged
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, t.max_steps)
        self.sampler = DistributedBatchSampler(
            len(self.train_set), t.global_batch_size, t.micro_batch_size, self.dp_rank, self.dims.dp, seed=t.seed
        )

    # ------------------------------------------------------------------ checkpoints
    def _maybe_resume(self) -> None:
        """``train.resume``: ``auto`` takes the newest checkpoint that verifies (skipping corrupt ones),
        a path must verify; then the data fingerprints must match before anything is loaded."""
        t = self.cfg.train
        if t.resume == "none":
            return
        if t.resume == "auto":
            path = find_resumable_checkpoint(self.ckpt_root, checksum=t.checkpoint_checksum)
        else:
            path = Path(t.resume)
            if not path.exists():
                raise ConfigError(f"train.resume={t.resume}: no such checkpoint directory")
            verify_checkpoint(path, checksum=t.checkpoint_checksum)  # CheckpointCorruptError names the file
        if path is None:
            return
        self._check_data_identity(path, checkpoint_state(path).get("data"))
        extra = load_checkpoint(path, self.model, self.optimizer, dp=self.dp)
        self.scheduler.load_state_dict(extra["scheduler"])
        saved_sampler = extra["sampler"]
        if t.allow_data_change and int(saved_sampler.get("num_samples", self.sampler.num_samples)) != (
                self.sampler.num_samples):  # another dataset size: a new epoch of the new data
            saved_sampler = {**saved_sampler, "epoch": int(saved_sampler["epoch"]) + 1, "position": 0,
                             "num_samples": self.sampler.num_samples}
        self.sampler.load_state_dict(saved_sampler)
        s = extra["train_state"]
        self.state = TrainState(
            step=s["step"], tokens=s["tokens"], losses=list(s["losses"]),
            val_history=[list(x) for x in s["val_history"]], skipped_steps=list(s.get("skipped_steps", [])),
        )
        if "routing" in extra:
            self.routing.load_state_dict(extra["routing"])
        if self.env.is_main:
            print(f"[lctrain] resumed from {path} at step {self.state.step}", flush=True)

    def _check_data_identity(self, path: Path, saved: dict | None) -> None:
        """Refuse to resume on other data: the sampler position would point at other windows.

        Raises:
            ConfigError: the tokenizer, packing parameters or training windows differ from the
                checkpoint's (:func:`lctrain.data.data_fingerprint`) and ``train.allow_data_change``
                is false. Checkpoints written before fingerprints existed are not checked.
        """
        if saved is None:
            return
        now = self.data_fingerprint
        diffs = []
        if saved.get("tokenizer") != now["tokenizer"]:
            diffs.append(f"the tokenizer (data.tokenizer; fingerprint {saved.get('tokenizer')} -> {now['tokenizer']})")
        for key, value in now["packing"].items():
            if saved.get("packing", {}).get(key) != value:
                diffs.append(f"data.{key} ({saved.get('packing', {}).get(key)!r} -> {value!r})")
        if not diffs and (saved.get("num_windows"), saved.get("windows")) != (now["num_windows"], now["windows"]):
            diffs.append(f"the corpus (data.path: {saved.get('num_windows')} -> {now['num_windows']} training windows, "
                         f"content hash {saved.get('windows')} -> {now['windows']})")
        if not diffs:
            return
        what = "; ".join(diffs)
        if self.cfg.train.allow_data_change:
            if self.env.is_main:
                warnings.warn(f"resuming {path} on other data ({what}) because train.allow_data_change=true",
                              stacklevel=2)
            return
        raise ConfigError(
            f"checkpoint {path} was trained on other data: {what} changed since. Its data-sampler position "
            f"would point at other windows. Resume with the original data, start a new train.out_dir, or pass "
            f"train.allow_data_change=true to continue on the new data (a new epoch when its size differs)"
        )

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomic; keeps the last ``train.keep_last``)."""
        extra = {
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "train_state": {
                "step": self.state.step, "tokens": self.state.tokens, "losses": self.state.losses,
                "val_history": self.state.val_history, "skipped_steps": self.state.skipped_steps,
            },
            "routing": self.routing.state_dict(),
            "config": to_dict(self.cfg),
            "world_size": self.env.world_size,
            "data": self.data_fingerprint,
        }
        path = save_checkpoint(
            self.ckpt_root, self.state.step, self.model, self.optimizer, extra, self.cfg.train.keep_last, dp=self.dp,
            checksum=self.cfg.train.checkpoint_checksum,
        )
        self.saved_step = self.state.step
        return path

    # ------------------------------------------------------------------ compute
    def _to_device(self, batch: dict) -> dict:
        out = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        cu = batch.get("cu_seqlens")
        if cu is not None:  # the boundaries' host copy (made at collation) travels with them: no device read
            host_bounds(cu)
            out["cu_seqlens"] = with_host_bounds(cu, self.device, non_blocking=True)
        return out

    def forward_loss_sum(self, batch: dict) -> torch.Tensor:
        """Summed next-token cross entropy (fp32 scalar) over the labelled tokens of one packed micro-batch."""
        ctx = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else torch.autocast(self.device.type, enabled=False)
        )
        if self.cp is not None:  # this rank's zigzag shard; cu_seqlens stay global
            batch = shard_batch(batch, self.cp.degree, self.cp.rank)
        with ctx:  # the model returns the summed loss (chunked with model.loss_chunk_size > 0)
            return self.model(batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                              labels=batch["labels"], ignore_index=IGNORE_INDEX)

    def next_micro_batches(self) -> list[dict]:
        """This rank's packed micro-batches for the next optimizer step (advances the sampler)."""
        return [self._to_device(b) for b in next_micro_batches(self.train_set, self.sampler)]

    def forward_backward(self, micro: list[dict]) -> float:
        """Accumulate gradients of the global-batch mean loss over ``micro``; returns that mean loss.

        Each micro-batch's summed loss goes through ``dp.scale_loss`` (times the averaging degree,
        over ``global_tokens``) so that the gradient average of the data-parallel backend equals the
        gradient of the mean over all labelled tokens of the global batch, whatever the world size.
        """
        local_tokens = float(sum(int(b["num_tokens"]) for b in micro)) / self.dims.cp  # cp ranks share a batch
        (global_tokens,) = _all_reduce_sum([local_tokens], self.device)
        global_tokens = max(global_tokens, 1.0)
        self.model.train()
        # aux/z losses: mean over all micro-batches of the global batch; DDP averages over dp ranks
        set_aux_loss_scale(self.model, 1.0 / len(micro))
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)  # read once per step, not per micro-batch
        for i, batch in enumerate(micro):
            with self.dp.no_sync(enabled=i < len(micro) - 1):
                ls = self.forward_loss_sum(batch)
                if self.cfg.train.malloc_trim and self.device.type == "cpu":
                    release_free_heap()  # the step's peak comes next: the forward's freed heap pages go first
                self.dp.backward(self.dp.scale_loss(ls, global_tokens))
            loss_sum += ls.detach().float()
        self.dp.finish_backward()
        (total,) = _all_reduce_sum([loss_sum], self.device)
        return total / global_tokens

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over a global batch; returns ``(loss, grad_norm)`` (global means).

        A non-finite loss leaves parameters, optimizer and scheduler untouched and returns NaN
        as the gradient norm; the caller stops or skips per ``train.nan_policy``.
        """
        loss = self.forward_backward(self.next_micro_batches())
        if not math.isfinite(loss):
            self.dp.zero_grad(self.optimizer)
            return loss, float("nan")
        grad_norm = self.dp.step(self.optimizer, self.cfg.optim.grad_clip)  # clip, step, zero the gradients
        self.scheduler.step()
        if self.has_routing:  # loads all-reduced over every rank; expert biases updated after the step
            self.routing_last = routing_step(self.model)
        self.sparsity_last = attention_sparsity_step(self.model) if self.has_sparse_attention else None
        return loss, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss on the first ``eval_batches * micro_batch_size`` validation windows.

        The window count does not depend on the data-parallel size (rank r reads windows r, r + dp,
        ...), so validation losses of runs at different world sizes are comparable.
        """
        t = self.cfg.train
        n = min(len(self.val_set), t.eval_batches * t.micro_batch_size)
        if self.ep is not None:  # every rank must run the same number of forwards (all-to-all inside)
            n -= n % self.dims.dp
        mine = list(range(self.dp_rank, n, self.dims.dp))
        self.model.eval()
        loss_sum, count = 0.0, 0.0
        for s in range(0, len(mine), t.micro_batch_size):
            batch = self._to_device(collate_packed([self.val_set[i] for i in mine[s : s + t.micro_batch_size]]))
            loss_sum += float(self.forward_loss_sum(batch))
            count += float(batch["num_tokens"]) / self.dims.cp  # each cp rank sums CE of its shard only
        total, total_count = _all_reduce_sum([loss_sum, count], self.device)
        self.model.train()
        return total / max(total_count, 1.0)

    def _evaluate_and_log(self, step: int, logger: MetricsLogger) -> None:
        """Validation loss at ``step``: recorded in the history and logged (no-op without validation data).

        Also runs the ``train.eval_tasks`` (:func:`lctrain.eval.run.run_training_eval`), logged as ``<task>/<key>``.
        """
        if self.cfg.train.eval_tasks:
            from lctrain.eval.run import run_training_eval

            logger.log_eval(step, run_training_eval(self, step))
        if len(self.val_set) == 0:
            return
        val = self.evaluate()
        self.state.val_history.append([step, val])
        logger.log_eval(step, {"val/loss": val, "val/ppl": math.exp(min(val, 50.0))})

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train to ``train.max_steps``; returns the summary written to ``summary.json``.

        A run resumed at (or past) ``train.max_steps`` is complete: nothing is trained, evaluated
        or written, and the existing ``summary.json`` is returned (when there is one). The run
        directory's lock is released when this returns or raises (:meth:`close`).

        Raises:
            TrainingStopped: SIGTERM / SIGUSR1 arrived (``train.save_on_signal``): every rank
                finished the same step and the checkpoint of that step was saved.
            NonFiniteLossError: see the class docstring.
            CheckpointSaveError: a checkpoint could not be written; the previous one is intact.
        """
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict:
        t = self.cfg.train
        if self.state.step >= t.max_steps and (self.out_dir / "summary.json").exists():
            if self.env.is_main:
                print(f"[lctrain] {self.out_dir} is already complete ({self.state.step} of train.max_steps="
                      f"{t.max_steps} steps); nothing to do. Raise train.max_steps to continue it, or use another "
                      f"train.out_dir (or train.resume=none) to start over.", flush=True)
            barrier()
            return json.loads((self.out_dir / "summary.json").read_text())
        if self.env.is_main:
            (self.out_dir / "config.yaml").write_text(to_yaml(self.cfg))
            print(startup_report(self), flush=True)  # model, kernel plan, layout, where the run writes
        logger = MetricsLogger(
            self.out_dir, self.env.rank, t.tensorboard, t.progress, t.max_steps, self.tokens_per_step,
            initial_step=self.state.step, sinks=open_sinks(self),  # curves.png, W&B (lctrain.train.console)
        )
        start_time = time.perf_counter()
        run_tokens, run_time = 0, 0.0
        last_ckpt: Path | None = find_latest_checkpoint(self.ckpt_root)
        try:
            if self.state.step == 0:
                self._evaluate_and_log(0, logger)
            while self.state.step < t.max_steps:
                step = self.state.step + 1
                t0 = time.perf_counter()
                self.routing_last = self.sparsity_last = None
                loss, grad_norm = self.train_step()
                dt = time.perf_counter() - t0
                if not math.isfinite(loss):
                    if t.nan_policy == "skip":
                        self.state.skipped_steps.append(step)
                        self.state.step = step
                        self.state.losses.append(loss)
                        self.scheduler.step()
                        if self.env.is_main:
                            print(f"[lctrain] step {step}: non-finite loss {loss}, step skipped", flush=True)
                        continue
                    raise NonFiniteLossError(
                        f"non-finite training loss ({loss}) at step {step}; stopping. The last good checkpoint is "
                        f"{last_ckpt if last_ckpt else '(none written yet)'}; resume with train.resume=auto, lower "
                        f"optim.lr, or set train.nan_policy=skip to skip such steps"
                    )
                self.state.step = step
                self.state.tokens += self.tokens_per_step
                self.state.losses.append(loss)
                run_tokens += self.tokens_per_step
                run_time += dt
                tps = self.tokens_per_step / dt
                metrics = {"train/loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                           "tokens_per_s": tps}
                util = mfu(self.flops_per_token, tps / self.env.world_size, self.device)
                if util is not None:
                    metrics["mfu"] = util
                if self.routing_last is not None:
                    metrics.update(self.routing.record(self.routing_last))
                if self.sparsity_last is not None:
                    metrics["attention/attended_fraction"] = self.sparsity_last["attended_fraction"]
                    self.sparsity_history.append(self.sparsity_last["attended_fraction"])
                if step % t.log_every == 0 or step == t.max_steps:
                    logger.log_step(step, metrics)
                    if self.routing_last is not None:
                        for layer in self.routing_last["layers"]:
                            logger.log_histogram(f"moe/load/{layer['name']}", layer["tokens_per_expert"], step)
                if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
                    self._evaluate_and_log(step, logger)
                if t.checkpoint_every and step % t.checkpoint_every == 0 and step != t.max_steps:
                    last_ckpt = self.save()
                    logger.checkpoint(step)  # curves.png redrawn
                signum = self._stop_requested() if step != t.max_steps else None
                if signum is not None:
                    if self.saved_step != step:
                        last_ckpt = self.save()
                    name = signal.Signals(signum).name
                    raise TrainingStopped(
                        f"stopped by {name} after step {step} of {t.max_steps}; checkpoint {last_ckpt} saved. "
                        f"Restart the same command (train.resume=auto) to continue", signum, step, last_ckpt,
                    )
            if not self.state.val_history or self.state.val_history[-1][0] != t.max_steps:
                self._evaluate_and_log(self.state.step, logger)
            if t.checkpoint_every >= 0 and t.save_final:
                last_ckpt = self.save()
        finally:
            logger.close()
        summary = self._summary(run_tokens, run_time, time.perf_counter() - start_time)
        if self.env.is_main:
            write_summary(self.out_dir, summary)
            v0, v1 = summary["initial_val_loss"], summary["final_val_loss"]
            print(
                f"[lctrain] done: {summary['steps']} steps, {summary['tokens_per_s']:.0f} tokens/s, "
                f"train loss {summary['final_train_loss']:.4f}, val ppl "
                f"{math.exp(v0) if v0 is not None else float('nan'):.1f} -> "
                f"{math.exp(v1) if v1 is not None else float('nan'):.1f}; summary: {self.out_dir / 'summary.json'}",
                flush=True,
            )
        return summary

    def _summary(self, run_tokens: int, run_time: float, wall: float) -> dict:
        """The run's summary (collective: the peak resident memory is the maximum over the ranks)."""
        vh = self.state.val_history
        peak = torch.tensor([peak_rss_mib()], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        finite = [x for x in self.state.losses if math.isfinite(x)]
        return {
            "recipe": self.cfg.recipe,
            "scale": self.cfg.scale,
            "steps": self.state.step,
            "tokens": self.state.tokens,
            "final_train_loss": finite[-1] if finite else None,
            "initial_val_loss": vh[0][1] if vh else None,
            "final_val_loss": vh[-1][1] if vh else None,
            "final_val_ppl": math.exp(vh[-1][1]) if vh else None,
            "val_history": vh,
            "tokens_per_s": run_tokens / run_time if run_time > 0 else 0.0,
            # model FLOPs utilisation per device over the run (None on CPU and GPUs without a known peak)
            "mfu": (mfu(self.flops_per_token, run_tokens / run_time / self.env.world_size, self.device)
                    if run_time > 0 else None),
            "wall_time_s": wall,
            "losses": self.state.losses,
            "skipped_steps": self.state.skipped_steps,
            "world_size": self.env.world_size,
            "dp_degree": self.dims.dp,
            "cp_degree": self.dims.cp,
            "ep_degree": self.dims.ep,
            "moe": self.routing.summary() if self.has_routing else None,
            "attended_fraction": self.sparsity_history if self.has_sparse_attention else None,
            "active_head_fraction": (sum(m.active_head_fraction() for m in self.head_routed) / len(self.head_routed)
                                     if self.head_routed else None),
            "num_params": self.num_params,
            "device": str(self.device),
            "kernel_plan": self.kernel_plan.as_dict(),
            # host memory: peak resident set size of the largest rank, MiB (ru_maxrss)
            "peak_rss_mib": float(peak.item()),
        }


def train(cfg: RunConfig) -> dict:
    """Build a :class:`Trainer` for ``cfg`` and run it; returns the run summary."""
    return Trainer(cfg).fit()


def summary_of(out_dir: str | os.PathLike) -> dict:
    """Read ``summary.json`` of a finished run."""
    return json.loads((Path(out_dir) / "summary.json").read_text())
