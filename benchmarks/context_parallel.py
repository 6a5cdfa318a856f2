"""Context parallelism on CPU with gloo: activation memory and step time per rank vs cp_degree.

For a fixed total sequence (one packed row of ``--seq-len`` tokens with documents) the hybrid
model (default ``GGGA``) runs forward + backward on ``P`` spawned gloo ranks for each
``P`` in ``--cp`` (1 = the single-device model). Per rank it measures

* saved activation bytes: every tensor autograd saves for backward during one forward
  (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage, parameters excluded;
  the peak of activation memory in training (they are all alive when backward starts);
* peak RSS of the process (``resource.getrusage``, includes the Python/torch runtime);
* step time (median of ``--iters`` forward+backward steps, ``--threads`` torch threads per rank
  as one rank stands for one device; on a 2-core machine P > 2 ranks oversubscribe the cores,
  so only the memory columns are meaningful there).

It also reports the longest sequence whose saved activations fit ``--mem-cap-mib`` per rank,
from a linear fit of the saved bytes measured at ``seq_len / 2`` and ``seq_len`` (activation
memory of these layers is linear in the local length; the fit is printed).

Prints a table of ratios to cp=1 and writes JSON (``--out``). Target: memory(cp=2) <= 0.55 x cp=1.

    python benchmarks/context_parallel.py --seq-len 2048 --cp 1 2 4 --out cp.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _saved_bytes(fn, params: set[int]) -> tuple[int, object]:
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            total += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def _model_and_batch(args, T: int):
    from lctrain.config import ModelConfig
    from lctrain.layers import AttentionConfig, GatedDeltaNetConfig, LightningConfig
    from lctrain.models import HybridLM

    torch.manual_seed(0)
    dh = args.d_model // args.heads
    cfg = ModelConfig(
        vocab_size=args.vocab, d_model=args.d_model, n_layers=len(args.pattern), layer_pattern=args.pattern,
        attn=AttentionConfig(num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=dh),
        gdn=GatedDeltaNetConfig(num_heads=args.heads, head_dim=dh, chunk_size=64),
        lightning=LightningConfig(num_heads=args.heads, head_dim=dh, chunk_size=64),
    )
    model = HybridLM(cfg)
    ids = torch.randint(0, args.vocab, (1, T), generator=torch.Generator().manual_seed(1))
    cu = None
    if args.docs > 1:  # equal documents; their boundaries generally cut zigzag chunks into pieces
        step = T // args.docs
        cu = torch.tensor(sorted({0, *range(step, T - step + 1, step), T}), dtype=torch.int32)
    return model, ids, cu


def _measure(args, rank: int, P: int) -> dict:
    from lctrain.kernels.varlen import default_position_ids
    from lctrain.parallel.context import apply_context_parallel, build_context_parallel, shard_sequence

    res = {}
    cp = build_context_parallel([list(range(P))], args.impl, args.ulysses_degree) if P > 1 else None
    for T in (args.seq_len // 2, args.seq_len):
        model, ids, cu = _model_and_batch(args, T)
        apply_context_parallel(model, cp)
        pos = default_position_ids(1, T, cu)
        local = shard_sequence(ids, P, rank) if cp is not None else ids
        local_pos = shard_sequence(pos, P, rank) if cp is not None else pos
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def step(model=model, local=local, local_pos=local_pos, cu=cu):
            logits = model(local, position_ids=local_pos, cu_seqlens=cu)
            return logits.float().logsumexp(-1).mean()

        saved, loss = _saved_bytes(step, params)
        loss.backward()
        res[f"saved_bytes_{T}"] = saved
    times = []
    for i in range(args.warmup + args.iters):
        model.zero_grad(set_to_none=True)
        if cp is not None:
            dist.barrier()
        t0 = time.perf_counter()
        model(local, position_ids=local_pos, cu_seqlens=cu).float().logsumexp(-1).mean().backward()
        if cp is not None:
            dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    res["step_s"] = statistics.median(times)
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


def _worker(rank: int, P: int, port: int, args, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    if P > 1:
        dist.init_process_group("gloo", rank=rank, world_size=P)
    res = _measure(args, rank, P)
    if P > 1:
        every = [None] * P
        dist.all_gather_object(every, res)
        dist.destroy_process_group()
    else:
        every = [res]
    if rank == 0:
        Path(out_file).write_text(json.dumps(every))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=2048, help="total tokens of the sequence (all ranks)")
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="cp degrees; the first is the baseline")
    ap.add_argument("--impl", default="ring", choices=["ring", "ulysses", "usp"])
    ap.add_argument("--ulysses-degree", type=int, default=1)
    ap.add_argument("--pattern", default="GGGA", help="layer pattern (one block per letter)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--docs", type=int, default=1, help="documents packed in the sequence (1 = one long sequence)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (one rank = one device)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mem-cap-mib", type=float, default=256.0, help="per-rank activation memory budget")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for P in args.cp:
            out_file = os.path.join(tmp, f"cp{P}.json")
            mp.start_processes(_worker, args=(P, _free_port(), args, out_file), nprocs=P, start_method="spawn")
            per_rank = json.loads(Path(out_file).read_text())
            half, full = args.seq_len // 2, args.seq_len
            b_half = max(r[f"saved_bytes_{half}"] for r in per_rank)
            b_full = max(r[f"saved_bytes_{full}"] for r in per_rank)
            slope = (b_full - b_half) / (full - half)  # bytes per token of total sequence
            icept = b_full - slope * full
            cap = args.mem_cap_mib * 2**20
            unit = 2 * P * 64
            max_len = int(max(0.0, (cap - icept) / slope) // unit * unit) if slope > 0 else None
            rows.append({
                "cp_degree": P,
                "saved_activation_bytes": b_full,
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in per_rank),
                "step_s": max(r["step_s"] for r in per_rank),
                "fit_bytes_per_token": slope,
                "fit_intercept_bytes": icept,
                "max_seq_len_under_cap": max_len,
            })
    base = rows[0]
    for r in rows:
        r["activation_ratio"] = r["saved_activation_bytes"] / base["saved_activation_bytes"]
        r["rss_ratio"] = r["peak_rss_bytes"] / base["peak_rss_bytes"]
        r["step_time_ratio"] = r["step_s"] / base["step_s"]
        r["max_seq_len_ratio"] = (
            r["max_seq_len_under_cap"] / base["max_seq_len_under_cap"]
            if r["max_seq_len_under_cap"] and base["max_seq_len_under_cap"] else None
        )
    print(f"context parallelism, {args.impl}, pattern {args.pattern}, d_model {args.d_model}, "
          f"T = {args.seq_len} tokens total in {args.docs} document(s), {args.threads} thread(s) per rank, "
          f"{os.cpu_count()} CPU cores, gloo")
    hdr = f"{'cp':>3} {'act MiB':>9} {'act x':>6} {'RSS MiB':>8} {'RSS x':>6} {'step s':>7} {'time x':>7} " \
          f"{'max T @cap':>11} {'x':>5}"
    print(hdr)
    for r in rows:
        mx = r["max_seq_len_under_cap"]
        print(f"{r['cp_degree']:>3} {r['saved_activation_bytes'] / 2**20:>9.1f} {r['activation_ratio']:>6.3f} "
              f"{r['peak_rss_bytes'] / 2**20:>8.0f} {r['rss_ratio']:>6.3f} {r['step_s']:>7.3f} "
              f"{r['step_time_ratio']:>7.2f} {mx if mx is not None else '-':>11} "
              f"{r['max_seq_len_ratio'] if r['max_seq_len_ratio'] else float('nan'):>5.2f}")
    two = next((r for r in rows if r["cp_degree"] == 2), None)
    if two is not None and base["cp_degree"] == 1:
        ok = two["activation_ratio"] <= 0.55
        print(f"target activation(cp=2) <= 0.55 x cp=1: {two['activation_ratio']:.3f} -> {'met' if ok else 'NOT met'}")
    result = {"config": vars(args), "rows": rows}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
