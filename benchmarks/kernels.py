"""All kernel benchmarks in one run: Gated DeltaNet (``bench_gdn``) then attention and Lightning
Attention (``bench_attention``); each prints its ratio table against the baselines measured in the
same run.

Usage::

    python benchmarks/kernels.py [--cpu] [--out results.json]

``--cpu`` runs only the torch paths at small sizes in fp32 (no GPU needed); without it the
defaults are the GPU sweep (bf16, H = 16, D = 128, T = 2K..64K). ``--out`` writes
``{"gated_delta_rule": ..., "attention": ...}`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_attention  # noqa: E402
import bench_gdn  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="torch paths only, fp32, small sizes")
    ap.add_argument("--out", default=None, help="write both result sets as JSON here")
    args = ap.parse_args(argv)
    common = ["--cpu"] if args.cpu else []
    results = {"gated_delta_rule": bench_gdn.main(common), "attention": bench_attention.main(common)}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
