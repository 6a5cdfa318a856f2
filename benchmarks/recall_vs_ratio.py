"""Recall vs. the linear:full attention ratio: MQAR accuracy of pure GDN, GDN 7:1, 3:1, 1:1 and pure attention.

The question of "A Systematic Analysis of Hybrid Linear Attention" (2025) at CPU scale: does
recall (there: RULER, 0.256 for pure linear attention, 0.397 at 3:1, 0.423 for a Transformer
at 340M) recover as softmax-attention layers are mixed into a Gated DeltaNet stack? Here each of
five 8-layer models with the same width, data, steps and seed is trained by the ordinary trainer
on the synthetic MQAR task (``data.path=synthetic:mqar?...``, loss on the answer tokens only),
then evaluated with ``launch/eval.py task=mqar`` on fresh examples:

=============  =========  =================================
name           pattern    recipe
=============  =========  =================================
gdn            GGGGGGGG   ``lctrain/recipes/mqar_gdn.yaml``
gdn_7to1       GGGGGGGA   ``mqar_gdn_7to1``
gdn_3to1       GGGA x 2   ``mqar_gdn_3to1``
gdn_1to1       GA x 4     ``mqar_gdn_1to1``
transformer    AAAAAAAA   ``mqar_transformer``
=============  =========  =================================

Each training and evaluation is a subprocess (``launch/train.py`` / ``launch/eval.py``) whose
command line is recorded, with wall times, the validation loss (answer tokens), the MQAR accuracy
and its breakdown by key-query distance. ``--text-steps N`` also trains the five patterns on the
built-in corpus for N steps and records their validation loss (perplexity); 0 skips it.

    python benchmarks/recall_vs_ratio.py --out benchmarks/results/recall_vs_ratio_cpu.json

writes the JSON and a PNG next to it (same name, ``.png``). Extra ``key=value`` arguments after
``--`` go to every training command (e.g. ``-- train.max_steps=100``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODELS = [  # (name, recipe, the 8-layer pattern, softmax-attention layers out of 8)
    ("gdn", "mqar_gdn", "GGGGGGGG", 0),
    ("gdn_7to1", "mqar_gdn_7to1", "GGGGGGGA", 1),
    ("gdn_3to1", "mqar_gdn_3to1", "GGGAGGGA", 2),
    ("gdn_1to1", "mqar_gdn_1to1", "GAGAGAGA", 4),
    ("transformer", "mqar_transformer", "AAAAAAAA", 8),
]

PAPER_RULER = {"pure linear": 0.256, "3:1": 0.397, "transformer": 0.423}  # 340M, the paper's RULER averages


def run(cmd: list[str], log: Path, env: dict) -> float:
    """Run ``cmd`` (stdout+stderr to ``log``); returns its wall time. Raises CalledProcessError on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recall_vs_ratio_cpu.json"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "recall_vs_ratio"), help="run directories")
    ap.add_argument("--eval-examples", type=int, default=512)
    ap.add_argument("--text-steps", type=int, default=0, help="also train on pd_english for this many steps")
    ap.add_argument("--only", default="", help="comma list of model names to run (default all)")
    ap.add_argument("--jobs", type=int, default=1, help="models trained at the same time (one process each)")
    ap.add_argument("--plot-only", action="store_true", help="only redraw the PNG from an existing --out JSON")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every training run")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    py = sys.executable
    only = set(args.only.split(",")) if args.only else None
    t_all = time.perf_counter()

    def one(name: str, recipe: str, pattern: str, n_attn: int) -> dict:
        run_dir = work / name
        for stale in (run_dir, work / f"{name}_text"):  # an earlier run's eval history would be appended to
            shutil.rmtree(stale, ignore_errors=True)
        train_cmd = [py, "launch/train.py", f"recipe={recipe}", f"train.out_dir={run_dir}", "train.resume=none",
                     "train.progress=false", "train.tensorboard=false", *args.overrides]
        eval_cmd = [py, "launch/eval.py", f"run={run_dir}", "task=mqar", f"num_examples={args.eval_examples}",
                    f"out={run_dir / 'eval_final'}"]
        print(f"[recall_vs_ratio] {name}: training", flush=True)
        t_train = run(train_cmd, run_dir.with_suffix(".train.log"), env)
        t_eval = run(eval_cmd, run_dir.with_suffix(".eval.log"), env)
        summary = json.loads((run_dir / "summary.json").read_text())
        mqar = json.loads((run_dir / "eval_final" / "mqar.json").read_text())
        history = []
        hist_file = run_dir / "eval" / "history.jsonl"
        if hist_file.exists():
            history = [json.loads(x) for x in hist_file.read_text().splitlines()]
        row = {
            "name": name, "recipe": recipe, "pattern": pattern,
            "attention_layers": n_attn, "linear_layers": 8 - n_attn,
            "ratio": "pure linear" if n_attn == 0 else ("transformer" if n_attn == 8 else f"{(8 - n_attn) // n_attn}:1"),
            "train_command": " ".join(train_cmd[1:]), "eval_command": " ".join(eval_cmd[1:]),
            "train_time_s": round(t_train, 1), "eval_time_s": round(t_eval, 1),
            "num_params": summary["num_params"], "steps": summary["steps"], "tokens": summary["tokens"],
            "tokens_per_s": round(summary["tokens_per_s"], 1),
            "final_train_loss": summary["final_train_loss"], "final_val_loss": summary["final_val_loss"],
            "val_history": summary["val_history"], "accuracy": mqar["accuracy"],
            "accuracy_by_distance": mqar["by_distance"], "accuracy_history": history,
            "chance_in_context": mqar["chance_in_context"], "chance_uniform_values": mqar["chance_uniform_values"],
            "mqar_spec": mqar["spec"],
        }
        if args.text_steps:
            text_dir = work / f"{name}_text"
            text_cmd = [py, "launch/train.py", f"recipe={recipe}", "data.path=pd_english", "model.vocab_size=4096",
                        "data.seq_len=256", f"train.max_steps={args.text_steps}", f"train.out_dir={text_dir}",
                        "train.resume=none", "train.progress=false", "train.tensorboard=false", "train.eval_tasks=[]",
                        "train.eval_every=0", "train.global_batch_size=8", "train.micro_batch_size=8",
                        "optim.lr=3e-3", "optim.weight_decay=0.1"]
            t_text = run(text_cmd, text_dir.with_suffix(".train.log"), env)
            ts = json.loads((text_dir / "summary.json").read_text())
            row.update(text_command=" ".join(text_cmd[1:]), text_time_s=round(t_text, 1),
                       text_val_loss=ts["final_val_loss"], text_val_ppl=ts["final_val_ppl"])
        print(f"[recall_vs_ratio] {name}: accuracy {row['accuracy']:.3f}, val loss {row['final_val_loss']:.3f}, "
              f"train {t_train:.0f}s, eval {t_eval:.0f}s", flush=True)
        return row

    chosen = [m for m in MODELS if not only or m[0] in only]
    # each run is one process with OMP_NUM_THREADS threads: --jobs of them share the machine's cores
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda m: one(*m), chosen))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "recall_vs_ratio", "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "total_time_s": round(time.perf_counter() - t_all, 1), "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "omp_num_threads": env["OMP_NUM_THREADS"], "jobs": args.jobs,
        "paper_ruler_340m": PAPER_RULER, "runs": results,
    }
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(f"[recall_vs_ratio] wrote {out} and {out.with_suffix('.png')} in {report['total_time_s']:.0f}s", flush=True)


