"""Same-budget comparison of mixer recipes on the built-in corpus (the issue experiments' table).

Runs each recipe with ``torchrun --nproc_per_node=N launch/train.py recipe=R train.out_dir=...``
at the same scale, steps, batch and seed (so the same tokens in the same order), then collects
validation loss / perplexity, tokens/s, wall time and the routing figures each run's
``summary.json`` holds (active-head fraction for MoH, expert load for MoA / LoRA-Mixer, attended
fraction for MoBA). Results merge into ``--out`` (JSON), keyed by recipe, so recipes can be run
in separate invocations; the first recipe listed (default ``hybrid_gdn_3to1``) is the baseline
for the printed ratios::

    python benchmarks/compare_mixers.py --recipes hybrid_gdn_3to1 hybrid_gdn_moba \\
        --out benchmarks/results/compare_mixers_cpu.json
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


def run_recipe(recipe: str, args) -> dict:
    out_dir = Path(args.runs) / recipe
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--master_addr=127.0.0.1",
           f"--master_port={args.port}", str(REPO / "launch" / "train.py"), f"recipe={recipe}", f"scale={args.scale}",
           f"train.out_dir={out_dir}", f"train.max_steps={args.steps}", "train.resume=none", "train.progress=false",
           f"train.seed={args.seed}", *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    s = json.loads((out_dir / "summary.json").read_text())
    row = {
        "command": " ".join(cmd[1:]), "wall_s": wall, "steps": s["steps"], "tokens": s["tokens"],
        "num_params": s["num_params"], "tokens_per_s": s["tokens_per_s"],
        "initial_val_loss": s["initial_val_loss"], "final_val_loss": s["final_val_loss"],
        "final_val_ppl": s["final_val_ppl"], "val_history": s["val_history"], "final_train_loss": s["final_train_loss"],
    }
    if s.get("moe"):
        row["routing"] = {k: (v[-10:] if isinstance(v, list) else v) for k, v in s["moe"].items() if k != "final_layers"}
    if s.get("attended_fraction"):
        fr = s["attended_fraction"]
        row["attended_fraction"] = sum(fr) / len(fr)
    if s.get("active_head_fraction") is not None:
        row["active_head_fraction"] = s["active_head_fraction"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["hybrid_gdn_3to1"])
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--port", type=int, default=29533)
    ap.add_argument("--runs", default=str(REPO / "runs" / "compare"))
    ap.add_argument("--out", default="")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every recipe")
    args = ap.parse_args()
    results = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
    results.setdefault("_about", {"scale": args.scale, "steps": args.steps, "seed": args.seed, "nproc": args.nproc,
                                  "threads_per_rank": args.threads, "machine": f"{os.cpu_count()} CPU cores"})
    for recipe in args.recipes:
        print(f"[compare] {recipe} ...", flush=True)
        results[recipe] = run_recipe(recipe, args)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    base = results.get("hybrid_gdn_3to1")
    print(f"{'recipe':28s} {'val loss':>9s} {'val ppl':>9s} {'tok/s':>8s} {'vs dense':>9s} {'wall s':>7s}  extra")
    for recipe, r in results.items():
        if recipe.startswith("_"):
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        extra = {k: r[k] for k in ("attended_fraction", "active_head_fraction") if k in r}
        print(f"{recipe:28s} {r['final_val_loss']:9.4f} {r['final_val_ppl']:9.1f} {r['tokens_per_s']:8.0f} "
              f"{ratio:9.2f} {r['wall_s']:7.0f}  {extra}")


if __name__ == "__main__":
    main()
