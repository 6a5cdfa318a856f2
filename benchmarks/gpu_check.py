"""One-shot GPU check, sized to the few minutes a GPU is lent: at most 6 minutes, one JSON.

::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_h100.json

Each section runs in its own subprocess under its own timeout (a section that crashes, hangs or
times out loses only itself), and the JSON is rewritten after every section. The time plan (the
sections and their timeouts, which bound the total) is printed first. Sections, in order:

1. ``env``: device, torch / triton versions, fla-core's version or its import error (reported).
2. ``timing_lctrain``: lctrain's Triton kernels, forward + backward, bf16, B=1, H=16, D=128,
   T = 8K and 32K (64K for Gated DeltaNet only): Gated DeltaNet, Lightning, FlashAttention (with
   SDPA's flash backend as its baseline, each timed in its own ``try``), MoBA (block 512, top-3);
   then the chunked linear cross entropy against whole logits at Qwen3-Next's vocabulary. Each
   row keeps its first call (compilation) apart from the median of the timed calls.
3. ``timing_fla``: fla-core's ``chunk_gated_delta_rule`` and ``chunk_simple_gla`` (Lightning with
   fixed decays) at the same shapes, through lctrain's mapping (``model.kernels=fla``); a
   separate process, so a failing fla costs none of lctrain's numbers.
4. ``correctness``: outputs and gradients of every kernel in bf16 (lctrain's and fla's) against
   the fp32 torch paths on packed documents; a relative error above its threshold fails the section.
5. ``kernel_tests``: ``pytest tests/kernels -m "not slow"`` on this machine, capped in time
   (passed / failed counts so far when the cap is hit).
6. ``end_to_end``: ``hybrid_gdn_3to1`` at ``scale=340m``, seq 4096, ``model.kernels=auto``, bf16,
   no final checkpoint (``train.save_final=false``): tokens/s and MFU over the steps after the
   first ``--warmup-steps`` (compilation), host syncs per step (``torch.cuda.set_sync_debug_mode``),
   peak memory.

``--dry-run`` runs every section's CPU stand-in (tiny shapes, fp32, Triton under its CPU
interpreter, fla's PyTorch reference functions in place of its GPU kernels, a 4-step run of a
tiny model), so CI keeps the script working; its numbers mean nothing. ``--force
SECTION=raise|sleep`` makes a section fail or hang (to test that the others survive);
``--timeout SECTION=SECONDS`` overrides a timeout. Exit code: 0 when every section is ``ok``.

Wheels beyond the project: ``fla-core`` and ``einops`` (see benchmarks/README.md for carrying
them to a machine without internet).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if "--dry-run" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere
sys.path.insert(0, str(REPO))

# (section, timeout on a GPU in s, timeout in a dry run in s): the GPU timeouts bound the run
SECTIONS: list[tuple[str, int, int]] = [
    ("env", 20, 60),
    ("timing_lctrain", 90, 240),
    ("timing_fla", 65, 120),
    ("correctness", 55, 240),
    ("kernel_tests", 25, 120),
    ("end_to_end", 105, 300),
]
BUDGET_S = 360  # 6 minutes: the sum of the GPU timeouts may not exceed it

# relative error thresholds of the bf16 kernels against the fp32 torch paths (dry run: fp32 vs fp32)
TOL_BF16 = {"out": 3e-2, "grad": 6e-2}
TOL_FP32 = {"out": 1e-4, "grad": 1e-4}


# ------------------------------------------------------------------------------------------ helpers


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fwd_bwd(fn, inputs, warmup: int, iters: int) -> dict:
    """Forward + backward of ``fn(*inputs)`` (a fixed random output gradient): the first call's
    seconds (compilation, autotuning) and the median ms of ``iters`` calls after ``warmup`` more."""
    import torch

    dev = inputs[0].device
    xs = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    t0 = time.perf_counter()
    out = fn(*xs)
    grad = torch.randn_like(out)
    out.backward(grad)
    _sync(dev)
    first = time.perf_counter() - t0
    times = []
    for i in range(warmup + iters):
        for x in xs:
            x.grad = None
        _sync(dev)
        t0 = time.perf_counter()
        fn(*xs).backward(grad)
        _sync(dev)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms": times[len(times) // 2], "first_call_s": first}


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def _shapes(dry: bool):
    import torch

    if dry:
        return {"seqlens": [64], "gdn_extra": [128], "H": 2, "D": 16, "dtype": torch.float32, "warmup": 0, "iters": 1}
    return {"seqlens": [8192, 32768], "gdn_extra": [65536], "H": 16, "D": 128, "dtype": torch.bfloat16,
            "warmup": 1, "iters": 3}


def _inputs(dev, dtype, T: int, H: int, D: int, seed: int):
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device=dev).manual_seed(seed)
    q, k, v = (torch.randn(1, T, H, D, generator=g, device=dev) for _ in range(3))
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    gate = -torch.rand(1, T, H, generator=g, device=dev) * 0.1
    beta = torch.rand(1, T, H, generator=g, device=dev)
    slope = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], device=dev)
    return {"q": q.to(dtype), "k": k.to(dtype), "v": v.to(dtype), "qn": qn.to(dtype), "kn": kn.to(dtype),
            "g": gate, "beta": beta, "slope": slope}


def _row_print(row: dict) -> None:
    what = f"{row.get('op', '')} {row.get('impl', '')} T={row.get('T', '')}"
    if "error" in row:
        print(f"  {what}: {row['error']}", flush=True)
    elif "ms" in row:
        print(f"  {what}: {row['ms']:.2f} ms (first call {row['first_call_s']:.1f} s)", flush=True)


# ------------------------------------------------------------------------------------------ sections


def section_env(args, emit) -> int:
    import torch

    row = {"torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": args.dry_run,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        import triton

        row["triton"] = triton.__version__
    except ImportError as e:
        row["triton"] = None
        row["triton_error"] = _error(e)
    from lctrain.kernels.fla_backend import FLA_PIN, fla_import_error

    err = fla_import_error()
    row["fla_pin"] = FLA_PIN
    row["fla_import_error"] = err
    if err is None:
        from importlib.metadata import version

        row["fla_core"] = version("fla-core")
    from lctrain.kernels.plan import resolve_kernel_plan

    if torch.cuda.is_available():
        row["auto_plan_cuda_bf16"] = resolve_kernel_plan("auto", "cuda", compute_dtype=torch.bfloat16).ops
    emit(row)
    print(f"  {json.dumps(row)}", flush=True)
    return 0


def section_timing_lctrain(args, emit) -> int:
    import torch
    import torch.nn.functional as F

    from lctrain.kernels.flash_attn import flash_attn_func
    from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule_triton
    from lctrain.kernels.lightning_attn import chunk_lightning_attn_triton
    from lctrain.kernels.moba import moba_attn_func

    dev = _device(args)
    s = _shapes(args.dry_run)
    H, D, dtype = s["H"], s["D"], s["dtype"]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)

    failed = 0
    plan = [(T, op) for T in s["seqlens"] for op in ("gated_delta_rule", "lightning_attn", "flash_attn", "sdpa",
                                                      "moba")]
    plan += [(T, "gated_delta_rule") for T in s["gdn_extra"]]
    for T, op in plan:
        x = _inputs(dev, dtype, T, H, D, seed=T)
        fns = {
            "gated_delta_rule": (lambda q, k, v: chunk_gated_delta_rule_triton(q, k, v, x["g"], x["beta"])[0],
                                 [x["qn"], x["kn"], x["v"]]),
            "lightning_attn": (lambda q, k, v: chunk_lightning_attn_triton(q, k, v, x["slope"])[0],
                               [x["q"], x["k"], x["v"]]),
            "flash_attn": (lambda q, k, v: flash_attn_func(q, k, v, causal=True), [x["q"], x["k"], x["v"]]),
            "sdpa": (sdpa, [x["q"], x["k"], x["v"]]),
            "moba": (lambda q, k, v: moba_attn_func(q, k, v, min(512, T // 4), 3, kernels="triton"),
                     [x["q"], x["k"], x["v"]]),
        }
        fn, inputs = fns[op]
        row = {"op": op, "impl": "torch_sdpa" if op == "sdpa" else "lctrain_triton", "T": T, "H": H, "D": D,
               "dtype": str(dtype).split(".")[-1]}
        try:  # every measurement in its own try: one failure loses only its row
            row.update(time_fwd_bwd(fn, inputs, s["warmup"], s["iters"]))
        except Exception as e:
            row["error"] = _error(e)
            failed += 1
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        emit(row)
        _row_print(row)
        del x, fns, inputs
    emit(_loss_row(dev, dtype, args.dry_run, s["warmup"], s["iters"]))
    return 1 if failed else 0


def _loss_row(dev, dtype, dry: bool, warmup: int, iters: int) -> dict:
    """Chunked linear cross entropy (``model.loss_chunk_size``) against whole logits +
    ``F.cross_entropy``: ms and peak memory of each, loss error. Qwen3-Next's vocabulary (151936),
    width 2048, 8192 tokens, chunk 4096 (dry run: tiny)."""
    import torch
    import torch.nn.functional as F

    from lctrain.kernels.cross_entropy import linear_cross_entropy

    N, D, V, chunk = (64, 16, 100, 16) if dry else (8192, 2048, 151936, 4096)
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, D, device=dev, dtype=dtype, generator=g)
    w = torch.randn(V, D, device=dev, dtype=dtype, generator=g) * D**-0.5
    y = torch.randint(0, V, (N,), device=dev, generator=g)
    row = {"op": "linear_cross_entropy", "impl": "chunked vs logits", "T": N, "D": D, "V": V, "chunk_size": chunk}
    try:
        out = {}
        for name, fn in (("chunked", lambda h, w: linear_cross_entropy(h, w, y, chunk_size=chunk)),
                         ("logits", lambda h, w: F.cross_entropy((h @ w.t()).float(), y, reduction="sum"))):
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            out[name] = time_fwd_bwd(fn, [h, w], warmup, iters)["ms"]
            if dev.type == "cuda":
                row[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        with torch.no_grad():
            a = linear_cross_entropy(h, w, y, chunk_size=chunk).float()
            b = F.cross_entropy((h @ w.t()).float(), y, reduction="sum")
        row.update(ms=out["chunked"], logits_ms=out["logits"], rel_err=_rel(a, b))
    except Exception as e:  # e.g. out of memory for the whole logits
        row["error"] = _error(e)
    print(f"  linear_cross_entropy: {json.dumps({k: v for k, v in row.items() if k not in ('op', 'impl')})}",
          flush=True)
    return row


def _fla_stand_ins():
    """CPU stand-ins for fla's GPU kernels in a dry run: fla's own PyTorch reference functions
    behind its chunk signatures (the mapping of :mod:`lctrain.kernels.fla_backend` runs as on a GPU)."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    def gdn(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **_):
        assert cu_seqlens is None and v.shape[2] == q.shape[2]
        return naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                                output_final_state=output_final_state)

    def sgla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
             cu_seqlens=None, **_):
        assert cu_seqlens is None and g is None
        return naive_recurrent_simple_gla(q, k, v, g_gamma.expand(*q.shape[:3]), scale=scale,
                                          initial_state=initial_state, output_final_state=output_final_state)

    return gdn, sgla


