"""End-to-end CPU benchmark of one training step of a fixed small model: one number for regressions.

    python benchmarks/train_step_cpu.py --threads 2 --out benchmarks/results/train_step_cpu.json

One step = forward of ``HybridLM`` on a [B, T] batch of random token ids, next-token
cross-entropy (fp32), backward, gradient clipping at ``optim.grad_clip`` (if > 0) and one
``torch.optim.AdamW`` step (``optim.lr`` / ``beta1`` / ``beta2`` / ``eps`` / ``weight_decay``,
constant learning rate: the schedule costs nothing). No data loading, no distributed setup.
B = ``train.micro_batch_size`` sequences of T = ``data.seq_len`` tokens, each sequence one
document (no ``cu_seqlens``).

The model is built only through the stable entry points
``lctrain.config.load_config([recipe=..., data.seq_len=..., ...])`` and
``lctrain.models.HybridLM(cfg.model)``; the recipe / scale and ``data.*`` / ``train.*`` /
``optim.*`` overrides pick it (``--set``), and ``model.*`` keys are refused on purpose so the
benchmark keeps measuring the same model while model keys are renamed. Default: the
``hybrid_gdn_3to1`` recipe at its ``cpu`` scale (GGGA, 4 layers), T = 2048, B = 2.

Timing: ``--warmup`` untimed steps, then ``--steps`` timed steps (``time.perf_counter``);
reports the median, mean and min ms/step, tokens/s and tokens/s per core (tokens/s divided by
``--threads``, the ``torch.set_num_threads`` value; the headline number uses the median, and
``tokens_per_s_per_core_best`` the fastest step). Only ratios between runs on the same machine
and thread count mean anything. Output JSON (``--out``): the configuration items, thread
count, parameter count, per-step times, the summary numbers, the peak RSS and the load averages
before and after (timings taken while other processes run are not comparable).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_RECIPE = "hybrid_gdn_3to1"
DEFAULT_SET = ["data.seq_len=2048", "train.micro_batch_size=2"]
ALLOWED_SECTIONS = ("data.", "train.", "optim.")


def build(recipe: str, scale: str | None, overrides: list[str]):
    """(cfg, model) from the recipe, optional scale and ``data.*`` / ``train.*`` / ``optim.*`` items.

    Raises:
        SystemExit: an override outside the allowed sections (e.g. ``model.*``).
    """
    from lctrain.config import load_config
    from lctrain.models import HybridLM

    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(ALLOWED_SECTIONS)]
    if bad:
        raise SystemExit(f"only data.*, train.* and optim.* overrides are allowed here, got {bad}")
    items = [f"recipe={recipe}"] + ([f"scale={scale}"] if scale else []) + overrides
    cfg = load_config(items)
    model = HybridLM(cfg.model)
    return cfg, model, items


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's token embedding (read from the module, not from model config keys)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            return m.num_embeddings
    raise RuntimeError("no nn.Embedding in the model")


def make_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """AdamW over all parameters with the ``optim`` section's hyper-parameters."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=float(getattr(optim_cfg, "lr", 3e-3)),
        betas=(float(getattr(optim_cfg, "beta1", 0.9)), float(getattr(optim_cfg, "beta2", 0.95))),
        eps=float(getattr(optim_cfg, "eps", 1e-8)),
        weight_decay=float(getattr(optim_cfg, "weight_decay", 0.1)),
    )


def train_step(model, opt, input_ids: torch.Tensor, targets: torch.Tensor, grad_clip: float) -> float:
    """One forward / backward / clip / AdamW step on ``input_ids`` [B, T] int64; returns the loss.

    ``targets`` [B, T] int64 are the next-token labels; the loss is the mean cross-entropy of
    the fp32 logits [B, T, vocab].
    """
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(loss.detach())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe name (default {DEFAULT_RECIPE})")
    ap.add_argument("--scale", default=None, help="scale preset (default: the recipe's, cpu)")
    ap.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE",
                    help=f"data.* / train.* / optim.* overrides (default: {' '.join(DEFAULT_SET)})")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    overrides = DEFAULT_SET if args.set is None else args.set
    cfg, model, items = build(args.recipe, args.scale, overrides)
    model.train()
    B, T = int(cfg.train.micro_batch_size), int(cfg.data.seq_len)
    vocab = vocab_size(model)
    opt = make_optimizer(model, cfg.optim)
    grad_clip = float(getattr(cfg.optim, "grad_clip", 0.0) or 0.0)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, vocab, (B, T + 1), generator=gen)
    input_ids, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    layers = getattr(model, "layer_types", None)
    print(f"{' '.join(items)}: {n_params / 1e6:.2f} M parameters, layers {layers}, B={B} T={T} "
          f"vocab={vocab}, threads={torch.get_num_threads()}", flush=True)

    load_start = os.getloadavg()
    losses = []
    for _ in range(args.warmup):
        losses.append(train_step(model, opt, input_ids, targets, grad_clip))
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, input_ids, targets, grad_clip))
        times.append((time.perf_counter() - t0) * 1e3)
        print(f"  step {i}: {times[-1]:8.1f} ms  loss {losses[-1]:.4f}", flush=True)

    ms = statistics.median(times)
    tok_s = B * T / (ms * 1e-3)
    result = {
        "benchmark": "train_step_cpu",
        "config_items": items,
        "recipe": args.recipe,
        "layer_types": list(layers) if layers is not None else None,
        "params": n_params,
        "batch": B, "seq_len": T, "tokens_per_step": B * T, "vocab": vocab,
        "threads": torch.get_num_threads(),
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "step_ms": times,
        "ms_per_step_median": ms,
        "ms_per_step_mean": statistics.mean(times),
        "ms_per_step_min": min(times),
        "tokens_per_s": tok_s,
        "tokens_per_s_per_core": tok_s / args.threads,
        # from the fastest step: less sensitive to other processes than the median
        "tokens_per_s_per_core_best": B * T / (min(times) * 1e-3) / args.threads,
        "losses": losses,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loadavg_start": list(load_start),  # 1/5/15-minute load: a busy machine distorts the timing
        "loadavg_end": list(os.getloadavg()),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(f"train_step_cpu: {result['tokens_per_s_per_core']:.0f} tokens/s/core "
          f"({tok_s:.0f} tokens/s, {ms:.1f} ms/step median, {min(times):.1f} min, {args.threads} threads)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
