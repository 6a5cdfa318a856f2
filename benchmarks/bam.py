"""BAM vs BTX on the built-in corpus at CPU size: run the upcycling pipeline and record the results.

    python benchmarks/bam.py                      # runs launch/upcycle.py with COMMAND below (~15-25 min, 2 cores)
    python benchmarks/bam.py --collect --wall-s N # only collect an existing runs/bam_cpu/bam_summary.json

Writes ``benchmarks/results/bam_cpu.json``: the command, its wall time, the exact overrides, and
for every model (parent, the three seeds, BTX, BAM full experts, BAM shared K/V) the per-domain
validation loss on each domain's held-out documents, before (upcycled models: right after mixing)
and after training, with the steps, tokens, parameters and training FLOPs per token it used.
BTX and BAM get the same steps and tokens after branching (``upcycle.moe_steps``); BAM spends
more FLOPs per token (every token runs all N attention experts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = "runs/bam_cpu"
OVERRIDES = [
    "recipe=bam_hybrid_gdn_3to1", f"train.out_dir={OUT_DIR}",
    "model.d_model=128", "model.attn.num_heads=2", "model.attn.num_kv_heads=1", "model.attn.head_dim=64",
    "model.gdn.num_heads=2", "model.gdn.head_dim=64", "data.seq_len=256",
    "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_every=0", "train.eval_batches=16",
    "train.checkpoint_every=100", "train.tensorboard=false", "train.progress=false",
    "upcycle.parent_steps=300", "upcycle.branch_steps=200", "upcycle.moe_steps=200",
]
COMMAND = "OMP_NUM_THREADS=1 nice -n 10 python launch/upcycle.py " + " ".join(OVERRIDES)


def collect(wall_s: float | None) -> dict:
    """The results record from ``OUT_DIR/bam_summary.json`` (see the module docstring)."""
    summary = json.loads((REPO / OUT_DIR / "bam_summary.json").read_text())
    models = summary["models"]
    domains = list(summary["domains"])
    table = {k: {**{d: round(m["val_loss"][d], 4) for d in domains}, "mean": round(m["mean_val_loss"], 4)}
             for k, m in models.items()}
    best_bam = min(("bam_full", "bam_shared_kv"), key=lambda k: models[k]["mean_val_loss"] if k in models else 1e9)
    verdict = None
    if "btx" in models and best_bam in models:
        gap = models["btx"]["mean_val_loss"] - models[best_bam]["mean_val_loss"]
        verdict = (f"{best_bam} mean val loss {models[best_bam]['mean_val_loss']:.4f} vs btx "
                   f"{models['btx']['mean_val_loss']:.4f}: BAM {'beats' if gap > 0 else 'does not beat'} BTX "
                   f"by {abs(gap):.4f} nats/token at this size (one run, one seed; run-to-run noise was not "
                   f"measured, so a gap this small is not evidence either way)")
    return {
        "what": "BAM (Zhang et al. 2024) vs BTX upcycling of the 3:1 Gated DeltaNet hybrid, 3 domains of pd_english",
        "command": COMMAND,
        "wall_time_s": wall_s,
        "machine": f"{os.cpu_count()} CPU cores shared with other jobs; one process, OMP_NUM_THREADS=1",
        "overrides": OVERRIDES,
        "domains": summary["domains"],
        "val_windows_per_domain": summary["val_windows_per_domain"],
        "tokens_per_step": summary["tokens_per_step"],
        "val_loss": table,
        "val_loss_at_upcycle": {k: m.get("val_loss_at_upcycle") for k, m in models.items() if "val_loss_at_upcycle" in m},
        "budget": {k: {x: m[x] for x in ("steps", "tokens", "total_steps", "total_tokens", "num_params",
                                         "flops_per_token")} for k, m in models.items()},
        "stage_wall_time_s": summary.get("wall_time_s"),
        "verdict": verdict,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--collect", action="store_true", help="only read an existing summary")
    ap.add_argument("--wall-s", type=float, default=None, help="wall time of the run (with --collect)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bam_cpu.json"))
    args = ap.parse_args()
    wall = args.wall_s
    if not args.collect:
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        rc = subprocess.call(["nice", "-n", "10", sys.executable, "launch/upcycle.py", *OVERRIDES], cwd=REPO, env=env)
        wall = time.perf_counter() - t0
        if rc != 0:
            print(f"launch/upcycle.py exited with {rc}", file=sys.stderr)
            return rc
    record = collect(wall)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["val_loss"], indent=1))
    print(record["verdict"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
