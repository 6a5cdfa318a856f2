"""The longest trainable ``seq_len`` per recipe and GPU count, from the memory planner.

For each (recipe, scale) and each GPU count, :func:`lctrain.planner.cli.longest_seq_len` traces
one training step on fake tensors (CUDA kernel plan, bf16 autocast, FSDP over all ranks,
activation checkpointing, the chunked loss, ``cp_degree`` = the GPU count with ring attention)
and finds the longest sequence whose predicted per-rank peak (live tensors + 1 GiB context + 10%
fragmentation) fits the GPU. Writes JSON and prints the table the README's "What fits" section
shows.

    python benchmarks/what_fits.py --out benchmarks/results/what_fits_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRITON_INTERPRET", "1")  # the CUDA plan's Triton ops are traced (fake), never launched

MATRIX = [("transformer", "8b"), ("hybrid_gdn_3to1", "8b"), ("hybrid_gdn_3to1", "1.3b"), ("hybrid_gdn_3to1_moe", "1.3b")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", default="h100-80gb")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--out", default="benchmarks/results/what_fits_h100.json")
    ap.add_argument("--only", nargs="*", default=None, help="recipe:scale pairs to run (default: all)")
    args = ap.parse_args()

    import dataclasses

    from lctrain.config import load_config
    from lctrain.planner.cli import longest_seq_len
    from lctrain.planner.memory import GPUS

    capacity = GPUS[args.gpu]
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"rows": []}
    result.update(command="python benchmarks/what_fits.py " + " ".join(sys.argv[1:]), gpu=args.gpu, capacity_mib=capacity)
    done = {(r["recipe"], r["scale"], r["gpus"]) for r in result["rows"]}
    for recipe, scale in MATRIX:
        if args.only and f"{recipe}:{scale}" not in args.only:
            continue
        cfg = load_config([f"recipe={recipe}", f"scale={scale}"])
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, cp_impl="ring"))
        for n in args.gpus:
            if (recipe, scale, n) in done:
                continue
            t0 = time.time()
            print(f"{recipe} {scale} on {n} x {args.gpu}:", flush=True)
            found = longest_seq_len(cfg, n, capacity, "cuda", impls=("ring",))
            best = found[0] if found else None
            result["rows"].append({"recipe": recipe, "scale": scale, "gpus": n, "seq_len": best and best["seq_len"],
                                   "predicted_peak_mib": best and best["predicted_peak_mib"],
                                   "parts": best and best["parts"], "overrides": best and best["overrides"],
                                   "time_s": time.time() - t0})
            result["rows"].sort(key=lambda r: (r["recipe"], r["scale"], r["gpus"]))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
    print(f"{'recipe':<22} {'scale':<6} " + " ".join(f"{n:>4} GPU{'s' if n > 1 else ' '}   " for n in args.gpus))
    for recipe, scale in MATRIX:
        cells = []
        for n in args.gpus:
            row = next((r for r in result["rows"] if (r["recipe"], r["scale"], r["gpus"]) == (recipe, scale, n)), None)
            cells.append(f"{(row['seq_len'] or 0) / 1024:>8.0f}K" if row else f"{'-':>9}")
        print(f"{recipe:<22} {scale:<6} " + "   ".join(cells))


if __name__ == "__main__":
    main()
