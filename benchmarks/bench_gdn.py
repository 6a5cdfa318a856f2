"""Benchmark the chunked gated delta rule: Triton kernel vs the torch chunk path (vs fla if present).

    python benchmarks/bench_gdn.py --out gdn.json                 # CUDA, bf16, H=16, D=128
    python benchmarks/bench_gdn.py --cpu --out gdn_cpu.json       # CPU: torch path only, fp32, small T
    git show REV:lctrain/kernels/gated_delta_rule/chunk.py > /tmp/chunk_before.py
    python benchmarks/bench_gdn.py --cpu --baseline /tmp/chunk_before.py --out gdn_cpu_scaling.json

Each configuration packs ``max(T, --tokens)`` tokens as B=1 varlen documents of length T
(``cu_seqlens``), so the work per row is constant and only the document length changes. Times
forward, backward (``autograd.grad`` of a retained graph) and forward+backward, and prints the
ratio ``provider time / triton time`` (``/ torch time`` on CPU).

FLOP count (matmul FLOPs, 2 per multiply-add, per token and value head; C = 64 chunk size, K / V
head dims; the triangular masks are counted as full C x C products):

    fwd = 6 K V            (nv = U - W S,  S' = S + Kd^T nv,  O_inter = Qd S)
        + 6 C K            (K K^T,  W = X Kbg,  Q K^T)
        + 4 C V            (U = X Vb,  O_intra = Aqk nv)
    FLOPs_fwd = tokens * HV * fwd,  FLOPs_bwd = 2 * FLOPs_fwd,  FLOPs_fwd+bwd = 3 * FLOPs_fwd

(the usual 1:2 forward:backward convention; the Triton backward also recomputes the forward
states, which is not counted). TFLOP/s = FLOPs / time.

Timing: ``triton.testing.do_bench`` (CUDA events, median) on GPU; ``time.perf_counter`` (median
of ``--iters``) on CPU. A provider that fails (missing package, OOM) is reported as null. The
JSON records the load averages at start and end (``loadavg_*``): CPU timings taken while other
processes run are not comparable.

CPU scaling (``--cpu``; JSON keys ``scaling`` and ``memory``): the torch chunk path on ONE
sequence of T tokens (B = 1, no ``cu_seqlens``; ``--scaling-heads`` H = 4, K = V = ``--dim`` 64,
fp32, T = ``--scaling-T``, default 2K 4K 8K 16K): fwd and fwd+bwd (``autograd.grad`` of o with a
random cotangent) times, median and minimum (``*_min``, less sensitive to other load) over
``--iters``, and the growth ratio ``fwd+bwd(T_max) / fwd+bwd(T_min)`` (8 for linear time from
2K to 16K). ``--baseline FILE`` loads ``chunk_gated_delta_rule`` from another copy of
``chunk.py`` (e.g. an older revision) and measures it in the same run, alternating with this
checkout's every iteration, for before/after ratios. At ``--memory-T`` (default the largest
scaling T) a fresh subprocess per implementation records the bytes saved for backward
(``torch.autograd.graph.saved_tensors_hooks``: the sum over saved tensors, and over distinct
storages) and the peak RSS of one fwd+bwd (``VmHWM``, reset just before it), next to the RSS
before it. Threads: torch's default (``torch.get_num_threads()``, recorded).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule

C = 64


def flops_fwd(tokens: int, hv: int, k: int, v: int) -> float:
    """Forward matmul FLOPs of the chunked gated delta rule (formula in the module docstring)."""
    return float(tokens) * hv * (6 * k * v + 6 * C * k + 4 * C * v)


def providers(device: str) -> dict:
    """name -> fn(q, k, v, g, beta, cu_seqlens) -> o, for every provider usable on ``device``."""
    out = {"torch": lambda q, k, v, g, b, cu: chunk_gated_delta_rule(q, k, v, g, b, cu_seqlens=cu)[0]}
    if device == "cuda":
        try:
            from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule_triton, triton_available

            if triton_available("cuda"):
                out["triton"] = lambda q, k, v, g, b, cu: chunk_gated_delta_rule_triton(q, k, v, g, b, cu_seqlens=cu)[0]
        except Exception as e:
            print(f"triton provider unavailable: {e!r}")
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

            out["fla"] = lambda q, k, v, g, b, cu: fla_chunk(q, k, v, g, b, cu_seqlens=cu.long())[0]
        except Exception as e:
            print(f"fla provider unavailable: {type(e).__name__}: {e}")
    return out


def make_inputs(T: int, tokens: int, H: int, D: int, dtype, device):
    n_docs = max(1, tokens // T)
    total = n_docs * T
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, total, H, D, generator=gen)
    k = F.normalize(torch.randn(1, total, H, D, generator=gen), dim=-1)
    v = torch.randn(1, total, H, D, generator=gen)
    g = F.logsigmoid(torch.randn(1, total, H, generator=gen) + 2.0)
    beta = torch.sigmoid(torch.randn(1, total, H, generator=gen))
    leaves = [x.to(device=device, dtype=dtype if x.dim() == 4 else torch.float32).requires_grad_()
              for x in (q, k, v, g, beta)]
    cu = torch.arange(n_docs + 1, dtype=torch.int32, device=device) * T
    return leaves, cu, total


def time_fn(fn, device: str, warmup: int, iters: int, stats: dict | None = None) -> float:
    """Median milliseconds of fn(); on CPU also fills ``stats`` with ``min`` and all ``times``."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25 * warmup, rep=100 * iters))
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    if stats is not None:
        stats.update(min=min(ts), times=ts)
    return statistics.median(ts)


