"""The memory planner's prediction against measured runs on this CPU machine.

For each case (recipe at scale ``cpu``, sequence length, layout), the planner's prediction
(:func:`lctrain.planner.trace_step` on fake tensors and a fake process group of the case's world
size, CPU kernel plan, fp32) is compared with the measurement: the same training step (forward,
backward, clipping, AdamW) on real tensors in real gloo ranks (``torch.multiprocessing``, one per
rank), with PyTorch's memory tracker on the real tensors (``peak_live_mib``, each rank's peak of
live tensor bytes; the largest rank is reported). Also recorded: each measured rank's peak RSS
minus its RSS just before the step (``rss_delta_mib``: what the step added to the process, with
the allocator's and the runtime's own overheads). Prints a table and writes JSON.

    python benchmarks/plan_vs_measured.py --out benchmarks/results/plan_vs_measured_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = [  # (recipe, seq_len, world, overrides)
    *[(r, 8192, 1, []) for r in ("transformer", "gdn", "hybrid_gdn_3to1")],
    *[(r, 8192, 2, ["parallel.cp_degree=2", "parallel.cp_impl=ring"]) for r in ("transformer", "gdn", "hybrid_gdn_3to1")],
    # MoE in bf16 autocast: the fake shape function of torch._grouped_mm accepts bf16 only
    ("hybrid_gdn_3to1_moe", 8192, 1, ["train.dtype=bf16"]),
    ("hybrid_gdn_3to1_moe", 8192, 2, ["parallel.cp_degree=2", "parallel.cp_impl=ring", "train.dtype=bf16"]),
    *[(r, 8192, 2, ["parallel.cp_degree=2", "parallel.cp_impl=ulysses"]) for r in ("transformer", "hybrid_gdn_3to1")],
    ("hybrid_gdn_3to1", 16384, 1, []),
    ("hybrid_gdn_3to1", 16384, 2, ["parallel.cp_degree=2", "parallel.cp_impl=ring"]),
    ("hybrid_gdn_3to1", 8192, 1, ["model.activation_checkpointing=true"]),
    ("hybrid_gdn_3to1", 8192, 2, ["parallel.cp_degree=2", "model.activation_checkpointing=true"]),
    ("hybrid_gdn_3to1", 8192, 2, ["parallel.dp_impl=fsdp"]),
    ("hybrid_gdn_3to1", 8192, 1, ["model.loss_chunk_size=2048"]),
]


def _cfg(recipe, seq_len, overrides):
    from lctrain.config import load_config

    dtype = [] if any(o.startswith("train.dtype=") for o in overrides) else ["train.dtype=fp32"]
    return load_config([f"recipe={recipe}", "scale=cpu", f"data.seq_len={seq_len}", "train.micro_batch_size=1",
                        *dtype, *overrides])


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure_worker(rank, world, port, recipe, seq_len, overrides, out_file):
    from lctrain.planner import trace_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = _cfg(recipe, seq_len, overrides)
        before = _rss_mib()
        est = trace_step(cfg, world, target="cpu", fake=False, rank=rank)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res = {"peak_live_mib": est.peak_live_mib, "parts": est.parts, "rss_delta_mib": peak_rss - before}
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, res)
        else:
            gathered = [res]
        if rank == 0:
            Path(out_file).write_text(json.dumps(gathered))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(recipe, seq_len, world, overrides, tmp: Path) -> list[dict]:
    out = tmp / "measured.json"
    mp.start_processes(_measure_worker, args=(world, _free_port(), recipe, seq_len, overrides, str(out)),
                       nprocs=world, start_method="spawn")
    return json.loads(out.read_text())


def predict(recipe, seq_len, world, overrides):
    from lctrain.planner import fake_process_group, trace_step

    cfg = _cfg(recipe, seq_len, overrides)
    if world > 1:
        with fake_process_group(world):
            return trace_step(cfg, world, target="cpu", fake=True)
    return trace_step(cfg, 1, target="cpu", fake=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/plan_vs_measured_cpu.json")
    ap.add_argument("--first", type=int, default=len(CASES), help="run only the first N cases")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="plan_vs_measured_"))
    rows, t0 = [], time.time()
    for recipe, seq_len, world, overrides in CASES[: args.first]:
        t1 = time.time()
        pred = predict(recipe, seq_len, world, overrides)
        t_pred = time.time() - t1
        meas = measure(recipe, seq_len, world, overrides, tmp)
        m_live = max(r["peak_live_mib"] for r in meas)
        m_rss = max(r["rss_delta_mib"] for r in meas)
        row = {"recipe": recipe, "seq_len": seq_len, "world": world, "overrides": overrides,
               "predicted_live_mib": pred.peak_live_mib, "predicted_parts": pred.parts,
               "measured_live_mib": m_live, "measured_parts": meas[0]["parts"], "measured_rss_delta_mib": m_rss,
               "live_error": pred.peak_live_mib / m_live - 1, "rss_error": pred.peak_live_mib / m_rss - 1,
               "predict_s": t_pred}
        rows.append(row)
        print(f"{recipe:<22} {seq_len:>6} world={world} {' '.join(overrides):<55} predicted {pred.peak_live_mib:8.1f} MiB "
              f"measured {m_live:8.1f} ({row['live_error']:+.1%}) rss-delta {m_rss:8.1f} ({row['rss_error']:+.1%}) "
              f"[{t_pred:.0f} s to predict]", flush=True)
        Path(args.out).write_text(json.dumps({
            "command": "python benchmarks/plan_vs_measured.py " + " ".join(sys.argv[1:]),
            "what": "planner prediction (fake tensors, fake process group) vs the same step on real tensors in gloo "
                    "ranks (MemTracker live-tensor peak of the largest rank) and the step's RSS growth",
            "time_s": time.time() - t0, "rows": rows}, indent=1))
    worst = max(abs(r["live_error"]) for r in rows)
    print(f"largest live-tensor error {worst:.2%} over {len(rows)} cases; wrote {args.out}")


if __name__ == "__main__":
    main()
