"""PNG charts of evaluation results (matplotlib, Agg backend: no display needed).

One function per task, ``plot_<task>(result, path)``, drawing what the task's result dict holds.

Raises:
    ImportError: matplotlib is not installed (``pip install matplotlib``).
"""

from __future__ import annotations

import math
from pathlib import Path

from lctrain.train.curves import pyplot, save_figure


def plot_perplexity(result: dict, path: Path) -> None:
    """Loss by position bucket (line) and the per-document loss distribution (histogram)."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    pts = [r for r in result["by_position"] if r["loss"] is not None]
    a.plot([(r["start"] + r["end"] - 1) / 2 for r in pts], [r["loss"] for r in pts], marker="o")
    a.set_xscale("symlog", linthresh=1)
    a.set_xlabel("position in the context window (bucket centre)")
    a.set_ylabel("loss (nats / token)")
    a.set_title(f"loss {result['loss']:.3f}, ppl {result['ppl']:.1f} ({result['tokens']} tokens)")
    a.grid(alpha=0.3)
    b.hist([d["loss"] for d in result["per_document"]], bins=min(30, max(5, len(result["per_document"]))))
    b.set_xlabel("document loss")
    b.set_ylabel("documents")
    b.set_title(f"{result['num_docs']} documents, {result['source']}")
    save_figure(fig, path)


def plot_mqar(result: dict, path: Path) -> None:
    """Accuracy by key-to-query distance bucket with the chance levels."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    bk = result["by_distance"]
    ax.bar(range(len(bk)), [b["accuracy"] for b in bk], color="tab:blue")
    ax.set_xticks(range(len(bk)), [f"{b['start']}-{b['end'] - 1}" for b in bk], rotation=30)
    ax.axhline(result["chance_in_context"], color="gray", ls="--", label="chance (in-context values)")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("tokens between the key-value pair and its query")
    ax.set_ylabel("accuracy")
    s = result["spec"]
    ax.set_title(f"MQAR accuracy {result['accuracy']:.3f} (V={s['vocab']}, {s['num_pairs']} pairs, T={s['seq_len']})")
    ax.legend(loc="upper right", fontsize=8)
    save_figure(fig, path)


def plot_passkey(result: dict, path: Path) -> None:
    """Heatmap of accuracy by key depth (rows) and prompt length (columns)."""
    plt = pyplot()
    grid = [[float("nan") if v is None else v for v in row] for row in result["grid"]]
    fig, ax = plt.subplots(figsize=(max(4.8, 2.0 + 1.1 * len(result["lengths"])), 1.4 + 0.55 * len(result["depths"])))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["lengths"])), [str(x) for x in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(f"passkey accuracy {result['accuracy']:.3f} ({result['mode']})")
    fig.colorbar(im, ax=ax, fraction=0.05)
    save_figure(fig, path)


def plot_niah(result: dict, path: Path) -> None:
    """Grouped bars: accuracy per subtask at each prompt length."""
    plt = pyplot()
    subs = list(result["by_subtask"])
    lengths = [str(x) for x in result["lengths"]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    w = 0.8 / max(1, len(lengths))
    for j, L in enumerate(lengths):
        ax.bar([i + j * w for i in range(len(subs))], [result["by_subtask"][s][L] for s in subs], w, label=f"{L} tok")
    ax.set_xticks([i + w * (len(lengths) - 1) / 2 for i in range(len(subs))], subs)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"needle in a haystack, mean accuracy {result['accuracy']:.3f} ({result['mode']})")
    ax.legend(fontsize=8)
    save_figure(fig, path)
