"""Benchmark: Triton FlashAttention-2 vs torch SDPA, Triton Lightning Attention-2 vs baselines.

CUDA (default): bf16, B=1, H=16, D=128, causal, T = 2K..64K tokens.
  * softmax attention: ``flash_attn_func`` (lctrain Triton) vs
    ``F.scaled_dot_product_attention`` restricted to the FLASH_ATTENTION backend (baseline).
  * Lightning Attention: ``chunk_lightning_attn_triton`` vs ``chunk_lightning_attn`` (torch
    chunked path, baseline) and fla's ``chunk_simple_gla`` with a per-head constant decay, if
    ``fla`` is importable.
  Times forward, forward+backward and backward (= fwd+bwd - fwd), median of
  ``triton.testing.do_bench``.
``--cpu``: only the torch paths, fp32, small T (256..1024), H=4, D=64: SDPA vs the fp32
  reference ``naive_attention``, and the torch chunked Lightning path vs the recurrent reference
  (T <= 256). Absolute CPU times say nothing about GPUs; only the ratios are meaningful.

FLOP formulas (2 FLOPs per multiply-add, ``B`` batch, ``H`` heads, ``T`` tokens, ``D`` head dim):
  * causal softmax attention forward ``2 * 2 * B * H * T^2 * D / 2`` (QK^T and PV, half the
    matrix under the causal mask); backward 2.5x forward (five matmuls instead of two; the
    recomputation of QK^T is counted as in the FlashAttention-2 paper).
  * Lightning Attention (block size C) forward ``B * H * T * (2 C (K + V) + 4 K V)`` (per block:
    QK^T and (QK^T*M)V on full C x C tiles, Q S and K^T V on the state); backward 2x forward.
    fla's chunk_simple_gla is rated with the same formula.

Output: a table of TFLOP/s and speedups (baseline time / candidate time), and ``--out`` JSON.
Usage: ``python benchmarks/bench_attention.py [--cpu] [--seqlens 2048 4096 ...] [--out r.json]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def attn_flops(B, H, T, D, causal=True) -> float:
    f = 4.0 * B * H * T * T * D
    return f / 2 if causal else f


def lightning_flops(B, H, T, K, V, C=64) -> float:
    return B * H * T * (2.0 * C * (K + V) + 4.0 * K * V)


def _bench_cpu(fn, reps=3) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def _bench_cuda(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")


def _fwd_bwd(bench, run, inputs):
    """(fwd ms, fwd+bwd ms, bwd ms) for ``run(*inputs) -> tensor``."""
    with torch.no_grad():
        t_fwd = bench(lambda: run(*inputs))
    grad = None

    def step():
        nonlocal grad
        out = run(*inputs)
        if grad is None:
            grad = torch.randn_like(out)
        torch.autograd.backward(out, grad)
        for x in inputs:
            x.grad = None

    t_all = bench(step)
    return t_fwd, t_all, max(t_all - t_fwd, 0.0)


def _row(name, T, flops_fwd, bwd_factor, times, base=None):
    f, a, b = times
    row = {
        "kernel": name,
        "T": T,
        "fwd_ms": f,
        "fwd_bwd_ms": a,
        "bwd_ms": b,
        "fwd_tflops": flops_fwd / f / 1e9,
        "fwd_bwd_tflops": flops_fwd * (1 + bwd_factor) / a / 1e9,
    }
    if base is not None:
        row["speedup_fwd"] = base[0] / f
        row["speedup_fwd_bwd"] = base[1] / a
    return row


def _fla_chunk_simple_gla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:
        return None

    def run(q, k, v, slope):
        try:
            o, _ = chunk_simple_gla(q, k, v, g_gamma=-slope)
        except TypeError:  # older fla: per-token log decays
            o, _ = chunk_simple_gla(q, k, v, g=(-slope).expand(q.shape[0], q.shape[1], -1).contiguous())
        return o

    return run


def run_cuda(seqlens, H=16, D=128, B=1):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lctrain.kernels.flash_attn import flash_attn_func
    from lctrain.kernels.lightning_attn import chunk_lightning_attn, chunk_lightning_attn_triton

    dev, dt = "cuda", torch.bfloat16
    rows = []
    fla = _fla_chunk_simple_gla()
    slope = torch.linspace(0.01, 0.5, H, device=dev)
    for T in seqlens:
        q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
                ).transpose(1, 2)

        fl = attn_flops(B, H, T, D)
        base = _fwd_bwd(_bench_cuda, sdpa, (q, k, v))
        rows.append(_row("sdpa_flash", T, fl, 2.5, base))
        rows.append(
            _row(
                "triton_flash",
                T,
                fl,
                2.5,
                _fwd_bwd(_bench_cuda, lambda q, k, v: flash_attn_func(q, k, v), (q, k, v)),
                base,
            )
        )

        lf = lightning_flops(B, H, T, D, D)
        qs, ks, vs = (x.detach().mul(0.1).requires_grad_() for x in (q, k, v))
        base_l = _fwd_bwd(_bench_cuda, lambda q, k, v: chunk_lightning_attn(q, k, v, slope)[0], (qs, ks, vs))
        rows.append(_row("lightning_torch_chunk", T, lf, 2.0, base_l))
        rows.append(
            _row(
                "lightning_triton",
                T,
                lf,
                2.0,
                _fwd_bwd(
                    _bench_cuda, lambda q, k, v: chunk_lightning_attn_triton(q, k, v, slope)[0], (qs, ks, vs)
                ),
                base_l,
            )
        )
        if fla is not None:
            rows.append(
                _row(
                    "fla_chunk_simple_gla",
                    T,
                    lf,
                    2.0,
                    _fwd_bwd(_bench_cuda, lambda q, k, v: fla(q, k, v, slope), (qs, ks, vs)),
                    base_l,
                )
            )
        del q, k, v, qs, ks, vs
        torch.cuda.empty_cache()
    return rows


def run_cpu(seqlens, H=4, D=64, B=1):
    from lctrain.kernels.flash_attn import naive_attention
    from lctrain.kernels.lightning_attn import chunk_lightning_attn, naive_recurrent_lightning_attn
    from lctrain.kernels.softmax_attn import softmax_attention

    rows = []
    slope = torch.linspace(0.01, 0.5, H)
    for T in seqlens:
        q, k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
        fl = attn_flops(B, H, T, D)
        base = _fwd_bwd(_bench_cpu, lambda q, k, v: naive_attention(q, k, v)[0], (q, k, v))
        rows.append(_row("naive_attention", T, fl, 2.5, base))
        rows.append(
            _row(
                "sdpa",
                T,
                fl,
                2.5,
                _fwd_bwd(_bench_cpu, lambda q, k, v: softmax_attention(q, k, v), (q, k, v)),
                base,
            )
        )
        lf = lightning_flops(B, H, T, D, D)
        chunk = _fwd_bwd(_bench_cpu, lambda q, k, v: chunk_lightning_attn(q, k, v, slope)[0], (q, k, v))
        if T <= 256:
            base_l = _fwd_bwd(
                _bench_cpu, lambda q, k, v: naive_recurrent_lightning_attn(q, k, v, slope)[0], (q, k, v)
            )
            rows.append(_row("lightning_naive_recurrent", T, lf, 2.0, base_l))
            rows.append(_row("lightning_torch_chunk", T, lf, 2.0, chunk, base_l))
        else:
            rows.append(_row("lightning_torch_chunk", T, lf, 2.0, chunk))
    return rows


def print_table(rows):
    head = f"{'kernel':<24}{'T':>7}{'fwd ms':>10}{'f+b ms':>10}{'bwd ms':>10}{'fwd TF/s':>10}{'f+b TF/s':>10}{'x fwd':>8}{'x f+b':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        sf = f"{r['speedup_fwd']:.2f}" if "speedup_fwd" in r else "base"
        sa = f"{r['speedup_fwd_bwd']:.2f}" if "speedup_fwd_bwd" in r else "base"
        print(
            f"{r['kernel']:<24}{r['T']:>7}{r['fwd_ms']:>10.3f}{r['fwd_bwd_ms']:>10.3f}{r['bwd_ms']:>10.3f}"
            f"{r['fwd_tflops']:>10.4g}{r['fwd_bwd_tflops']:>10.4g}{sf:>8}{sa:>8}"
        )
    print("x fwd / x f+b: baseline time / this kernel's time (baseline = the 'base' row above it)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="torch paths only, fp32, small T")
    ap.add_argument("--seqlens", type=int, nargs="*", default=None)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.cpu:
        seqlens = args.seqlens or [256, 512, 1024]
        rows = run_cpu(seqlens)
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device; run with --cpu for the torch paths")
        seqlens = args.seqlens or [2048, 4096, 8192, 16384, 32768, 65536]
        rows = run_cuda(seqlens)
        device = torch.cuda.get_device_name()
    print_table(rows)
    result = {"device": device, "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
