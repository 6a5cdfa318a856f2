"""Expert load balance during a short CPU training run: no balancing vs aux loss vs bias balancing.

Trains the same tiny ``hybrid_gdn_3to1_moe`` model (8 experts, top-2, every block MoE) on text
cut from the built-in corpus four times, changing only the balancing method:

* ``softmax_none``: softmax router, no aux loss, no z-loss, no bias;
* ``softmax_aux``: Switch load-balancing loss (``--aux-coeff``) + ST-MoE z-loss 1e-3;
* ``sigmoid_none``: sigmoid router, nothing else;
* ``sigmoid_bias``: sigmoid router with DeepSeek-V3 aux-loss-free bias updates (``--bias-rate``).

The metric is the max/mean expert load ratio (routed slots per expert, counted over each
step's global batch, averaged over layers; 1.0 = perfectly even), reported as the mean over the
first and the last ``--window`` steps, plus the final training loss. Writes JSON with ``--out``.

    python benchmarks/moe_balance.py --steps 60 --out moe_balance.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lctrain.config import load_config
from lctrain.train.trainer import train

BUILTIN = Path(__file__).resolve().parent.parent / "lctrain" / "data" / "builtin" / "pd_english.jsonl.gz"

VARIANTS = {
    "softmax_none": {"model.moe.score_func": "softmax", "model.moe.aux_loss_coeff": 0.0, "model.moe.z_loss_coeff": 0.0},
    "softmax_aux": {"model.moe.score_func": "softmax", "model.moe.aux_loss_coeff": "AUX", "model.moe.z_loss_coeff": 1e-3},
    "sigmoid_none": {"model.moe.score_func": "sigmoid", "model.moe.aux_loss_coeff": 0.0, "model.moe.z_loss_coeff": 0.0},
    "sigmoid_bias": {"model.moe.score_func": "sigmoid", "model.moe.aux_loss_coeff": 0.0, "model.moe.z_loss_coeff": 0.0,
                     "model.moe.bias_update_rate": "RATE"},
}


def corpus(path: Path, docs: int = 60) -> Path:
    with gzip.open(BUILTIN, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(docs), f)]
    path.write_text("".join(json.dumps({"text": r["text"][:40000]}) + "\n" for r in rows), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--aux-coeff", type=float, default=0.01)
    ap.add_argument("--bias-rate", type=float, default=0.01)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = corpus(root / "corpus.jsonl")
        for name, variant in VARIANTS.items():
            items = {
                "model.vocab_size": 1024, "model.d_model": 64, "model.n_layers": 4, "model.attn.num_heads": 2,
                "model.attn.num_kv_heads": 1, "model.attn.head_dim": 32, "model.gdn.num_heads": 2,
                "model.gdn.head_dim": 32,
                "model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.ffn_hidden_size": 64,
                "model.moe.num_shared_experts": 0,
                "data.path": str(data), "data.seq_len": 128, "data.cache_dir": str(root / "cache"),
                "data.val_fraction": 0.05, "train.out_dir": str(root / name), "train.max_steps": args.steps,
                "train.global_batch_size": 8, "train.micro_batch_size": 8, "train.checkpoint_every": 0,
                "train.eval_every": 0, "train.eval_batches": 1, "train.progress": False, "train.tensorboard": False,
                "optim.warmup_steps": 5, "optim.lr": 3e-3,
            }
            for k, v in variant.items():
                items[k] = {"AUX": args.aux_coeff, "RATE": args.bias_rate}.get(v, v) if isinstance(v, str) else v
            cfg = load_config(["recipe=hybrid_gdn_3to1_moe"] + [f"{k}={v}" for k, v in items.items()])
            summary = train(cfg)
            ratios = summary["moe"]["load_max_mean"]
            w = min(args.window, len(ratios) // 2)
            results[name] = {
                "first_load_max_mean": sum(ratios[:w]) / w,
                "last_load_max_mean": sum(ratios[-w:]) / w,
                "final_train_loss": summary["final_train_loss"],
                "load_max_mean": ratios,
                "dropped_frac": summary["moe"]["dropped_frac"][-1],
            }
            r = results[name]
            print(f"{name:>13}: max/mean load {r['first_load_max_mean']:.3f} -> {r['last_load_max_mean']:.3f}, "
                  f"final loss {r['final_train_loss']:.4f}", flush=True)
    print(f"\nmax/mean expert load (mean of first / last {args.window} steps; 1.0 = even)")
    print(f"{'variant':>13} | {'first':>6} {'last':>6} {'last vs none':>12} {'loss':>7}")
    for name, r in results.items():
        base = results["softmax_none" if name.startswith("softmax") else "sigmoid_none"]["last_load_max_mean"]
        print(f"{name:>13} | {r['first_load_max_mean']:6.3f} {r['last_load_max_mean']:6.3f} "
              f"{r['last_load_max_mean'] / base:11.2f}x {r['final_train_loss']:7.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
