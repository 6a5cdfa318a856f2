"""Benchmark: MoBA block-sparse attention vs dense causal attention (torch SDPA).

MoBA: Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs"
(arXiv:2502.13189). Each query attends its own block causally plus the ``top_k - 1`` best past
blocks, so the attended fraction of the causal key set falls roughly like
``top_k * block_size / (T / 2)`` as T grows.

``--cpu``: the torch path ``moba_attn_func(kernels="torch")`` (fp32) vs
  ``F.scaled_dot_product_attention(is_causal=True)``, B=1, H=2, D=64 by default, T = 2K..16K.
  Absolute CPU times say nothing about GPUs; only ratios measured in the same run mean anything.
CUDA (default): the Triton kernels ``moba_attn_func(kernels="triton")`` and the torch path
  (up to ``--torch-max-t``) vs SDPA restricted to the FLASH_ATTENTION backend, bf16, B=1,
  H=16, D=128, T = 8K..64K.

Times forward and forward+backward (backward = difference): median of 3 runs on CPU, of
``triton.testing.do_bench`` on CUDA. Columns: ``x fwd`` / ``x f+b`` = baseline (SDPA) time /
this kernel's time; ``keys`` = attended / causal (query, key) pairs, ``blocks`` = attended /
causal (query, key block) pairs (:func:`lctrain.kernels.moba.moba_selected_fraction`);
``saved MB`` = bytes autograd keeps for the backward (CPU only; SDPA's own is q, k, v, out, lse).

Usage: ``python benchmarks/bench_moba.py [--cpu] [--seqlens 2048 4096 ...] [--block-size 256]
[--top-k 3] [--heads 2] [--head-dim 64] [--out r.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lctrain.kernels.moba import moba_attn_func, moba_selected_fraction

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import _bench_cpu, _bench_cuda, _fwd_bwd  # the shared timing helpers


def _saved_bytes(run, inputs) -> int:
    """Bytes of the tensors autograd saves for the backward of ``run(*inputs)`` (by storage)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(*inputs)
    del out
    return sum(seen.values())


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)


def _row(name, T, times, bs, top_k, base=None, saved=None):
    f, a, b = times
    row = {"kernel": name, "T": T, "fwd_ms": f, "fwd_bwd_ms": a, "bwd_ms": b}
    if name.startswith("moba"):
        row["block_size"], row["top_k"] = bs, top_k
        row["attended_keys"] = moba_selected_fraction(T, bs, top_k, unit="keys")
        row["attended_blocks"] = moba_selected_fraction(T, bs, top_k, unit="blocks")
    if base is not None:
        row["speedup_fwd"] = base[0] / f
        row["speedup_fwd_bwd"] = base[1] / a
    if saved is not None:
        row["saved_mb"] = saved / 2**20
    return row


def run_cpu(seqlens, H, D, bs, top_k, B=1):
    rows = []
    for T in seqlens:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(B, T, H, D, generator=g).requires_grad_() for _ in range(3))

        def moba(q, k, v):
            return moba_attn_func(q, k, v, bs, top_k, kernels="torch")

        base = _fwd_bwd(_bench_cpu, _sdpa, (q, k, v))
        rows.append(_row("sdpa_causal", T, base, bs, top_k, saved=_saved_bytes(_sdpa, (q, k, v))))
        t = _fwd_bwd(_bench_cpu, moba, (q, k, v))
        rows.append(_row("moba_torch", T, t, bs, top_k, base, saved=_saved_bytes(moba, (q, k, v))))
        print_table(rows[-2:], header=T == seqlens[0])
    return rows


def run_cuda(seqlens, H, D, bs, top_k, torch_max_t, B=1):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = "cuda", torch.bfloat16
    rows = []
    for T in seqlens:
        q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return _sdpa(q, k, v)

        base = _fwd_bwd(_bench_cuda, sdpa, (q, k, v))
        rows.append(_row("sdpa_flash", T, base, bs, top_k))

        def moba(q, k, v, kernels="triton"):
            return moba_attn_func(q, k, v, bs, top_k, kernels=kernels)

        tri = _fwd_bwd(_bench_cuda, moba, (q, k, v))
        rows.append(_row("moba_triton", T, tri, bs, top_k, base))
        if T <= torch_max_t:
            tt = _fwd_bwd(_bench_cuda, lambda q, k, v: moba(q, k, v, "torch"), (q, k, v))
            rows.append(_row("moba_torch", T, tt, bs, top_k, base))
        del q, k, v
        torch.cuda.empty_cache()
        print_table(rows[-3:], header=T == seqlens[0])
    return rows


def print_table(rows, header=True):
    head = (
        f"{'kernel':<13}{'T':>7}{'fwd ms':>11}{'f+b ms':>11}{'bwd ms':>11}{'x fwd':>8}{'x f+b':>8}"
        f"{'keys':>8}{'blocks':>8}{'saved MB':>10}"
    )
    if header:
        print(head)
        print("-" * len(head))
    for r in rows:
        sf = f"{r['speedup_fwd']:.2f}" if "speedup_fwd" in r else "base"
        sa = f"{r['speedup_fwd_bwd']:.2f}" if "speedup_fwd_bwd" in r else "base"
        keys = f"{r['attended_keys']:.3f}" if "attended_keys" in r else "1"
        blocks = f"{r['attended_blocks']:.3f}" if "attended_blocks" in r else "1"
        saved = f"{r['saved_mb']:.1f}" if "saved_mb" in r else "-"
        print(
            f"{r['kernel']:<13}{r['T']:>7}{r['fwd_ms']:>11.2f}{r['fwd_bwd_ms']:>11.2f}{r['bwd_ms']:>11.2f}"
            f"{sf:>8}{sa:>8}{keys:>8}{blocks:>8}{saved:>10}",
            flush=True,
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="torch path vs SDPA on CPU, fp32")
    ap.add_argument("--seqlens", type=int, nargs="*", default=None)
    ap.add_argument("--block-size", type=int, default=None, help="default 256 (CPU) / 512 (CUDA)")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--heads", type=int, default=None, help="default 2 (CPU) / 16 (CUDA)")
    ap.add_argument("--head-dim", type=int, default=None, help="default 64 (CPU) / 128 (CUDA)")
    ap.add_argument("--torch-max-t", type=int, default=16384, help="CUDA: longest T for the torch path")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.cpu:
        cfg = {
            "seqlens": args.seqlens or [2048, 4096, 8192, 16384],
            "H": args.heads or 2,
            "D": args.head_dim or 64,
            "bs": args.block_size or 256,
            "top_k": args.top_k,
        }
        rows = run_cpu(**cfg)
        device = f"cpu ({torch.get_num_threads()} threads)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device; run with --cpu for the torch path")
        cfg = {
            "seqlens": args.seqlens or [8192, 16384, 32768, 65536],
            "H": args.heads or 16,
            "D": args.head_dim or 128,
            "bs": args.block_size or 512,
            "top_k": args.top_k,
        }
        rows = run_cuda(**cfg, torch_max_t=args.torch_max_t)
        device = torch.cuda.get_device_name()
    print("x fwd / x f+b: SDPA time / this kernel's time, same T, same run")
    result = {"device": device, "torch": torch.__version__, "config": cfg, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