def section_timing_fla(args, emit) -> int:
    from lctrain.kernels import fla_backend

    dev = _device(args)
    s = _shapes(args.dry_run)
    H, D, dtype = s["H"], s["D"], s["dtype"]
    err = fla_backend.fla_import_error()
    if err is not None:  # reported, not swallowed: the section fails with fla's own import error
        emit({"op": "fla", "error": f"fla-core does not import: {err} ({fla_backend.FLA_INSTALL})"})
        print(f"  fla-core does not import: {err}", flush=True)
        return 1
    if args.dry_run:
        fla_backend.set_fla_kernels(*_fla_stand_ins())
    failed = 0
    plan = [(T, op) for T in s["seqlens"] for op in ("gated_delta_rule", "lightning_attn")]
    plan += [(T, "gated_delta_rule") for T in s["gdn_extra"]]
    for T, op in plan:
        x = _inputs(dev, dtype, T, H, D, seed=T)
        if op == "gated_delta_rule":
            fn = lambda q, k, v: fla_backend.fla_chunk_gated_delta_rule(q, k, v, x["g"], x["beta"])[0]  # noqa: E731
            inputs = [x["qn"], x["kn"], x["v"]]
        else:
            fn = lambda q, k, v: fla_backend.fla_chunk_lightning_attn(q, k, v, x["slope"])[0]  # noqa: E731
            inputs = [x["q"], x["k"], x["v"]]
        row = {"op": op, "impl": "fla_chunk" if op == "gated_delta_rule" else "fla_simple_gla", "T": T, "H": H,
               "D": D, "dtype": str(dtype).split(".")[-1]}
        if args.dry_run:
            row["stand_in"] = "fla's naive reference functions (its Triton kernels need a GPU)"
        try:
            row.update(time_fwd_bwd(fn, inputs, s["warmup"], s["iters"]))
        except Exception as e:
            row["error"] = _error(e)
            failed += 1
        emit(row)
        _row_print(row)
    return 1 if failed else 0


