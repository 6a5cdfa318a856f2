"""``lctrain-plan`` / ``launch/plan.py``: will this run fit, and what is the longest sequence that does?

``python launch/plan.py recipe=NAME [scale=NAME] [key=value ...] --gpu h100-80gb --gpus N [--fit]
[--json PATH]``

Without ``--fit``: the per-rank memory of one training step of the given layout (parts, saved
activations per block, reserve, predicted peak against the GPU's memory). With ``--fit``:

* no ``data.seq_len`` given: the longest ``seq_len`` that fits on ``N`` GPUs. Memory per rank is
  linear in the sequence length with fused attention, so each candidate layout is traced at two
  lengths, the line is solved for the GPU's memory, and the answer is traced again to confirm it.
  Candidates: ``cp_degree = N`` (ring, Ulysses), with FSDP, activation checkpointing and the
  chunked loss on (each lowers memory only); ``micro_batch_size=1``.
* ``data.seq_len`` given: the layout with the fewest memory-saving switches that fits it: cp
  degree ascending, then activation checkpointing, then the chunked loss.

Exit codes: 0 (fits / an answer), 1 (does not fit / no layout fits), 2 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from lctrain.errors import ConfigError

LOSS_CHUNK = 4096


def _parse(argv: list[str]):
    from lctrain.planner.memory import GPUS

    ap = argparse.ArgumentParser(prog="lctrain-plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    ap.add_argument("--gpus", type=int, default=1, help="number of GPUs (ranks) of the run")
    ap.add_argument("--gpu-mib", type=float, default=None, help="memory per GPU in MiB (instead of --gpu's)")
    ap.add_argument("--fit", action="store_true", help="search the layout / the longest seq_len that fits")
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    ap.add_argument("--target", default="cuda", choices=("cuda", "cpu"), help="kernel plan device (default cuda)")
    ap.add_argument("overrides", nargs="*", help="recipe=NAME scale=NAME section.key=value ...")
    return ap.parse_args(argv)


def _layout_cfg(cfg, *, seq_len=None, cp=None, cp_impl=None, ac=None, loss_chunk=None, dp_impl=None):
    """A copy of ``cfg`` with the layout keys replaced (validated like a command line)."""
    import dataclasses

    from lctrain.config import check_cp_layout, check_mixers_context_parallel

    m, p, d, t = cfg.model, cfg.parallel, cfg.data, cfg.train
    if ac is not None or loss_chunk is not None:
        m = dataclasses.replace(m, activation_checkpointing=m.activation_checkpointing if ac is None else ac,
                                loss_chunk_size=m.loss_chunk_size if loss_chunk is None else loss_chunk)
    if cp is not None or cp_impl is not None or dp_impl is not None:
        p = dataclasses.replace(p, cp_degree=p.cp_degree if cp is None else cp,
                                cp_impl=p.cp_impl if cp_impl is None else cp_impl,
                                dp_impl=p.dp_impl if dp_impl is None else dp_impl, dp_degree=-1)
    if seq_len is not None:
        d = dataclasses.replace(d, seq_len=seq_len)
    t = dataclasses.replace(t, micro_batch_size=1 if seq_len is not None else t.micro_batch_size)
    if p.cp_degree > 1:
        check_cp_layout(p.cp_degree, p.cp_impl, p.ulysses_degree, d.seq_len)
        check_mixers_context_parallel(m, p.cp_degree, p.cp_impl, p.ulysses_degree, d.seq_len)
    return dataclasses.replace(cfg, model=m, parallel=p, data=d, train=t)


def _fits(est, capacity: float) -> bool:
    return est.predicted_peak_mib <= capacity


def longest_seq_len(cfg, gpus: int, capacity: float, target: str = "cuda", log=print,
                    impls: tuple[str, ...] = ("ring", "ulysses")) -> list[dict]:
    """The longest ``seq_len`` per candidate layout (see the module docstring), best first."""
    from lctrain.planner.memory import estimate

    impls = list(impls) if gpus > 1 else ["ring"]
    out = []
    for impl in impls:
        cp = gpus
        unit = 2 * cp * 1024  # zigzag chunks of whole 512-token multiples
        try:
            probes = [_layout_cfg(cfg, seq_len=unit * k, cp=cp, cp_impl=impl, ac=True, loss_chunk=LOSS_CHUNK,
                                  dp_impl="fsdp" if gpus > 1 else "ddp") for k in (4, 8)]
        except ConfigError as e:
            log(f"  cp_degree={cp} {impl}: not a valid layout ({e})")
            continue
        pts = [(c.data.seq_len, estimate(c, gpus, target=target).predicted_peak_mib) for c in probes]
        (t1, m1), (t2, m2) = pts
        slope = (m2 - m1) / (t2 - t1)
        traced: dict[int, tuple] = {}

        def at(k, impl=impl, cp=cp, unit=unit):
            if k not in traced:
                c = _layout_cfg(cfg, seq_len=unit * k, cp=cp, cp_impl=impl, ac=True, loss_chunk=LOSS_CHUNK,
                                dp_impl="fsdp" if gpus > 1 else "ddp")
                traced[k] = (c, estimate(c, gpus, target=target))
            return traced[k]

        # bracket the answer: start at the line's solution, then halve the gap between the longest
        # length that fits and the shortest that does not (to 1/8 of the answer)
        guess = max(1, int(((capacity - m1) / slope + t1) // unit)) if slope > 0 else 16
        lo, hi = 0, None
        k = guess
        while True:
            if _fits(at(k)[1], capacity):
                lo = k
                if hi is not None or k >= 4096:  # 4096 units: millions of tokens per rank, past any GPU here
                    break
                k *= 2
            else:
                hi = k
                if k == 1 or lo:
                    break
                k //= 2
        while lo and hi and hi - lo > max(1, lo // 8):
            mid = (lo + hi) // 2
            if _fits(at(mid)[1], capacity):
                lo = mid
            else:
                hi = mid
        best = at(lo) if lo else None
        if best is None:
            log(f"  cp_degree={cp} {impl}: nothing fits (even {unit} tokens)")
            continue
        c, est = best
        log(f"  cp_degree={cp} {impl}: seq_len {c.data.seq_len:,} -> {est.predicted_peak_mib / 1024:.1f} GiB "
            f"(line through {t1:,}: {m1 / 1024:.1f} GiB and {t2:,}: {m2 / 1024:.1f} GiB)")
        out.append({"seq_len": c.data.seq_len, "layout": est.layout, "predicted_peak_mib": est.predicted_peak_mib,
                    "parts": est.parts, "probes": pts, "overrides": _overrides(c)})
    return sorted(out, key=lambda r: -r["seq_len"])


def smallest_layout(cfg, gpus: int, capacity: float, target: str = "cuda", log=print) -> dict | None:
    """The first layout that fits ``cfg.data.seq_len``: cp ascending, then AC, then the chunked loss."""
    from lctrain.planner.memory import estimate

    cps = [c for c in (2**i for i in range(int(math.log2(gpus)) + 1)) if gpus % c == 0]
    for cp in cps:
        for impl in (["ring", "ulysses"] if cp > 1 else ["ring"]):
            for ac, chunk in ((False, 0), (True, 0), (True, LOSS_CHUNK)):
                try:
                    c = _layout_cfg(cfg, seq_len=cfg.data.seq_len, cp=cp, cp_impl=impl, ac=ac, loss_chunk=chunk,
                                    dp_impl="fsdp" if gpus > 1 else "ddp")
                except ConfigError as e:
                    log(f"  cp_degree={cp} {impl}: not a valid layout ({e})")
                    break
                est = estimate(c, gpus, target=target)
                log(f"  cp_degree={cp} {impl} activation_checkpointing={ac} loss_chunk_size={chunk}: "
                    f"{est.predicted_peak_mib / 1024:.1f} GiB")
                if _fits(est, capacity):
                    return {"seq_len": c.data.seq_len, "layout": est.layout, "predicted_peak_mib": est.predicted_peak_mib,
                            "parts": est.parts, "overrides": _overrides(c)}
    return None


def _overrides(c) -> str:
    p, m = c.parallel, c.model
    s = f"data.seq_len={c.data.seq_len} train.micro_batch_size={c.train.micro_batch_size} parallel.dp_impl={p.dp_impl}"
    if p.cp_degree > 1:
        s += f" parallel.cp_degree={p.cp_degree} parallel.cp_impl={p.cp_impl}"
    if m.activation_checkpointing:
        s += " model.activation_checkpointing=true"
    if m.loss_chunk_size:
        s += f" model.loss_chunk_size={m.loss_chunk_size}"
    return s


def report(est, capacity: float, gpu: str) -> str:
    """The estimate as a table (MiB and GiB)."""
    lines = [f"per-rank memory of one training step ({est.layout['world_size']} ranks: dp={est.layout['dp']} "
             f"cp={est.layout['cp']} ep={est.layout['ep']}, {est.layout['dp_impl']}, "
             f"activation_checkpointing={est.layout['activation_checkpointing']}, "
             f"loss_chunk_size={est.layout['loss_chunk_size']}, seq_len={est.layout['seq_len']:,})"]
    lines.append("  at the peak:")
    for k, v in sorted(est.parts.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {k:<18} {v:12.1f} MiB")
    lines.append(f"  live-tensor peak   {est.peak_live_mib:12.1f} MiB")
    lines.append(f"  reserve            {est.reserve_mib:12.1f} MiB  ({'; '.join(est.assumptions[:1])})")
    lines.append(f"  predicted peak     {est.predicted_peak_mib:12.1f} MiB = {est.predicted_peak_mib / 1024:.1f} GiB "
                 f"of {capacity / 1024:.1f} GiB ({gpu}): {'fits' if est.predicted_peak_mib <= capacity else 'DOES NOT FIT'}")
    if est.saved_per_block:
        kinds: dict[str, list[float]] = {}
        for name, v in est.saved_per_block.items():
            kinds.setdefault(name.split(":")[1], []).append(v)
        lines.append("  saved for backward per block: " + ", ".join(
            f"{k} {sum(v) / len(v):.1f} MiB x {len(v)}" for k, v in kinds.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lctrain-plan`` (see the module docstring)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        from lctrain.config import load_config
        from lctrain.planner.memory import GPUS, estimate

        cfg = load_config(args.overrides)
        capacity = args.gpu_mib if args.gpu_mib else GPUS[args.gpu]
        if args.gpus < 1 or args.gpus & (args.gpus - 1):
            raise ConfigError(f"--gpus={args.gpus}: the planner takes a power of two (1, 2, 4, 8, ...)")
        t0 = time.perf_counter()
        result: dict = {"command": "lctrain-plan " + " ".join(argv if argv is not None else sys.argv[1:]),
                        "gpu": args.gpu, "gpus": args.gpus, "capacity_mib": capacity}
        if args.fit:
            seq_given = any(o.startswith("data.seq_len=") for o in args.overrides)
            if seq_given:
                print(f"[lctrain-plan] the first layout that fits seq_len={cfg.data.seq_len:,} on {args.gpus} x {args.gpu}:")
                best = smallest_layout(cfg, args.gpus, capacity, args.target)
                result["fit"] = best
            else:
                print(f"[lctrain-plan] the longest seq_len on {args.gpus} x {args.gpu} (AC, chunked loss, FSDP on):")
                found = longest_seq_len(cfg, args.gpus, capacity, args.target)
                result["fit"] = found
                best = found[0] if found else None
            if best is None:
                print("[lctrain-plan] no layout fits", flush=True)
            else:
                print(f"[lctrain-plan] set: {best['overrides']}  (predicted {best['predicted_peak_mib'] / 1024:.1f} GiB "
                      f"per rank)", flush=True)
        else:
            est = estimate(cfg, args.gpus, target=args.target)
            print(report(est, capacity, args.gpu), flush=True)
            result["estimate"] = est.as_dict()
            best = est if est.predicted_peak_mib <= capacity else None
        result["time_s"] = time.perf_counter() - t0
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        return 0 if best is not None else 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
