"""One-shot GPU check: kernel tests on CUDA, kernel timings against baselines, an end-to-end run.

Made to run the moment a GPU is lent (about 15 minutes, one H100/H200): one command, under
8 minutes, one JSON plus a printed table::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_h100.json

1. **Correctness on CUDA**: ``pytest tests/kernels`` (bf16 and fp32 cases of the GDN chunk,
   flash attention with lse, Lightning, MoE grouped GEMM and MoBA kernels); pass/fail counts.
2. **Kernel timings**, forward+backward, bf16, B=1, H=16, D=128, T = 8K, 32K (64K where memory
   allows), each against its baseline measured in the same run: Gated DeltaNet Triton vs fla's
   ``chunk_gated_delta_rule`` when fla is importable (a carried wheel: ``pip install
   --no-deps flash-linear-attention-*.whl``) else the torch chunk path; flash attention (Triton)
   vs ``F.scaled_dot_product_attention`` (its flash backend); Lightning Triton vs the torch chunk
   path; MoBA Triton (block 512, top-3) vs SDPA. Each row records ``ratio = baseline_ms / ms``
   (> 1: lctrain is faster) and the max relative error against the baseline's output. Also the
   chunked linear cross entropy (``model.loss_chunk_size``) against whole logits +
   ``F.cross_entropy`` at Qwen3-Next's vocabulary (151936), width 2048, 8192 tokens: ms and peak
   memory of each (``loss`` in the JSON).
3. **End to end**: ``hybrid_gdn_3to1`` at ``scale=340m``, seq 4096, ~20 steps (global batch 8
   sequences), once with ``model.kernels=triton`` and once with ``torch``: tokens/s, MFU (from
   :func:`lctrain.train.metrics.mfu`) and peak CUDA memory.

``--dry-run`` runs the same code paths on CPU with tiny shapes (Triton under its interpreter,
fp32, a 2-step run of a tiny model on a small slice of the built-in corpus), so CI keeps the
script working; its numbers mean nothing. Carrying wheels to the GPU machine: put them in
``shared/wheels/`` and run ``pip install --no-deps shared/wheels/*.whl`` before this script.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if "--dry-run" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fwd_bwd(fn, inputs: list[torch.Tensor], warmup: int, iters: int) -> tuple[float, torch.Tensor]:
    """Median ms of ``fn(*inputs)`` forward + backward (a random output gradient); returns (ms, output)."""
    dev = inputs[0].device
    xs = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*xs)
    grad = torch.randn_like(out)
    times = []
    for i in range(warmup + iters):
        for x in xs:
            x.grad = None
        _sync(dev)
        t0 = time.perf_counter()
        o = fn(*xs)
        o.backward(grad)
        _sync(dev)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], out.detach()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def kernel_rows(dev: torch.device, dtype: torch.dtype, seqlens: list[int], H: int, D: int, warmup: int,
                iters: int) -> list[dict]:
    """Timings of every Triton kernel against its baseline (see the module docstring)."""
    from lctrain.kernels.flash_attn import flash_attn_func
    from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule, chunk_gated_delta_rule_triton
    from lctrain.kernels.lightning_attn import chunk_lightning_attn, chunk_lightning_attn_triton
    from lctrain.kernels.moba import moba_attn_func

    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn
    except Exception:  # not installed (or incompatible): the torch path is the baseline
        fla_gdn = None
    rows = []
    slope = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], device=dev)
    for T in seqlens:
        g = torch.Generator(device=dev).manual_seed(T)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

        q, k, v = rnd(1, T, H, D), rnd(1, T, H, D), rnd(1, T, H, D)
        qn, kn = F.normalize(q.float(), dim=-1).to(dtype), F.normalize(k.float(), dim=-1).to(dtype)
        gate = -torch.rand(1, T, H, generator=g, device=dev) * 0.1
        beta = torch.rand(1, T, H, generator=g, device=dev)
        cases = [
            ("gated_delta_rule", lambda q, k, v: chunk_gated_delta_rule_triton(q, k, v, gate, beta)[0],
             (lambda q, k, v: fla_gdn(q, k, v, gate, beta)[0]) if fla_gdn is not None
             else (lambda q, k, v: chunk_gated_delta_rule(q, k, v, gate, beta)[0]),
             "fla" if fla_gdn is not None else "torch chunk", [qn, kn, v]),
            ("flash_attn", lambda q, k, v: flash_attn_func(q, k, v, causal=True),
             lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            is_causal=True).transpose(1, 2),
             "SDPA", [q, k, v]),
            ("lightning_attn", lambda q, k, v: chunk_lightning_attn_triton(q, k, v, slope)[0],
             lambda q, k, v: chunk_lightning_attn(q, k, v, slope)[0], "torch chunk", [q, k, v]),
            ("moba", lambda q, k, v: moba_attn_func(q, k, v, min(512, T // 4), 3, kernels="triton"),
             lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            is_causal=True).transpose(1, 2),
             "SDPA (dense)", [q, k, v]),
        ]
        for name, fn, base, base_name, inputs in cases:
            row = {"op": name, "T": T, "H": H, "D": D, "dtype": str(dtype).split(".")[-1], "baseline": base_name}
            try:
                ms, out = time_fwd_bwd(fn, inputs, warmup, iters)
                base_ms, base_out = time_fwd_bwd(base, inputs, warmup, iters)
                row.update(ms=ms, baseline_ms=base_ms, ratio=base_ms / ms)
                if name != "moba":  # MoBA is sparse: its output differs from dense attention by design
                    row["rel_err_vs_baseline"] = _rel(out, base_out)
            except torch.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e)[:120]}"
                torch.cuda.empty_cache()
            except Exception as e:  # one failing kernel must not lose the others' numbers
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(f"  {name:18s} T={T:6d}  " + (f"{row['ms']:9.2f} ms vs {base_name} {row['baseline_ms']:9.2f} ms "
                                                f"-> {row['ratio']:.2f}x" if "ms" in row else row["error"]), flush=True)
    return rows


def run_tests(dry_run: bool, timeout_s: int) -> dict:
    """``pytest tests/kernels`` on this machine (``--collect-only`` in a dry run: CI runs them itself)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", "-m", "not slow"]
    if dry_run:
        cmd.append("--collect-only")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": tail[0],
            "seconds": time.perf_counter() - t0}


