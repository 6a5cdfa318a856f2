"""MoE benchmarks: expert compute (grouped GEMM vs segment loop vs per-expert loop) and EP dispatch.

Part 1 times forward + backward of the routed experts on one process for a few shapes:
``grouped`` (``torch._grouped_mm``), ``loop`` (sorted-segment loop) and ``per_expert`` (the
masked per-expert reference, ``lctrain.kernels.moe.naive``); ratios are against ``loop``.

Part 2 times one MoE layer's forward + backward (router, all-to-all dispatch, experts, combine)
per rank on gloo with ``ep_degree`` in 1, 2, 4 (world = ep, each rank its own tokens); ratios
are against ep=1. On a CPU host the ranks share the cores, so only ratios within one run mean
anything; absolute times count only on GPUs.

    python benchmarks/moe.py --out moe.json [--tokens 2048 --repeats 5 --ep 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lctrain.config import MoEConfig
from lctrain.kernels.moe import grouped_mm_supported, grouped_swiglu, moe_ffn_reference


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_expert_compute(tokens: int, repeats: int) -> list[dict]:
    rows = []
    for E, K, D, Fh in [(8, 2, 256, 384), (32, 4, 256, 128), (64, 8, 128, 64)]:
        torch.manual_seed(0)
        x = torch.randn(tokens, D, requires_grad=True)
        gu = (torch.randn(E, D, 2 * Fh) * 0.05).requires_grad_()
        dn = (torch.randn(E, Fh, D) * 0.05).requires_grad_()
        idx = torch.topk(torch.randn(tokens, E), K).indices
        w = torch.rand(tokens, K)
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        tok = torch.arange(tokens).repeat_interleave(K)[order]
        counts = torch.bincount(flat, minlength=E)

        def run(impl):
            def f():
                y = grouped_swiglu(x[tok], counts, gu, dn, impl)
                y.square().mean().backward()
            return f

        def ref():
            moe_ffn_reference(x, idx, w, gu, dn).square().mean().backward()

        t = {"loop": _time(run("loop"), repeats), "per_expert": _time(ref, repeats)}
        if grouped_mm_supported(x, gu, dn):
            t["grouped"] = _time(run("grouped"), repeats)
        rows.append({"experts": E, "top_k": K, "d_model": D, "hidden": Fh, "tokens": tokens,
                     "time_s": t, "speedup_vs_loop": {k: t["loop"] / v for k, v in t.items()}})
    return rows


def _ep_worker(rank: int, world: int, port: int, tokens: int, repeats: int, out: str) -> None:
    import torch.distributed as dist

    from lctrain.layers.moe import MoE
    from lctrain.parallel.expert import build_expert_parallel, shard_experts

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        layer = MoE(256, MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=256), 1024)
        layer.reset_parameters(0.02, 0.01)
        if world > 1:
            shard_experts(layer, build_expert_parallel("cpu", world))
        x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(rank), requires_grad=True)

        def step():
            layer(x).square().mean().backward()
            if world > 1:
                dist.barrier()

        t = _time(step, repeats)
        if rank == 0:
            Path(out).write_text(json.dumps({"time_s": t}))
    finally:
        dist.destroy_process_group()


def bench_dispatch(eps: list[int], tokens: int, repeats: int) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ep in eps:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = os.path.join(tmp, f"ep{ep}.json")
            mp.start_processes(_ep_worker, args=(ep, port, tokens, repeats, out), nprocs=ep, start_method="spawn")
            rows.append({"ep_degree": ep, "tokens_per_rank": tokens, **json.loads(Path(out).read_text())})
    base = rows[0]["time_s"]
    for r in rows:
        r["time_vs_ep1"] = r["time_s"] / base
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ep", default="1,2,4")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    compute = bench_expert_compute(args.tokens, args.repeats)
    print("expert compute, forward+backward (ratio = loop time / time; > 1 is faster than loop)")
    print(f"{'E':>4} {'K':>3} {'D':>5} {'F':>5} | {'loop ms':>8} {'grouped':>8} {'per_expert':>10}")
    for r in compute:
        s = r["speedup_vs_loop"]
        print(f"{r['experts']:>4} {r['top_k']:>3} {r['d_model']:>5} {r['hidden']:>5} | {1e3 * r['time_s']['loop']:8.1f} "
              f"{s.get('grouped', float('nan')):8.2f}x {s['per_expert']:9.2f}x")
    dispatch = bench_dispatch([int(e) for e in args.ep.split(",")], args.tokens // 4, args.repeats)
    print("\nMoE layer forward+backward per rank on gloo (8 experts, top-2, D=256, F=256)")
    print(f"{'ep':>3} | {'ms':>8} {'vs ep=1':>8}")
    for r in dispatch:
        print(f"{r['ep_degree']:>3} | {1e3 * r['time_s']:8.1f} {r['time_vs_ep1']:7.2f}x")
    result = {"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "expert_compute": compute, "ep_dispatch": dispatch}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