def section_correctness(args, emit) -> int:
    """Outputs and q/k/v (+ g, beta) gradients of each kernel in the check's dtype against the
    fp32 torch path on the same (rounded) inputs, packed documents; thresholds that fail."""
    import torch
    import torch.nn.functional as F

    from lctrain.kernels import fla_backend
    from lctrain.kernels.flash_attn import flash_attn_func  # noqa: F401  (import errors surface here)
    from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule, chunk_gated_delta_rule_triton
    from lctrain.kernels.lightning_attn import chunk_lightning_attn, chunk_lightning_attn_triton
    from lctrain.kernels.softmax_attn import softmax_attention
    from lctrain.kernels.varlen import attach_host_bounds, with_host_bounds

    dev = _device(args)
    dry = args.dry_run
    dtype = torch.float32 if dry else torch.bfloat16
    tol = TOL_FP32 if dry else TOL_BF16
    T, H, D = (96, 2, 16) if dry else (4096, 4, 128)
    bounds = [0, T // 3, T // 3 + 1, T]  # a one-token document too
    cu = with_host_bounds(attach_host_bounds(torch.tensor(bounds, dtype=torch.int32), bounds), dev)
    x = _inputs(dev, dtype, T, H, D, seed=1)
    fla_err = fla_backend.fla_import_error()
    if dry and fla_err is None:
        fla_backend.set_fla_kernels(*_varlen(_fla_stand_ins()))
    cases = {
        "gated_delta_rule": (
            lambda q, k, v, g, b: chunk_gated_delta_rule_triton(q, k, v, g, b, cu_seqlens=cu)[0],
            lambda q, k, v, g, b: chunk_gated_delta_rule(q, k, v, g, b, cu_seqlens=cu)[0],
            [x["qn"], x["kn"], x["v"], x["g"], x["beta"]]),
        "lightning_attn": (
            lambda q, k, v: chunk_lightning_attn_triton(q, k, v, x["slope"], cu_seqlens=cu)[0],
            lambda q, k, v: chunk_lightning_attn(q, k, v, x["slope"], cu_seqlens=cu)[0],
            [x["q"], x["k"], x["v"]]),
        "flash_attn_varlen": (
            lambda q, k, v: softmax_attention(q, k, v, cu_seqlens=cu, kernels="triton"),
            lambda q, k, v: softmax_attention(q, k, v, cu_seqlens=cu, kernels="torch"),
            [x["q"], x["k"], x["v"]]),
    }
    if fla_err is None:
        cases["fla_gated_delta_rule"] = (
            lambda q, k, v, g, b: fla_backend.fla_chunk_gated_delta_rule(q, k, v, g, b, cu_seqlens=cu)[0],
            cases["gated_delta_rule"][1], cases["gated_delta_rule"][2])
        cases["fla_lightning_attn"] = (
            lambda q, k, v: fla_backend.fla_chunk_lightning_attn(q, k, v, x["slope"], cu_seqlens=cu)[0],
            cases["lightning_attn"][1], cases["lightning_attn"][2])
    else:
        emit({"op": "fla", "error": f"fla-core does not import: {fla_err}"})
    failed = 0 if fla_err is None else 1
    gen = torch.Generator(device=dev).manual_seed(5)
    for name, (fn, ref, inputs) in cases.items():
        row = {"op": name, "T": T, "H": H, "D": D, "dtype": str(dtype).split(".")[-1], "tol": tol}
        try:
            xa = [t.detach().clone().requires_grad_() for t in inputs]
            xr = [t.detach().float().clone().requires_grad_() for t in inputs]  # fp32 reference, same values
            oa = fn(*xa)
            orf = ref(*xr)
            do = torch.randn(orf.shape, generator=gen, device=dev)
            oa.float().backward(do)
            orf.backward(do)
            row["out_rel_err"] = _rel(oa.float(), orf)
            row["grad_rel_err"] = {n: _rel(a.grad.float(), r.grad) for n, a, r in zip("qkvgb", xa, xr)}
            bad = row["out_rel_err"] > tol["out"] or any(e > tol["grad"] for e in row["grad_rel_err"].values())
            bad = bad or not all(math.isfinite(e) for e in [row["out_rel_err"], *row["grad_rel_err"].values()])
            row["pass"] = not bad
            failed += bad
        except Exception as e:
            row["error"] = _error(e)
            failed += 1
        emit(row)
        print(f"  {name}: " + (row["error"] if "error" in row else
                               f"out {row['out_rel_err']:.1e}, grads "
                               + " ".join(f"{k}={v:.1e}" for k, v in row["grad_rel_err"].items())
                               + ("" if row["pass"] else "  FAIL")), flush=True)
    _ = F
    return 3 if failed else 0


def _varlen(pair):
    """fla stand-ins taking ``cu_seqlens`` (one reference call per document), as fla's kernels do."""
    import itertools

    import torch

    def wrap(fn, n_per_token):
        def run(*a, initial_state=None, output_final_state=False, cu_seqlens=None, cu_seqlens_cpu=None, **kw):
            if cu_seqlens is None:
                return fn(*a, initial_state=initial_state, output_final_state=output_final_state, **kw)
            outs, states = [], []
            for n, (s, e) in enumerate(itertools.pairwise(cu_seqlens_cpu.tolist())):
                part = [t[:, s:e] if i < n_per_token else t for i, t in enumerate(a)]
                h0 = None if initial_state is None else initial_state[n:n + 1]
                o, h = fn(*part, initial_state=h0, output_final_state=True, **kw)
                outs.append(o)
                states.append(h)
            return torch.cat(outs, 1), (torch.cat(states) if output_final_state else None)

        return run

    return wrap(pair[0], 5), wrap(pair[1], 3)


def section_kernel_tests(args, emit) -> int:
    """``pytest tests/kernels`` here, capped (``--collect-only`` in a dry run: CI runs them itself)."""
    cap = max(5, args.section_timeout - 5)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", "-m", "not slow"]
    if args.dry_run:
        cmd.append("--collect-only")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=cap)
        capped = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        capped = True
    lines = out.strip().splitlines()
    progress = "".join(ln for ln in lines if ln and set(ln.split(" [")[0]) <= set(".FEsx"))
    row = {"command": " ".join(cmd[1:]), "returncode": None if capped else proc.returncode, "capped_at_s": cap,
           "capped": capped, "summary": lines[-1] if lines else "", "passed_so_far": progress.count("."),
           "failed_so_far": progress.count("F") + progress.count("E"), "seconds": time.perf_counter() - t0}
    emit(row)
    print(f"  {row['summary']}" + (f" (capped at {cap} s: {row['passed_so_far']} passed, {row['failed_so_far']} "
                                   "failed so far)" if capped else ""), flush=True)
    return 1 if row["failed_so_far"] or (not capped and proc.returncode != 0) else 0


