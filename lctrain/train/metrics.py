"""Training metrics: TensorBoard scalars, a tqdm progress bar, ``summary.json`` and MFU.

Only rank 0 logs; other ranks get a :class:`MetricsLogger` whose methods do nothing, so the
trainer calls it unconditionally.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

# Peak dense (no 2:4 sparsity) BF16 tensor-core throughput in FLOP/s, from NVIDIA datasheets:
# H100 SXM5 and H200 SXM: 1,979 TFLOPS "with sparsity" -> 989.4 TFLOPS dense (H100 / H200 Tensor
# Core GPU datasheets); H100 PCIe: 1,513 with sparsity -> 756 dense; A100 (SXM4 and PCIe, 40 and
# 80 GB): 312 TFLOPS dense (A100 Tensor Core GPU datasheet). Matched against
# ``torch.cuda.get_device_name`` in order; the first entry whose substrings all occur wins.
# ``None`` marks known names with no reliable number here (returns None rather than a wrong one).
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float | None], ...] = (
    (("H200",), 989e12),
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), None),
    (("H100",), 989e12),
    (("A100",), 312e12),
)


def peak_bf16_flops_for_name(device_name: str) -> float | None:
    """Peak dense BF16 FLOP/s for a CUDA device name (e.g. ``"NVIDIA H100 80GB HBM3"``), or None.

    See :data:`PEAK_BF16_FLOPS` for the table and its sources. Matching is case-insensitive.
    """
    name = device_name.upper()
    for keys, peak in PEAK_BF16_FLOPS:
        if all(k in name for k in keys):
            return peak
    return None


def peak_bf16_flops(device: torch.device | str) -> float | None:
    """Peak dense BF16 FLOP/s of ``device``; None on CPU, other backends and unknown GPUs."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_bf16_flops_for_name(torch.cuda.get_device_name(device))


def mfu(
    flops_per_token: float, tokens_per_s: float, device: torch.device | str, peak_flops: float | None = None
) -> float | None:
    """Model FLOPs utilisation ``flops_per_token * tokens_per_s / peak``.

    Definition from Chowdhery et al., "PaLM" (2022), Appendix B.

    Args:
        flops_per_token: model FLOPs per trained token (forward + backward, e.g. ``6 N`` plus the
            attention term); activation recomputation is not counted.
        tokens_per_s: tokens processed per second by this one device (global throughput divided by
            the number of devices).
        device: the device whose peak applies (see :func:`peak_bf16_flops`).
        peak_flops: override the peak (FLOP/s), e.g. for a GPU missing from the table.

    Returns:
        The fraction in [0, 1] (nominally), or None when the peak is unknown (CPU, unlisted GPU).

    Raises:
        ValueError: negative ``flops_per_token`` / ``tokens_per_s`` or a non-positive ``peak_flops``.
    """
    if flops_per_token < 0 or tokens_per_s < 0:
        raise ValueError(f"flops_per_token={flops_per_token} and tokens_per_s={tokens_per_s} must be >= 0")
    if peak_flops is not None and peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be > 0 FLOP/s")
    peak = peak_flops if peak_flops is not None else peak_bf16_flops(device)
    if peak is None:
        return None
    return flops_per_token * tokens_per_s / peak


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