def plot(report: dict, path: Path) -> None:
    """Bars: MQAR accuracy per model (chance marked); line on a second axis: validation loss."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = report["runs"]
    names = [f"{r['name']}\n({r['attention_layers']}/8 attn)" for r in runs]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.bar(range(len(runs)), [r["accuracy"] for r in runs], color="tab:blue", label="MQAR accuracy")
    for i, r in enumerate(runs):
        ax.text(i, r["accuracy"] + 0.01, f"{r['accuracy']:.3f}", ha="center", fontsize=8)
    if runs:
        ax.axhline(runs[0]["chance_in_context"], color="gray", ls="--", lw=1, label="chance (in-context values)")
    ax.set_xticks(range(len(runs)), names, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("MQAR accuracy")
    ax2 = ax.twinx()
    ax2.plot(range(len(runs)), [r["final_val_loss"] for r in runs], color="tab:red", marker="o", label="val loss")
    ax2.set_ylabel("validation loss on answers (nats)", color="tab:red")
    if runs:
        s = runs[0]["mqar_spec"]
        ax.set_title(f"MQAR (V={s['vocab']}, {s['num_pairs']} pairs, T={s['seq_len']}) vs softmax-attention layers, "
                     f"{runs[0]['steps']} steps", fontsize=9)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