def _small_corpus(path: Path, docs: int, chars: int) -> Path:
    with gzip.open(REPO / "lctrain" / "data" / "builtin" / "pd_english.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(docs), f)]
    path.write_text("".join(json.dumps({"text": d["text"][:chars]}) + "\n" for d in rows), encoding="utf-8")
    return path


class _SyncCounter:
    """Host syncs of the measured steps: CUDA ``set_sync_debug_mode('warn')`` warnings on a GPU;
    on CPU (dry run) the calls of ``Tensor.item`` / ``Tensor.tolist`` (a CPU has no syncs)."""

    def __init__(self, dev):
        import torch

        self.dev, self.count, self.torch = dev, 0, torch
        self._orig = {}

    def __enter__(self):
        import warnings

        torch = self.torch
        if self.dev.type == "cuda":
            self._w = warnings.catch_warnings(record=True)
            self._log = self._w.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            for name in ("item", "tolist"):
                orig = getattr(torch.Tensor, name)
                self._orig[name] = orig

                def counted(t, *a, _orig=orig, **kw):
                    self.count += 1
                    return _orig(t, *a, **kw)

                setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        torch = self.torch
        if self.dev.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            self.count += sum("synchroniz" in str(w.message) for w in self._log)
            self._w.__exit__(*exc)
        else:
            for name, orig in self._orig.items():
                setattr(torch.Tensor, name, orig)
        return False


def section_end_to_end(args, emit) -> int:
    import torch

    from lctrain.config import load_config
    from lctrain.train.metrics import mfu
    from lctrain.train.trainer import Trainer

    dev = _device(args)
    workdir = Path(args.workdir)
    dry = args.dry_run
    steps, warm = (4, 2) if dry else (args.steps, args.warmup_steps)
    if dry:
        base = ["recipe=hybrid_gdn_3to1", "scale=cpu", "model.d_model=32", "model.vocab_size=512",
                "model.attn.num_heads=2", "model.attn.num_kv_heads=1", "model.attn.head_dim=16",
                "model.gdn.num_heads=2", "model.gdn.head_dim=16", "data.seq_len=64",
                f"data.path={_small_corpus(workdir / 'corpus.jsonl', 12, 20000)}", "train.global_batch_size=2",
                "train.micro_batch_size=1"]
    else:
        # 2.4 MB of text (~650K tokens; 14 steps take 460K) and a 4096-piece tokenizer trained on it in
        # under a second (the model keeps its 32000-row vocabulary: the step's compute is the preset's)
        corpus = _small_corpus(workdir / "corpus.jsonl", 60, 40000)
        from lctrain.data.tokenizer import train_tokenizer

        docs = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
        train_tokenizer(docs, 4096, workdir / "tok4k")
        base = ["recipe=hybrid_gdn_3to1", "scale=340m", "data.seq_len=4096", "train.global_batch_size=8",
                "train.micro_batch_size=2", "train.dtype=bf16", f"data.path={corpus}",
                f"data.tokenizer={workdir / 'tok4k.model'}"]
    cfg_args = base + ["model.kernels=auto", f"train.max_steps={steps}", f"train.out_dir={workdir / 'e2e'}",
                       f"data.cache_dir={workdir / 'cache'}", "train.eval_every=0", "train.checkpoint_every=0",
                       "train.save_final=false", "train.eval_batches=1", "train.progress=false",
                       "train.tensorboard=false", "train.curves=false", "train.resume=none", "optim.warmup_steps=2"]
    row = {"args": cfg_args, "steps": steps, "warmup_steps_excluded": warm}
    emit({"started": True, **row})
    trainer = Trainer(load_config(cfg_args))
    row["kernel_plan"] = trainer.kernel_plan.ops
    times: list[float] = []
    syncs: list[int] = []
    orig = trainer.train_step

    def timed_step():
        measured = len(times) >= warm
        if measured and dev.type == "cuda" and len(times) == warm:
            torch.cuda.reset_peak_memory_stats(dev)
        counter = _SyncCounter(dev) if measured else None
        t0 = time.perf_counter()
        if counter is not None:
            with counter:
                out = orig()
        else:
            out = orig()
        _sync(dev)  # the step already read its loss; this closes any trailing work
        times.append(time.perf_counter() - t0)
        if counter is not None:
            syncs.append(counter.count)
        return out

    trainer.train_step = timed_step
    t0 = time.perf_counter()
    summary = trainer.fit()
    row["wall_s"] = time.perf_counter() - t0
    tokens_per_step = trainer.tokens_per_step
    measured = times[warm:]
    row.update(
        step_s=times, compile_steps_s=sum(times[:warm]), final_train_loss=summary["final_train_loss"],
        num_params=summary["num_params"], flops_per_token=trainer.flops_per_token,
        tokens_per_s=tokens_per_step * len(measured) / sum(measured) if measured else None,
        tokens_per_s_all_steps=summary["tokens_per_s"],
        host_syncs_per_step=(sum(syncs) / len(syncs)) if syncs else None,
        host_sync_counter="torch.cuda.set_sync_debug_mode" if dev.type == "cuda" else "Tensor.item/tolist calls (CPU)",
        final_checkpoint_written=any((workdir / "e2e").rglob("COMPLETE")),
    )
    row["mfu"] = mfu(trainer.flops_per_token, row["tokens_per_s"], dev) if row["tokens_per_s"] else None
    if dev.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    emit(row)
    print("  " + json.dumps({k: row.get(k) for k in ("tokens_per_s", "mfu", "host_syncs_per_step", "peak_memory_gib",
                                                      "compile_steps_s", "final_train_loss")}), flush=True)
    ok = row["tokens_per_s"] and math.isfinite(row["final_train_loss"] or math.nan)
    return 0 if ok else 3


SECTION_FNS = {
    "env": section_env,
    "timing_lctrain": section_timing_lctrain,
    "timing_fla": section_timing_fla,
    "correctness": section_correctness,
    "kernel_tests": section_kernel_tests,
    "end_to_end": section_end_to_end,
}


def _device(args):
    import torch

    return torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")


# ------------------------------------------------------------------------------------------ driver


def run_section(args) -> int:
    """Child process: run one section, appending each result row to ``--part`` as a JSON line."""
    part = Path(args.part)

    def emit(row: dict) -> None:
        with part.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    forced = dict(f.split("=", 1) for f in args.force)
    if forced.get(args.section) == "raise":
        raise RuntimeError(f"forced failure of section {args.section} (--force)")
    if forced.get(args.section) == "sleep":
        emit({"note": "forced to hang (--force)"})
        time.sleep(3600)
    return SECTION_FNS[args.section](args, emit)


def time_plan(args) -> list[tuple[str, int]]:
    """The sections to run with their timeouts (``--sections``, ``--timeout`` applied)."""
    overrides = {k: int(v) for k, v in (t.split("=", 1) for t in args.timeout)}
    chosen = args.sections or [s for s, *_ in SECTIONS]
    unknown = set(chosen) - set(SECTION_FNS)
    if unknown:
        raise SystemExit(f"error: unknown sections {sorted(unknown)}; known: {', '.join(SECTION_FNS)}")
    plan = []
    for name, gpu_s, dry_s in SECTIONS:
        if name in chosen:
            plan.append((name, overrides.get(name, dry_s if args.dry_run else gpu_s)))
    return plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every section's CPU stand-in (Triton interpreter)")
    ap.add_argument("--out", default="", help="the JSON, rewritten after every section")
    ap.add_argument("--workdir", default=str(REPO / "runs" / "gpu_check"))
    ap.add_argument("--sections", nargs="*", default=None, help=f"subset of: {', '.join(SECTION_FNS)}")
    ap.add_argument("--timeout", action="append", default=[], metavar="SECTION=SECONDS")
    ap.add_argument("--force", action="append", default=[], metavar="SECTION=raise|sleep",
                    help="make a section fail or hang (tests that the others survive)")
    ap.add_argument("--steps", type=int, default=14, help="end-to-end steps (GPU)")
    ap.add_argument("--warmup-steps", type=int, default=4, help="first end-to-end steps left out of tokens/s, MFU")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)  # child: run this section
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--section-timeout", type=int, default=60, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.force and not all("=" in f and f.split("=", 1)[1] in ("raise", "sleep") for f in args.force):
        raise SystemExit("error: --force takes SECTION=raise or SECTION=sleep")
    if args.section:
        return run_section(args)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2
    plan = time_plan(args)
    total = sum(t for _, t in plan)
    print(f"[gpu_check] time plan ({'dry run' if args.dry_run else 'GPU'}), each section a subprocess with "
          f"its timeout; at most {total} s in all (budget {BUDGET_S} s on a GPU):", flush=True)
    for name, tmo in plan:
        print(f"  {name:15s} <= {tmo:4d} s", flush=True)
    if not args.dry_run and total > BUDGET_S:
        print(f"error: the plan takes up to {total} s, over the {BUDGET_S} s budget", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result = {"dry_run": args.dry_run, "time_plan_s": dict(plan), "budget_s": BUDGET_S, "sections": {}}
    out = Path(args.out) if args.out else None

    def write() -> None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1, default=str))
            tmp.replace(out)

    t_start = time.perf_counter()
    write()
    for name, tmo in plan:
        print(f"[gpu_check] {name} (timeout {tmo} s)", flush=True)
        part, log = workdir / f"{name}.jsonl", workdir / f"{name}.log"
        part.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--part", str(part),
               "--workdir", str(workdir), "--section-timeout", str(tmo), "--steps", str(args.steps),
               "--warmup-steps", str(args.warmup_steps)]
        cmd += ["--dry-run"] if args.dry_run else []
        for f in args.force:
            cmd += ["--force", f]
        t0 = time.perf_counter()
        with log.open("w") as errf:
            proc = subprocess.Popen(cmd, cwd=REPO, stderr=errf, start_new_session=True)
            try:
                rc = proc.wait(timeout=tmo)
                status = {0: "ok", 3: "fail"}.get(rc, "error")
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the section and anything it started
                proc.wait()
                rc, status = None, "timeout"
        rows = [json.loads(ln) for ln in part.read_text().splitlines() if ln.strip()] if part.exists() else []
        sec = {"status": status, "returncode": rc, "seconds": round(time.perf_counter() - t0, 2), "timeout_s": tmo,
               "rows": rows}
        if status in ("error", "timeout"):
            tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            sec["stderr_tail"] = tail[-15:]
        result["sections"][name] = sec
        result["wall_s"] = round(time.perf_counter() - t_start, 2)
        write()
        print(f"[gpu_check] {name}: {status} in {sec['seconds']:.1f} s"
              + (f": {sec['stderr_tail'][-1]}" if sec.get("stderr_tail") else ""), flush=True)
    bad = {n: s["status"] for n, s in result["sections"].items() if s["status"] != "ok"}
    print(f"[gpu_check] done in {result['wall_s']:.0f} s; " + (f"not ok: {bad}" if bad else "every section ok")
          + (f"; JSON: {out}" if out else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