def _strip_prefix(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    # "train/loss" and "loss" name the same metric in log_step ("val/..." in log_eval)
    return {k[len(prefix) + 1:] if k.startswith(prefix + "/") else k: v for k, v in metrics.items()}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def write_summary(out_dir: str | os.PathLike, summary: dict) -> Path:
    """Write ``summary`` to ``out_dir/summary.json`` atomically (temporary file + ``os.replace``).

    Paths become strings and one-element tensors / numpy scalars become numbers.

    Returns:
        The path of ``summary.json``.

    Raises:
        ValueError: ``summary`` is not a dict or holds a value JSON cannot represent.
    """
    if not isinstance(summary, dict):
        raise ValueError(f"summary must be a dict, got {type(summary).__name__}")
    try:
        text = json.dumps(summary, indent=2, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"summary is not JSON-serialisable: {e}") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "summary.json"
    fd, tmp_name = tempfile.mkstemp(dir=out, prefix=".summary.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return target


class MetricsSink(Protocol):
    """Where :class:`MetricsLogger` also sends each scalar it writes (rank 0): W&B, the run's curves.

    ``values`` maps TensorBoard tags to numbers; ``tokens`` = ``step * tokens_per_step``.
    Implementations: :class:`lctrain.train.wandb_logger.WandbRun`, :class:`lctrain.train.curves.RunHistory`.
    """

    def log_scalars(self, step: int, tokens: int, values: dict[str, float], kind: str = "train") -> None: ...

    def log_histogram(self, tag: str, values: Any, step: int, tokens: int) -> None: ...

    def checkpoint(self, step: int) -> None: ...

    def close(self) -> None: ...


class MetricsLogger:
    """Rank-0 logger: TensorBoard scalars under ``out_dir/tb`` and a tqdm bar (which shows the ETA).

    TensorBoard tags: ``train/loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu`` (from
    :meth:`log_step`) and ``val/loss``, ``val/ppl`` (from :meth:`log_eval`); any other key ``k`` is
    written as ``train/k`` or ``val/k`` (keys already containing ``/`` are kept; ``train/loss`` and
    ``loss`` are the same key in :meth:`log_step`, ``val/loss`` and ``loss`` in :meth:`log_eval`).
    ``None`` values are skipped. On ranks other than 0 every method is a no-op.

    Args:
        out_dir: run directory.
        rank: global rank of this process.
        enabled_tensorboard: write TensorBoard event files.
        progress: show a tqdm progress bar (on stderr).
        total_steps: optimizer steps of the whole run (the bar's total).
        tokens_per_step: tokens consumed per optimizer step over all ranks; used to derive
            ``tokens_per_s`` from wall time when :meth:`log_step` is not given it.
        initial_step: steps already done (when resuming); the bar starts there.
        sinks: further receivers of every scalar and histogram (:class:`MetricsSink`; rank 0 only),
            closed by :meth:`close`.

    Raises:
        ImportError: ``enabled_tensorboard`` but the ``tensorboard`` package is missing.
    """

    STEP_TAGS: ClassVar[dict[str, str]] = {
        "loss": "train/loss", "lr": "lr", "grad_norm": "grad_norm",
        "tokens_per_s": "tokens_per_s", "mfu": "mfu",
    }
    EVAL_TAGS: ClassVar[dict[str, str]] = {"loss": "val/loss", "ppl": "val/ppl"}

    def __init__(
        self,
        out_dir: str | os.PathLike,
        rank: int,
        enabled_tensorboard: bool,
        progress: bool,
        total_steps: int,
        tokens_per_step: int,
        initial_step: int = 0,
        sinks: Sequence[MetricsSink] = (),
    ) -> None:
        self.active = rank == 0
        self.out_dir = Path(out_dir)
        self.tokens_per_step = tokens_per_step
        self.writer = None
        self.bar = None
        self.total_steps = total_steps
        self.sinks: list[MetricsSink] = list(sinks) if self.active else []
        self._last_step = initial_step
        self._last_time = time.perf_counter()
        self.progress = progress and self.active
        if not self.active:
            return
        if enabled_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "TensorBoard logging needs the 'tensorboard' package: pip install tensorboard, "
                    "or set train.tensorboard=false"
                ) from e
            self.writer = SummaryWriter(log_dir=str(self.out_dir / "tb"))
        # the bar appears at the first step, so the step-0 validation line is printed before it and
        # does not make the bar draw its first line twice
        self._bar_pending = progress
        self._initial_step = initial_step

    def _write(
        self, tags: dict[str, str], prefix: str, step: int, metrics: dict[str, Any]
    ) -> dict[str, float]:
        values, tagged = {}, {}
        for key, value in _strip_prefix(metrics, prefix).items():
            v = _to_float(value)
            if v is None:
                continue
            values[key] = v
            tag = tags.get(key, key if "/" in key else f"{prefix}/{key}")
            tagged[tag] = v
            if self.writer is not None:
                self.writer.add_scalar(tag, v, step)
        for sink in self.sinks:
            sink.log_scalars(step, step * self.tokens_per_step, tagged, kind=prefix)
        return values

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        """Log training metrics after optimizer step ``step``.

        Args:
            step: optimizer steps completed (1 after the first step); the TensorBoard x-axis and
                the bar position.
            metrics: e.g. ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu`` (floats or
                0-dim tensors). Without ``tokens_per_s`` it is computed as
                ``(step - previous step) * tokens_per_step / seconds since the previous call``.
        """
        if not self.active:
            return
        now = time.perf_counter()
        metrics = _strip_prefix(metrics, "train")
        if metrics.get("tokens_per_s") is None and step > self._last_step and now > self._last_time:
            tokens = (step - self._last_step) * self.tokens_per_step
            metrics["tokens_per_s"] = tokens / (now - self._last_time)
        values = self._write(self.STEP_TAGS, "train", step, metrics)
        if self._bar_pending:
            from tqdm.auto import tqdm

            self._bar_pending = False
            self.bar = tqdm(total=self.total_steps, initial=self._initial_step, unit="step", dynamic_ncols=True)
        if self.bar is not None:
            postfix = {}
            if "loss" in values:
                postfix["loss"] = f"{values['loss']:.4f}"
            if "tokens_per_s" in values:
                postfix["tok/s"] = f"{values['tokens_per_s']:.3g}"
            self.bar.set_postfix(postfix, refresh=False)
            if step >= self.total_steps:
                # the last step: close() draws the final line once (an update would draw it as well, and
                # a later bar.write would redraw it again)
                self.bar.n = step
                self.bar.close()
                self.bar = None
            elif step > self.bar.n:
                self.bar.update(step - self.bar.n)
        self._last_step, self._last_time = step, now

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Log validation metrics at optimizer step ``step``.

        Args:
            step: optimizer steps completed.
            metrics: ``loss`` (mean token cross-entropy, nats) and optionally ``ppl``; when ``ppl``
                is missing it is ``exp(loss)`` (``inf`` on overflow). Other keys go to ``val/<key>``.
        """
        if not self.active:
            return
        metrics = _strip_prefix(metrics, "val")
        loss = _to_float(metrics.get("loss"))
        if loss is not None and metrics.get("ppl") is None:
            metrics["ppl"] = math.exp(loss) if loss < 709.0 or math.isnan(loss) else math.inf
        values = self._write(self.EVAL_TAGS, "val", step, metrics)
        if self.progress and "loss" in values:
            message = f"step {step}: val/loss {values['loss']:.4f} val/ppl {values['ppl']:.4g}"
            if self.bar is not None:
                self.bar.write(message)  # above the bar, which is redrawn below it
            else:  # after the last step the bar is closed
                print(message, flush=True)

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        """Write a TensorBoard histogram of ``values`` (e.g. tokens per expert) under ``tag``; no-op off rank 0."""
        if self.active and self.writer is not None:
            self.writer.add_histogram(tag, torch.as_tensor(values, dtype=torch.float64), step)
        for sink in self.sinks:
            sink.log_histogram(tag, values, step, step * self.tokens_per_step)

    def checkpoint(self, step: int) -> None:
        """A checkpoint of ``step`` was saved: the sinks update what they keep on disk (``curves.png``)."""
        for sink in self.sinks:
            sink.checkpoint(step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer, the progress bar and the sinks (idempotent)."""
        self._bar_pending = False
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- routing statistics
ROUTING_HISTORY_KEYS = ("load_max_mean", "aux_loss", "z_loss", "dropped_frac")


@torch.no_grad()
def routing_step(model: torch.nn.Module, group=None) -> dict | None:
    """Reduce every routed layer's step statistics over ranks, run its ``after_step``, reset them.

    Collective over ``group`` (default: the world) when a process group exists: one all-reduce of
    every layer's :meth:`lctrain.layers.routing.RoutingStats.pack`. Call once per optimizer step,
    after ``optimizer.step()`` (a layer's ``after_step`` updates e.g. the DeepSeek-V3 expert bias
    from the reduced loads).

    Returns:
        None when the model has no routed layer; else ``{"aux_loss", "z_loss", "dropped_frac",
        "load_max_mean", "layers": [{"name", "tokens_per_expert": [...], "load_max_mean"}]}``:
        losses are per-layer values (coefficient included) averaged over forward calls and summed
        over layers; ``load_max_mean`` is max/mean of routed slots per expert (1.0 = perfectly
        even), averaged over layers. ``kind`` names the layer class (``MoE``, ``MoHAttention``,
        ``MoAttention``, ``LoRAMixerLinear``): the experts are FFNs, heads, attention experts or
        LoRA experts.
    """
    import torch.distributed as dist

    from lctrain.layers.routing import RoutingStats, routed_layers

    layers = routed_layers(model)
    if not layers:
        return None
    packed = torch.cat([m.routing_stats.pack() for _, m in layers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed, group=group)
    out_layers, aux, z, dropped, slots = [], 0.0, 0.0, 0.0, 0.0
    offset = 0
    for name, m in layers:
        E = m.routing_stats.num_experts
        n = E + 5
        stats = RoutingStats.unpack(packed[offset:offset + n], E)
        offset += n
        calls = max(float(stats.calls), 1.0)
        aux += float(stats.aux_loss) / calls
        z += float(stats.z_loss) / calls
        dropped += float(stats.dropped)
        slots += float(stats.slots)
        mean = float(stats.load.mean())
        ratio = float(stats.load.max()) / mean if mean > 0 else float("nan")
        out_layers.append({"name": name, "kind": type(m).__name__, "tokens_per_expert": stats.load.tolist(),
                           "load_max_mean": ratio})
        m.after_step(stats)
        m.routing_stats.reset()
    ratios = [x["load_max_mean"] for x in out_layers]
    return {
        "aux_loss": aux, "z_loss": z, "dropped_frac": dropped / slots if slots > 0 else 0.0,
        "load_max_mean": sum(ratios) / len(ratios), "layers": out_layers,
    }


class RoutingHistory:
    """Per-step routing scalars of a run (what ``summary.json`` reports under ``moe``), checkpointable.

    :meth:`record` takes one :func:`routing_step` result and returns its TensorBoard scalars.
    """

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {k: [] for k in ROUTING_HISTORY_KEYS}
        self.last: dict | None = None

    def record(self, stats: dict) -> dict[str, float]:
        """Append ``stats`` (a :func:`routing_step` result); returns ``moe/...`` scalars for the logger."""
        self.last = stats
        out = {f"moe/{k}": stats[k] for k in ROUTING_HISTORY_KEYS}
        for k in ROUTING_HISTORY_KEYS:
            self.history[k].append(stats[k])
        for layer in stats["layers"]:
            out[f"moe/load_max_mean/{layer['name']}"] = layer["load_max_mean"]
        return out

    def summary(self) -> dict:
        """``{history keys..., "final_layers"}`` for ``summary.json``."""
        return {**self.history, "final_layers": self.last["layers"] if self.last else None}

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: list(state.get("history", {}).get(k, [])) for k in ROUTING_HISTORY_KEYS}


@torch.no_grad()
def attention_sparsity_step(model: torch.nn.Module, group=None) -> dict | None:
    """Mean attended fraction of the block-sparse attention layers over the step, then reset.

    Reads every module with an ``attended_stats`` fp64 [2] tensor (``[sum of fractions, calls]``,
    e.g. :class:`lctrain.layers.moba.MoBAAttention`), all-reduces them over ``group`` (default:
    the world) when a process group exists, and returns ``{"attended_fraction": mean over layers
    and calls, "layers": {name: fraction}}``; None when there is no such layer or no call.
    """
    import torch.distributed as dist

    layers = [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "attended_stats", None), torch.Tensor)]
    if not layers:
        return None
    packed = torch.cat([m.attended_stats.reshape(2) for _, m in layers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed, group=group)
    for _, m in layers:
        m.attended_stats.zero_()
    per = {}
    for i, (name, _) in enumerate(layers):
        total, calls = float(packed[2 * i]), float(packed[2 * i + 1])
        if calls > 0:
            per[name] = total / calls
    if not per:
        return None
    return {"attended_fraction": sum(per.values()) / len(per), "layers": per}