def bench_one(fn, leaves, cu, device, warmup, iters) -> dict:
    def fwd():
        with torch.no_grad():
            fn(*leaves, cu)

    o = fn(*leaves, cu)
    do = torch.randn_like(o)

    def bwd():
        torch.autograd.grad(o, leaves, do, retain_graph=True)

    def fwd_bwd():
        torch.autograd.grad(fn(*leaves, cu), leaves, do)

    res = {"fwd_ms": time_fn(fwd, device, warmup, iters), "bwd_ms": time_fn(bwd, device, warmup, iters)}
    res["fwd_bwd_ms"] = time_fn(fwd_bwd, device, warmup, iters)
    return res


def load_kernel(path: str | None):
    """``chunk_gated_delta_rule`` of this checkout, or of the ``chunk.py`` copy at ``path``."""
    if path is None:
        return chunk_gated_delta_rule
    spec = importlib.util.spec_from_file_location("gdn_chunk_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.chunk_gated_delta_rule


def single_sequence_inputs(T: int, H: int, D: int, seed: int = 0) -> list[torch.Tensor]:
    """fp32 CPU leaves q, k (L2-normalised) [1, T, H, D], v [1, T, H, D], g, beta [1, T, H]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, D, generator=gen)
    k = F.normalize(torch.randn(1, T, H, D, generator=gen), dim=-1)
    v = torch.randn(1, T, H, D, generator=gen)
    g = F.logsigmoid(torch.randn(1, T, H, generator=gen) + 2.0)
    beta = torch.sigmoid(torch.randn(1, T, H, generator=gen))
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def bench_scaling(fns: dict, Ts: list[int], H: int, D: int, warmup: int, iters: int) -> dict:
    """fwd and fwd+bwd ms of each ``fns`` entry on one sequence of each T, interleaved.

    The implementations alternate inside every iteration (so a change of machine load hits
    all of them alike). Returns ``{name: {"rows": [...], "growth_*": ...}}`` with the median
    and min over ``iters`` per T, and the growth ratio ``T_max / T_min`` of both.
    """
    out = {name: {"rows": []} for name in fns}
    for T in Ts:
        leaves = single_sequence_inputs(T, H, D)
        do = torch.randn(1, T, H, D, generator=torch.Generator().manual_seed(1))
        times = {name: {"fwd": [], "fwd_bwd": []} for name in fns}
        for it in range(warmup + iters):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                with torch.no_grad():
                    fn(*leaves)
                t1 = time.perf_counter()
                torch.autograd.grad(fn(*leaves)[0], leaves, do)
                t2 = time.perf_counter()
                if it >= warmup:
                    times[name]["fwd"].append((t1 - t0) * 1e3)
                    times[name]["fwd_bwd"].append((t2 - t1) * 1e3)
        for name in fns:
            f, fb = times[name]["fwd"], times[name]["fwd_bwd"]
            row = {
                "T": T, "fwd_ms": statistics.median(f), "fwd_bwd_ms": statistics.median(fb),
                "fwd_ms_min": min(f), "fwd_bwd_ms_min": min(fb), "fwd_bwd_ms_all": fb,
            }
            row["fwd_bwd_us_per_token"] = row["fwd_bwd_ms"] * 1e3 / T
            out[name]["rows"].append(row)
            print(f"  {name:>8} T={T:>6}  fwd {row['fwd_ms']:9.2f} ms  fwd+bwd {row['fwd_bwd_ms']:9.2f} ms "
                  f"(min {row['fwd_bwd_ms_min']:9.2f})  ({row['fwd_bwd_us_per_token']:.2f} us/token)",
                  flush=True)
    for res in out.values():
        rows = res["rows"]
        lo, hi = min(rows, key=lambda r: r["T"]), max(rows, key=lambda r: r["T"])
        res.update({
            "growth_fwd_bwd": hi["fwd_bwd_ms"] / lo["fwd_bwd_ms"],
            "growth_fwd_bwd_min": hi["fwd_bwd_ms_min"] / lo["fwd_bwd_ms_min"],
            "growth_fwd": hi["fwd_ms"] / lo["fwd_ms"],
            "growth_tokens": hi["T"] / lo["T"],
            "growth_of": f"T={hi['T']} / T={lo['T']}",
        })
    return out


def _proc_status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or None where unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_child(T: int, H: int, D: int, baseline: str | None) -> dict:
    """Saved-for-backward bytes and peak RSS of one fwd+bwd (run in a fresh process).

    Peak RSS is ``VmHWM`` of ``/proc/self/status`` (reset after exec, unlike ``ru_maxrss``, which
    keeps the parent's peak across fork + exec), reset again just before the forward when the
    kernel allows it (``peak_reset``), so it is the peak of the fwd+bwd alone (including the
    memory already resident before it, ``rss_before_fwd_mib``).
    """
    fn = load_kernel(baseline)
    leaves = single_sequence_inputs(T, H, D)
    do = torch.randn(1, T, H, D)
    saved = {"bytes": 0, "count": 0}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved["bytes"] += t.numel() * t.element_size()
        saved["count"] += 1
        st = t.untyped_storage()
        storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    peak_before = _proc_status_kib("VmHWM")
    reset = _reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = fn(*leaves)[0]
    torch.autograd.grad(o, leaves, do)
    peak = _proc_status_kib("VmHWM")
    if peak is None:  # no /proc: ru_maxrss (KiB on Linux; may include the parent's peak)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    input_bytes = sum(x.numel() * x.element_size() for x in leaves)
    mib = lambda kib: None if kib is None else kib / 1024  # noqa: E731
    return {
        "T": T, "heads": H, "dim": D,
        "saved_bytes": saved["bytes"], "saved_tensors": saved["count"],
        "saved_unique_storage_bytes": sum(storages.values()),
        "saved_bytes_per_token": saved["bytes"] / T,
        "input_bytes": input_bytes,
        "rss_before_fwd_mib": mib(rss_before), "peak_rss_before_fwd_mib": mib(peak_before),
        "peak_reset": reset, "peak_rss_fwd_bwd_mib": mib(peak),
        "peak_rss_increase_mib": None if rss_before is None or not reset else (peak - rss_before) / 1024,
    }


def measure_memory(T: int, H: int, D: int, baseline: str | None) -> dict | None:
    """:func:`memory_child` in a subprocess (so the peak RSS is this fwd+bwd's alone)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(T), str(H), str(D)]
    if baseline:
        cmd += ["--baseline", baseline]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"memory child failed: {r.stderr[-500:]}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_cpu_scaling(args, D: int) -> tuple[dict, dict]:
    """The CPU scaling and memory sections (this checkout, and ``--baseline`` if given)."""
    impls = {"torch": None}
    if args.baseline:
        impls["baseline"] = args.baseline
    H = args.scaling_heads
    print(f"\nCPU scaling: one sequence, B=1 H={H} K=V={D} fp32, threads={torch.get_num_threads()}")
    scaling = {
        "heads": H, "dim": D, "threads": torch.get_num_threads(),
        "baseline_file": args.baseline, "baseline_label": args.baseline_label,
    }
    for name, path in impls.items():
        print(f" {name}: {path or 'this checkout'}")
    scaling.update(bench_scaling({n: load_kernel(p) for n, p in impls.items()}, args.scaling_T, H, D,
                                 args.warmup, args.iters))
    for name in impls:
        sc = scaling[name]
        print(f" {name}: growth fwd+bwd {sc['growth_of']}: {sc['growth_fwd_bwd']:.2f}x median, "
              f"{sc['growth_fwd_bwd_min']:.2f}x min (tokens {sc['growth_tokens']:.0f}x)")
    memory = {}
    mem_T = args.memory_T if args.memory_T is not None else max(args.scaling_T)
    if mem_T > 0:
        for name, path in impls.items():
            memory[name] = measure_memory(mem_T, H, D, path)
    if "baseline" in impls:
        b, t = scaling["baseline"], scaling["torch"]
        scaling["speedup_vs_baseline"] = {
            str(rb["T"]): rb["fwd_bwd_ms"] / rt["fwd_bwd_ms"] for rb, rt in zip(b["rows"], t["rows"])
        }
        print("  fwd+bwd speedup vs baseline: " + "  ".join(
            f"T={k}: {v:.2f}x" for k, v in scaling["speedup_vs_baseline"].items()))
    for name, m in memory.items():
        if m:
            print(f" memory {name} T={m['T']}: saved for backward {m['saved_bytes'] / 2**20:.1f} MiB "
                  f"({m['saved_bytes_per_token'] / 1024:.2f} KiB/token), "
                  f"peak RSS {m['peak_rss_fwd_bwd_mib']:.0f} MiB "
                  f"(RSS before fwd {m['rss_before_fwd_mib']:.0f} MiB)")
    if memory.get("baseline") and memory.get("torch"):
        ratio = memory["baseline"]["saved_bytes"] / memory["torch"]["saved_bytes"]
        memory["saved_ratio_baseline_over_torch"] = ratio
    return scaling, memory


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU run: torch path only, fp32, small T")
    ap.add_argument("--T", type=int, nargs="*", help="document lengths (default 2K..64K on GPU, 128 256 on CPU)")
    ap.add_argument("--tokens", type=int, help="tokens per run (default 64K on GPU, max(T) on CPU)")
    ap.add_argument("--heads", type=int, default=None, help="heads H (default 16 on GPU, 2 on CPU)")
    ap.add_argument("--dim", type=int, default=None, help="head dim K = V (default 128 on GPU, 64 on CPU)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", type=str, default=None, help="write results as JSON here")
    ap.add_argument("--scaling-T", type=int, nargs="*", default=[2048, 4096, 8192, 16384],
                    help="CPU: single-sequence lengths of the scaling run (none: skip it)")
    ap.add_argument("--scaling-heads", type=int, default=4, help="CPU scaling run: heads H")
    ap.add_argument("--memory-T", type=int, default=None,
                    help="CPU: T of the saved-bytes / peak-RSS run (default max scaling T; 0: skip)")
    ap.add_argument("--baseline", type=str, default=None,
                    help="CPU: path of another chunk.py copy to measure in the same scaling run")
    ap.add_argument("--baseline-label", type=str, default=None,
                    help="what --baseline is (e.g. 'chunk.py at commit abc1234'), recorded in the JSON")
    ap.add_argument("--memory-child", type=int, nargs=3, metavar=("T", "H", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, args.baseline)))
        return {}

    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.cpu:
        print("no CUDA device: running the CPU configuration (same as --cpu)")
    Ts = args.T or ([2048, 4096, 8192, 16384, 32768, 65536] if device == "cuda" else [128, 256])
    tokens = args.tokens or (65536 if device == "cuda" else max(Ts))
    H = args.heads or (16 if device == "cuda" else 2)
    D = args.dim or (128 if device == "cuda" else 64)
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    provs = providers(device)
    base = "triton" if "triton" in provs else "torch"
    load_start = os.getloadavg()
    print(f"device={device} dtype={dtype_name} H={H} D={D} tokens/run={tokens} providers={list(provs)} base={base}")

    rows = []
    for T in Ts:
        leaves, cu, total = make_inputs(T, tokens, H, D, dtype, device)
        fl = flops_fwd(total, H, D, D)
        row = {"T": T, "tokens": total, "num_docs": cu.numel() - 1, "flops_fwd": fl, "providers": {}}
        for name, fn in provs.items():
            try:
                r = bench_one(fn, leaves, cu, device, args.warmup, args.iters)
                r["tflops_fwd"] = fl / (r["fwd_ms"] * 1e-3) / 1e12
                r["tflops_bwd"] = 2 * fl / (r["bwd_ms"] * 1e-3) / 1e12
                r["tflops_fwd_bwd"] = 3 * fl / (r["fwd_bwd_ms"] * 1e-3) / 1e12
            except Exception as e:
                print(f"T={T} {name}: {type(e).__name__}: {str(e)[:200]}")
                r = None
                if device == "cuda":
                    torch.cuda.empty_cache()
            row["providers"][name] = r
        rows.append(row)
        del leaves

    print(f"\n{'T':>7} {'provider':>8} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'TF/s f+b':>9}  ratio vs {base} (fwd/bwd/f+b)")
    for row in rows:
        b = row["providers"].get(base)
        for name, r in row["providers"].items():
            if r is None:
                print(f"{row['T']:>7} {name:>8} {'failed':>9}")
                continue
            ratio = "-"
            if b is not None:
                ratio = "/".join(f"{r[m] / b[m]:.2f}" for m in ("fwd_ms", "bwd_ms", "fwd_bwd_ms"))
            print(
                f"{row['T']:>7} {name:>8} {r['fwd_ms']:9.3f} {r['bwd_ms']:9.3f} {r['fwd_bwd_ms']:9.3f} "
                f"{r['tflops_fwd_bwd']:9.3g}  {ratio}"
            )
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": dtype_name, "heads": H, "dim": D, "chunk": C, "base": base, "rows": rows,
        "flops_formula": "fwd = tokens*HV*(6KV + 6CK + 4CV); bwd = 2*fwd; fwd+bwd = 3*fwd",
    }
    if device == "cpu" and args.scaling_T:
        result["scaling"], result["memory"] = run_cpu_scaling(args, args.dim or 64)
    # 1/5/15-minute load averages: other processes on the machine distort CPU timings
    result["loadavg_start"], result["loadavg_end"] = list(load_start), list(os.getloadavg())
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=lambda x: None if math.isnan(x) else x))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
