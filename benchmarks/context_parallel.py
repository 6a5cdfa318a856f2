"""Context parallelism on CPU with gloo: what a user feels (trainer runs), and saved activations.

``--mode train`` (default): real training runs, ``launch/train.py`` (one process) or ``torchrun
--nproc_per_node=2 launch/train.py parallel.cp_degree=2 parallel.cp_impl=ring|ulysses``, for each
recipe in ``--recipes`` (default ``transformer gdn hybrid_gdn_3to1``, scale ``cpu``) and each
``--seq-lens`` (one sequence of that many tokens per step: ``train.global_batch_size=1``),
``--steps`` optimizer steps, no validation, a warm data cache (``runs/.cache/data``, filled by a
first unmeasured run), ``OMP_NUM_THREADS=1`` per rank (one rank stands for
one device, so cp=2 uses both cores of a 2-core machine and cp=1 one). From each run's
``summary.json``: ``peak_rss_mib`` (each rank's ``getrusage(RUSAGE_SELF).ru_maxrss``,
all-reduced max: the memory the largest rank needed, runtime included) and ``tokens_per_s``
(training steps only). Ratios are against cp=1 of the same recipe and length, measured in the
same invocation; the longest sequence under ``--mem-cap-mib`` per rank is read off a straight
line through each configuration's measured peaks (peak memory is linear in the sequence length
here). Targets (issue 20): peak(cp=2) <= 0.6 x cp=1 and tokens/s(cp=2) >= 1.0 x cp=1 at 16K.

    python benchmarks/context_parallel.py --seq-lens 8192 16384 --out benchmarks/results/context_parallel_train_cpu.json

``--mode activations``: activation memory and step time per rank vs cp_degree, on spawned
ranks without the trainer. For a fixed total sequence (one packed row of ``--seq-len`` tokens with documents) the hybrid
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

    python benchmarks/context_parallel.py --mode activations --seq-len 2048 --cp 1 2 4 --out cp.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
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



# ----------------------------------------------------------------------------------------- --mode train
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"cp1": (1, None), "ring": (2, "ring"), "ulysses": (2, "ulysses")}


def _train_command(recipe: str, seq_len: int, config: str, steps: int, out_dir: Path, extra: list[str]) -> list[str]:
    cp, impl = CONFIGS[config]
    args = [
        f"recipe={recipe}", "scale=cpu", f"data.seq_len={seq_len}", f"train.max_steps={steps}",
        "train.global_batch_size=1", "train.micro_batch_size=1", "train.eval_every=0", "data.val_fraction=0",
        "train.checkpoint_every=0", "train.keep_last=1", f"train.out_dir={out_dir}", "train.resume=none",
        "train.progress=false", "train.tensorboard=false", f"data.cache_dir={ROOT / 'runs' / '.cache' / 'data'}",
        *extra,
    ]
    if cp == 1:
        return [sys.executable, str(ROOT / "launch" / "train.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cp}", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", str(ROOT / "launch" / "train.py"), *args,
            f"parallel.cp_degree={cp}", f"parallel.cp_impl={impl}"]


def _fit_max_len(points: list[tuple[int, float]], cap_mib: float) -> int | None:
    """Longest length whose peak stays under ``cap_mib``, from the line through the measured (T, peak) points."""
    if len(points) < 2:
        return None
    xs, ys = [float(t) for t, _ in points], [m for _, m in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if slope <= 0:
        return None
    return int((cap_mib - (my - slope * mx)) / slope // 1024 * 1024)


def main_train(args) -> dict:
    rows = []
    t_start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        # warm the data cache (tokenizer, token streams, prepared manifest) so no measured run builds it
        warm = _train_command(args.recipes[0], 512, "cp1", 1, Path(tmp) / "warm", args.extra)
        subprocess.run(warm, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        for recipe in args.recipes:
            for T in args.seq_lens:
                for config in args.configs:
                    out_dir = Path(tmp) / f"{recipe}_{T}_{config}"
                    cmd = _train_command(recipe, T, config, args.steps, out_dir, args.extra)
                    t0 = time.perf_counter()
                    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
                    wall = time.perf_counter() - t0
                    if proc.returncode != 0:
                        print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
                        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}")
                    summary = json.loads((out_dir / "summary.json").read_text())
                    row = {"recipe": recipe, "seq_len": T, "config": config, "cp_degree": CONFIGS[config][0],
                           "cp_impl": CONFIGS[config][1], "peak_rss_mib": summary["peak_rss_mib"],
                           "tokens_per_s": summary["tokens_per_s"], "wall_s": round(wall, 1),
                           "command": " ".join(Path(c).name if c == sys.executable else c for c in cmd
                                               if not c.startswith("train.out_dir=") and "master_port" not in c)}
                    rows.append(row)
                    print(f"{recipe:>16} T={T:>6} {config:>8}: peak {row['peak_rss_mib']:7.0f} MiB, "
                          f"{row['tokens_per_s']:7.0f} tokens/s ({wall:.0f} s)", flush=True)
    for r in rows:
        base = next((b for b in rows if b["recipe"] == r["recipe"] and b["seq_len"] == r["seq_len"]
                     and b["config"] == "cp1"), None)
        r["peak_ratio"] = r["peak_rss_mib"] / base["peak_rss_mib"] if base else None
        r["tokens_per_s_ratio"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
    fits = []
    for recipe in args.recipes:
        for config in args.configs:
            pts = [(r["seq_len"], r["peak_rss_mib"]) for r in rows if r["recipe"] == recipe and r["config"] == config]
            fits.append({"recipe": recipe, "config": config, "mem_cap_mib": args.mem_cap_mib,
                         "max_seq_len_under_cap": _fit_max_len(pts, args.mem_cap_mib)})
    print(f"\n{'recipe':>16} {'T':>6} {'config':>8} {'peak MiB':>9} {'x cp1':>6} {'tok/s':>7} {'x cp1':>6}")
    for r in rows:
        print(f"{r['recipe']:>16} {r['seq_len']:>6} {r['config']:>8} {r['peak_rss_mib']:>9.0f} "
              f"{r['peak_ratio']:>6.2f} {r['tokens_per_s']:>7.0f} {r['tokens_per_s_ratio']:>6.2f}")
    for f in fits:
        print(f"{f['recipe']:>16} {f['config']:>8}: longest sequence under {f['mem_cap_mib']:.0f} MiB per rank "
              f"~ {f['max_seq_len_under_cap']}")
    checks = []
    for r in rows:
        if r["config"] != "cp1" and r["seq_len"] == args.target_len:
            checks.append({"recipe": r["recipe"], "config": r["config"], "peak_ratio": r["peak_ratio"],
                           "peak_ok": r["peak_ratio"] <= 0.6, "tokens_per_s_ratio": r["tokens_per_s_ratio"],
                           "speed_ok": r["tokens_per_s_ratio"] >= 1.0})
    gdn = next((r for r in rows if r["recipe"] == "gdn" and r["seq_len"] == args.target_len and r["config"] == "cp1"),
               None)
    attn = next((r for r in rows if r["recipe"] == "transformer" and r["seq_len"] == args.target_len
                 and r["config"] == "cp1"), None)
    gdn_vs_attn = gdn["peak_rss_mib"] / attn["peak_rss_mib"] if gdn and attn else None
    for c in checks:
        print(f"target at {args.target_len}: {c['recipe']} {c['config']}: peak {c['peak_ratio']:.2f}x "
              f"({'met' if c['peak_ok'] else 'NOT met'}), tokens/s {c['tokens_per_s_ratio']:.2f}x "
              f"({'met' if c['speed_ok'] else 'NOT met'})")
    if gdn_vs_attn is not None:
        print(f"target at {args.target_len}: all-GDN peak / all-attention peak at cp=1 = {gdn_vs_attn:.2f} "
              f"({'met' if gdn_vs_attn <= 1.2 else 'NOT met'}; <= 1.2)")
    import platform

    result = {
        "benchmark": "context_parallel_train",
        "command": "python benchmarks/context_parallel.py " + " ".join(sys.argv[1:]),
        "machine": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "total_time_s": round(time.perf_counter() - t_start, 1),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows, "max_seq_len_fits": fits, "checks": checks, "gdn_over_attention_peak_cp1": gdn_vs_attn,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="train", choices=["train", "activations"])
    ap.add_argument("--recipes", nargs="+", default=["transformer", "gdn", "hybrid_gdn_3to1"], help="train mode")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768], help="train mode")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="train mode")
    ap.add_argument("--steps", type=int, default=3, help="train mode: optimizer steps per run")
    ap.add_argument("--target-len", type=int, default=16384, help="train mode: length of the issue's targets")
    ap.add_argument("--extra", nargs="*", default=[], help="train mode: more key=value overrides for every run")
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
    ap.add_argument("--mem-cap-mib", type=float, default=None,
                    help="per-rank memory budget (default: 256 MiB of activations; train mode: 4096 MiB of RSS)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.mode == "train":
        args.mem_cap_mib = args.mem_cap_mib or 4096.0
        return main_train(args)
    args.mem_cap_mib = args.mem_cap_mib or 256.0

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
