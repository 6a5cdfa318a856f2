"""Benchmark the chunked gated delta rule: Triton kernel vs the torch chunk path (vs fla if present).

    python benchmarks/bench_gdn.py --out gdn.json                 # CUDA, bf16, H=16, D=128
    python benchmarks/bench_gdn.py --cpu --out gdn_cpu.json       # CPU: torch path only, fp32, small T

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
of ``--iters``) on CPU. A provider that fails (missing package, OOM) is reported as null.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
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


def time_fn(fn, device: str, warmup: int, iters: int) -> float:
    """Median milliseconds of fn()."""
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
    args = ap.parse_args(argv)

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
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=lambda x: None if math.isnan(x) else x))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