def loss_rows(dev: torch.device, dtype: torch.dtype, dry_run: bool, warmup: int, iters: int) -> list[dict]:
    """Chunked linear cross entropy (``model.loss_chunk_size``) against whole logits + ``F.cross_entropy``
    (the trainer's default path), forward + backward: ms, peak memory above the inputs, loss error.
    Qwen3-Next's vocabulary (151936) and width 2048, 8192 tokens, chunk 4096 (dry run: tiny)."""
    from lctrain.kernels.cross_entropy import linear_cross_entropy

    N, D, V, chunk = (64, 16, 100, 16) if dry_run else (8192, 2048, 151936, 4096)
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, D, device=dev, dtype=dtype, generator=g)
    w = (torch.randn(V, D, device=dev, dtype=dtype, generator=g) * D**-0.5)
    y = torch.randint(0, V, (N,), device=dev, generator=g)
    cases = {
        "chunked": lambda h, w: linear_cross_entropy(h, w, y, chunk_size=chunk),
        "logits": lambda h, w: F.cross_entropy((h @ w.t()).float(), y, reduction="sum"),
    }
    row = {"op": "linear_cross_entropy", "T": N, "D": D, "V": V, "chunk_size": chunk,
           "dtype": str(dtype).split(".")[-1], "baseline": "logits + F.cross_entropy"}
    try:
        out = {}
        for name, fn in cases.items():
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            ms, loss = time_fwd_bwd(fn, [h, w], warmup, iters)
            out[name] = (ms, loss)
            if dev.type == "cuda":
                row[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        row.update(ms=out["chunked"][0], baseline_ms=out["logits"][0], ratio=out["logits"][0] / out["chunked"][0],
                   rel_err_vs_baseline=_rel(out["chunked"][1].float(), out["logits"][1].float()))
    except Exception as e:  # e.g. out of memory for the whole logits
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(f"  {row['op']} " + (f"{row['ms']:.2f} ms vs {row['baseline_ms']:.2f} ms" if "ms" in row else row["error"]),
          flush=True)
    return [row]


def _small_corpus(path: Path) -> Path:
    with gzip.open(REPO / "lctrain" / "data" / "builtin" / "pd_english.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for _, line in zip(range(12), f)]
    path.write_text("".join(json.dumps({"text": d["text"][:20000]}) + "\n" for d in docs), encoding="utf-8")
    return path


def end_to_end(dev: torch.device, dry_run: bool, steps: int, workdir: Path) -> list[dict]:
    """``hybrid_gdn_3to1`` at 340m (seq 4096) with each kernel choice: tokens/s, MFU, peak memory."""
    from lctrain.config import load_config
    from lctrain.models import HybridLM
    from lctrain.train.metrics import mfu
    from lctrain.train.trainer import train

    if dry_run:
        base = ["recipe=hybrid_gdn_3to1", "scale=cpu", "model.d_model=32", "model.vocab_size=512",
                "model.attn.num_heads=2", "model.attn.num_kv_heads=1", "model.attn.head_dim=16",
                "model.gdn.num_heads=2", "model.gdn.head_dim=16", "data.seq_len=64",
                f"data.path={_small_corpus(workdir / 'corpus.jsonl')}", "train.global_batch_size=2",
                "train.micro_batch_size=1"]
    else:
        base = ["recipe=hybrid_gdn_3to1", "scale=340m", "data.seq_len=4096", "train.global_batch_size=8",
                "train.micro_batch_size=2", "train.dtype=bf16"]
    rows = []
    for kernels in ("triton", "torch"):
        args = base + [f"model.kernels={kernels}", f"train.max_steps={steps}", f"train.out_dir={workdir / kernels}",
                       f"data.cache_dir={workdir / 'cache'}", "train.eval_every=0", "train.checkpoint_every=0",
                       "train.eval_batches=1", "train.progress=false", "train.tensorboard=false",
                       "train.resume=none", "optim.warmup_steps=2"]
        row = {"kernels": kernels, "args": args}
        try:
            cfg = load_config(args)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            summary = train(cfg)
            row.update(wall_s=time.perf_counter() - t0, tokens_per_s=summary["tokens_per_s"],
                       final_train_loss=summary["final_train_loss"], num_params=summary["num_params"])
            with torch.device("meta"):
                fpt = HybridLM(cfg.model).flops_per_token(cfg.data.seq_len)
            row["flops_per_token"] = fpt
            util = mfu(fpt, summary["tokens_per_s"], dev)
            row["mfu"] = util
            if dev.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(f"  e2e kernels={kernels:6s} " + (f"{row['tokens_per_s']:.0f} tok/s, MFU {row['mfu']}"
                                                if "tokens_per_s" in row else row["error"]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton interpreter): checks the script")
    ap.add_argument("--out", default="", help="write the JSON here")
    ap.add_argument("--seqlens", type=int, nargs="*", default=None, help="default 8192 32768 65536 (dry run: 64)")
    ap.add_argument("--steps", type=int, default=None, help="end-to-end steps (default 20; dry run 2)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--workdir", default=str(REPO / "runs" / "gpu_check"))
    args = ap.parse_args(argv)
    dry = args.dry_run
    dev = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if not dry and dev.type != "cuda":
        print("error: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)",
                    "torch": torch.__version__, "dry_run": dry}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    print("[gpu_check] 1/3 kernel tests", flush=True)
    result["tests"] = None if args.skip_tests else run_tests(dry, timeout_s=300)
    print("[gpu_check] 2/3 kernel timings", flush=True)
    seqlens = args.seqlens or ([64] if dry else [8192, 32768, 65536])
    H, D = (2, 16) if dry else (16, 128)
    dtype = torch.float32 if dry else torch.bfloat16
    result["kernels"] = kernel_rows(dev, dtype, seqlens, H, D, warmup=0 if dry else 2, iters=1 if dry else 5)
    result["loss"] = loss_rows(dev, dtype, dry, warmup=0 if dry else 2, iters=1 if dry else 5)
    print("[gpu_check] 3/3 end to end", flush=True)
    result["end_to_end"] = end_to_end(dev, dry, args.steps or (2 if dry else 20), workdir)
    losses = [r.get("final_train_loss") for r in result["end_to_end"]]
    if None not in losses:  # the two kernel choices train the same model on the same batches
        result["e2e_loss_rel_diff"] = abs(losses[0] - losses[1]) / abs(losses[1])
    result["wall_s"] = time.perf_counter() - t_start
    print(f"\n{'op':18s} {'T':>6s} {'ms':>9s} {'baseline':>14s} {'base ms':>9s} {'ratio':>6s} {'rel err':>8s}")
    for r in result["kernels"]:
        if "ms" in r:
            print(f"{r['op']:18s} {r['T']:6d} {r['ms']:9.2f} {r['baseline']:>14s} {r['baseline_ms']:9.2f} "
                  f"{r['ratio']:6.2f} {r.get('rel_err_vs_baseline', math.nan):8.1e}")
        else:
            print(f"{r['op']:18s} {r['T']:6d} {r['error']}")
    for r in result["end_to_end"]:
        print(f"e2e {r['kernels']}: " + json.dumps({k: r.get(k) for k in ("tokens_per_s", "mfu", "peak_memory_gib",
                                                                           "error") if k in r}))
    print(f"[gpu_check] done in {result['wall_s']:.0f} s", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    failed = [r for r in result["kernels"] + result["end_to_end"] if "error" in r]
    tests_failed = result["tests"] is not None and result["tests"]["returncode"] != 0
    return 1 if failed or tests_failed else 0


if __name__ == "__main__":
    sys.exit(main())
