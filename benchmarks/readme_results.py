"""Regenerate the README's result tables from the JSON under ``benchmarks/results/``.

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in README.md and
is written only from a results file, so every number in it has a JSON behind it::

    python benchmarks/readme_results.py          # rewrite README.md (and docs/context_parallel.md)
    python benchmarks/readme_results.py --check  # exit 1 if a page is out of date (a test runs this)

Tables: ``quickstart`` and ``mixers`` from ``compare_mixers_cpu.json``
(``benchmarks/compare_mixers.py``), ``bam`` from ``bam_cpu.json``, ``recall`` from
``recall_vs_ratio_cpu.json`` and ``cp_train`` from ``context_parallel_train_cpu.json``
(``benchmarks/context_parallel.py``) when those files exist.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

MIXER_NOTES = {
    "hybrid_gdn_3to1": "dense baseline (GGGA)",
    "hybrid_gdn_3to1_moh": "GGGH: MoH, 1 shared + top-2 of 3 routed heads",
    "hybrid_gdn_3to1_moa": "GGGE: top-2 of 4 attention experts, shared K/V head",
    "hybrid_gdn_3to1_lora_mixer": "GGGA + LoRA-Mixer (4 rank-8 experts, top-1) on A and G projections",
    "hybrid_gdn_moba": "GMGA: MoBA block 64, top-3 (last layer full attention)",
}


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def quickstart_table() -> str | None:
    d = _load("compare_mixers_cpu.json")
    if not d or "hybrid_gdn_3to1" not in d:
        return None
    r, about = d["hybrid_gdn_3to1"], d["_about"]
    steps = [s for s, _ in r["val_history"]]
    loss = [v for _, v in r["val_history"]]
    lines = [
        f"`hybrid_gdn_3to1`, scale `{about['scale']}`, {r['num_params'] / 1e6:.2f} M parameters, {r['steps']} steps = "
        f"{r['tokens'] / 1e6:.2f} M tokens, {about['nproc']} gloo ranks x {about['threads_per_rank']} thread on "
        f"{about['machine']} (`benchmarks/results/compare_mixers_cpu.json`; command there):",
        "",
        "| step | " + " | ".join(str(s) for s in steps) + " |",
        "|---|" + "---|" * len(steps),
        "| validation loss | " + " | ".join(f"{x:.2f}" for x in loss) + " |",
        "| validation perplexity | " + " | ".join(f"{math.exp(x):.0f}" for x in loss) + " |",
        "",
        f"Wall time {r['wall_s'] / 60:.1f} min including tokenizer training and evaluation, "
        f"{r['tokens_per_s']:.0f} tokens/s while training.",
    ]
    return "\n".join(lines)


def mixers_table() -> str | None:
    d = _load("compare_mixers_cpu.json")
    if not d:
        return None
    rows = {k: v for k, v in d.items() if not k.startswith("_")}
    base = rows.get("hybrid_gdn_3to1")
    lines = [
        "| recipe | layers | params | val loss | val ppl | tokens/s | vs dense | routing figure |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        fig = []
        if r.get("active_head_fraction") is not None:
            fig.append(f"active heads {r['active_head_fraction']:.2f}")
        if r.get("attended_fraction") is not None:
            fig.append(f"attended keys {r['attended_fraction']:.2f}")
        routing = r.get("routing") or {}
        if routing.get("load_max_mean"):
            last = routing["load_max_mean"][-1]
            fig.append(f"max/mean load {last:.2f}")
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        lines.append(
            f"| `{name}` | {MIXER_NOTES.get(name, '')} | {r['num_params'] / 1e6:.2f} M | {r['final_val_loss']:.3f} | "
            f"{r['final_val_ppl']:.1f} | {r['tokens_per_s']:.0f} | {ratio:.2f}x | {', '.join(fig) or '-'} |"
        )
    return "\n".join(lines)


def bam_table() -> str | None:
    d = _load("bam_cpu.json")
    if not d or "val_loss" not in d:
        return None
    table, budget = d["val_loss"], d.get("budget", {})
    domains = [k for k in next(iter(table.values())) if k != "mean"]
    lines = ["| model | " + " | ".join(domains) + " | mean | steps (this stage) | total steps | params |",
             "|---|" + "---|" * (len(domains) + 4)]
    for model, row in table.items():
        b = budget.get(model, {})
        lines.append(f"| {model} | " + " | ".join(f"{row[dom]:.4f}" for dom in domains) + f" | {row['mean']:.4f} | "
                     f"{b.get('steps', '-')} | {b.get('total_steps', '-')} | {b.get('num_params', 0) / 1e6:.2f} M |")
    return "\n".join(lines)


def recall_table() -> str | None:
    d = _load("recall_vs_ratio_cpu.json")
    if not d or "runs" not in d:
        return None
    text = any("text_val_loss" in r for r in d["runs"])
    head = "| model | pattern | MQAR accuracy | val loss (answers) | params | train s |"
    rule = "|---|---|---|---|---|---|"
    if text:
        head, rule = head + " text val loss | text val ppl |", rule + "---|---|"
    lines = [head, rule]
    for r in d["runs"]:
        line = (f"| {r['ratio']} | `{r['pattern']}` | {r['accuracy']:.3f} | {r['final_val_loss']:.3f} | "
                f"{r['num_params'] / 1e6:.2f} M | {r['train_time_s']:.0f} |")
        if text:
            line += f" {r['text_val_loss']:.3f} | {r['text_val_ppl']:.1f} |" if "text_val_loss" in r else " - | - |"
        lines.append(line)
    return "\n".join(lines)


def cp_train_table() -> str | None:
    d = _load("context_parallel_train_cpu.json")
    if not d or "rows" not in d:
        return None
    rows = {(r["recipe"], r["seq_len"], r["config"]): r for r in d["rows"]}
    configs = [c for c in ("ring", "ulysses") if any(k[2] == c for k in rows)]
    head = "| recipe | tokens | cp=1 peak MiB | cp=1 tokens/s |" + "".join(
        f" cp=2 {c} peak MiB (x cp=1) | cp=2 {c} tokens/s (x cp=1) |" for c in configs)
    lines = [head, "|---|---|---|---|" + "---|---|" * len(configs)]
    for (recipe, T, config), base in rows.items():
        if config != "cp1":
            continue
        line = f"| `{recipe}` | {T} | {base['peak_rss_mib']:.0f} | {base['tokens_per_s']:.0f} |"
        for c in configs:
            r = rows.get((recipe, T, c))
            line += (f" {r['peak_rss_mib']:.0f} ({r['peak_ratio']:.2f}x) | {r['tokens_per_s']:.0f} "
                     f"({r['tokens_per_s_ratio']:.2f}x) |" if r else " - | - |")
        lines.append(line)
    fits = [f for f in d.get("max_seq_len_fits", []) if f["max_seq_len_under_cap"]]
    if fits:
        cap = fits[0]["mem_cap_mib"]
        by = {}
        for f in fits:
            by.setdefault(f["recipe"], {})[f["config"]] = f["max_seq_len_under_cap"]
        parts = []
        for recipe, v in by.items():
            cells = ", ".join(f"{c} {n // 1024}K" for c, n in v.items())
            parts.append(f"`{recipe}` {cells}")
        lines += ["", f"Longest sequence under {cap / 1024:.0f} GiB per rank (straight line through the measured "
                      f"peaks): " + "; ".join(parts) + "."]
    g = d.get("gdn_over_attention_peak_cp1")
    if g is not None:
        lines.append(f"All-GDN peak / all-attention peak at cp=1, {d['config']['target_len']} tokens: {g:.2f}x.")
    return "\n".join(lines)


TABLES = {"quickstart": quickstart_table, "mixers": mixers_table, "bam": bam_table, "recall": recall_table,
          "cp_train": cp_train_table}


def render(readme: str) -> str:
    """``readme`` with every marked table replaced by its regenerated text (unknown data: left as is)."""
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n)(.*?)(<!-- /results:{name} -->)", re.S)
        text = make()
        if text is not None and pattern.search(readme):
            readme = pattern.sub(lambda m, t=text: m.group(1) + t + "\n" + m.group(3), readme)
    return readme


DOCS = [REPO / "docs" / "context_parallel.md"]  # other pages with marked tables


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when a page differs from the regenerated one")
    ap.add_argument("--readme", default=str(REPO / "README.md"))
    args = ap.parse_args()
    stale = []
    for path in [Path(args.readme), *DOCS]:
        if not path.exists():
            continue
        old = path.read_text()
        new = render(old)
        if args.check:
            if new != old:
                stale.append(path.name)
        else:
            path.write_text(new)
    if stale:
        print(f"result tables out of date in {', '.join(stale)}: run python benchmarks/readme_results.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
