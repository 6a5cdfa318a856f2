"""``train.compile=true`` on CPU: tokens/s of training steps eager vs compiled (inductor), and the
graph breaks of one compiled block (``torch._dynamo.explain``).

::

    python benchmarks/compile_cpu.py --out benchmarks/results/compile_cpu.json

Each recipe at ``scale=cpu`` (shortened to ``--seq-len`` tokens, one sequence of packed
documents): ``--warmup`` steps (compilation) left out, then the median of ``--steps`` timed steps
(forward, backward, AdamW), eager and compiled, in one process with ``OMP_NUM_THREADS`` threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lctrain.config import load_config  # noqa: E402
from lctrain.kernels.varlen import attach_host_bounds  # noqa: E402
from lctrain.models import HybridLM  # noqa: E402
from lctrain.parallel import parallelize  # noqa: E402
from lctrain.parallel.mesh import DistEnv, ParallelDims  # noqa: E402


def _model(recipe: str, seq_len: int, compile_: bool):
    cfg = load_config([f"recipe={recipe}", "scale=cpu", f"data.seq_len={seq_len}", "model.kernels=torch",
                       f"train.compile={str(compile_).lower()}", "train.compile_backend=inductor"])
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    env, dims = DistEnv(0, 1, 0, torch.device("cpu"), None), ParallelDims(1, 1, 1)
    return parallelize(model, dims, dims.build_meshes(env), cfg, env).model, cfg


def _steps(model, vocab: int, seq_len: int, warmup: int, steps: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (1, seq_len + 1), generator=torch.Generator().manual_seed(1))
    b = [0, seq_len // 3, seq_len]
    cu = attach_host_bounds(torch.tensor(b, dtype=torch.int32), b)
    times, losses = [], []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(ids[:, :-1], cu_seqlens=cu)[0].reshape(-1, vocab), ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    timed = sorted(times[warmup:])
    med = timed[len(timed) // 2]
    return {"tokens_per_s": seq_len / med, "median_step_s": med, "warmup_s": sum(times[:warmup]),
            "losses": losses}


def graph_breaks(recipe: str, seq_len: int) -> list[dict]:
    """Graph breaks of each distinct block type's forward (``torch._dynamo.explain``)."""
    model, cfg = _model(recipe, seq_len, False)
    x = torch.randn(1, seq_len, cfg.model.d_model)
    b = [0, seq_len // 3, seq_len]
    cu = attach_host_bounds(torch.tensor(b, dtype=torch.int32), b)
    pos = torch.cat([torch.arange(b[1]), torch.arange(b[2] - b[1])])[None]
    out, seen = [], set()
    for i, block in enumerate(model.layers):
        kind = type(block.mixer).__name__ if hasattr(block, "mixer") else type(block).__name__
        if kind in seen:
            continue
        seen.add(kind)
        torch._dynamo.reset()
        try:
            ex = torch._dynamo.explain(block)(x, cu_seqlens=cu, position_ids=pos)
            out.append({"block": i, "mixer": kind, "graphs": ex.graph_count, "graph_breaks": ex.graph_break_count,
                        "reasons": sorted({str(r.reason).splitlines()[0][:200] for r in ex.break_reasons})})
        except Exception as e:
            out.append({"block": i, "mixer": kind, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", default=["hybrid_gdn_3to1", "transformer"])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "seq_len": args.seq_len, "recipes": {}}
    for recipe in args.recipes:
        row = {}
        for mode in ("eager", "inductor"):
            torch._dynamo.reset()
            model, cfg = _model(recipe, args.seq_len, mode == "inductor")
            row[mode] = _steps(model, cfg.model.vocab_size, args.seq_len, args.warmup, args.steps)
            print(f"{recipe} {mode}: {row[mode]['tokens_per_s']:.0f} tokens/s (warm-up {row[mode]['warmup_s']:.0f} s)",
                  flush=True)
        row["speedup"] = row["inductor"]["tokens_per_s"] / row["eager"]["tokens_per_s"]
        row["max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(row["inductor"]["losses"],
                                                                            row["eager"]["losses"]))
        row["graph_breaks"] = graph_breaks(recipe, args.seq_len)
        print(json.dumps({k: row[k] for k in ("speedup", "max_loss_rel_diff", "graph_breaks")}, indent=1), flush=True)
        res["recipes"][recipe] = row
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
