"""A picture of every run: ``train.out_dir/curves.png``, drawn from ``train.out_dir/metrics.jsonl``.

:class:`RunHistory` is a sink of :class:`~lctrain.train.metrics.MetricsLogger` (rank 0): every
scalar the logger writes to TensorBoard is appended to ``metrics.jsonl`` as one JSON line
``{"kind": "train" | "val", "step", "tokens", "scalars": {tag: value}}``, and ``curves.png`` is
redrawn at each checkpoint and when the logger closes (the end of the run, or a stop). A resumed
run keeps the lines up to the step it resumed from and drops the later ones (steps trained again).

The figure (:func:`plot_curves`), against tokens trained: training loss (each logged step, light,
with a running mean) and validation loss; the learning rate; where present the routing balance
(``moe/load_max_mean``: max / mean tokens per expert, 1 = even) and the accuracy of each
``train.eval_tasks`` task (``<task>/accuracy``).

``python -m lctrain.train.curves RUN_DIR`` redraws ``RUN_DIR/curves.png`` from its ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend (for run curves and evaluation charts).

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
    """
    try:
        import matplotlib  # optional dependency
    except ImportError as e:
        raise ImportError("charts need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG (110 dpi, tight layout) to ``path`` (parents created) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def read_history(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (an unreadable last line, from a killed run, is skipped)."""
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _series(rows: list[dict], kind: str, tag: str) -> tuple[list[float], list[float], list[int]]:
    xs, ys, steps = [], [], []
    for r in rows:
        v = r["scalars"].get(tag)
        if r["kind"] == kind and v is not None and math.isfinite(v):
            xs.append(r["tokens"])
            ys.append(v)
            steps.append(r["step"])
    return xs, ys, steps


def _running_mean(ys: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def _tokens_label(x: float, _pos=None) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


def run_title(run_dir: str | os.PathLike) -> str:
    """``recipe (scale): run_dir`` from the run's ``config.yaml`` (just ``run_dir`` without one)."""
    cfg = Path(run_dir) / "config.yaml"
    if not cfg.is_file():
        return str(run_dir)
    from omegaconf import OmegaConf

    c = OmegaConf.load(cfg)
    recipe, scale = c.get("recipe", ""), c.get("scale", "")
    return f"{recipe}{' (' + scale + ')' if scale else ''}: {run_dir}"


def plot_curves(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Draw the curves of ``rows`` (``metrics.jsonl`` rows) into the PNG ``path``.

    Panels: loss (training and validation) and learning rate against tokens, then routing
    balance and eval-task accuracies when the rows hold them.

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is missing.
    """
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    tasks = sorted({tag for r in rows if r["kind"] == "val" for tag in r["scalars"]
                    if tag.endswith("/accuracy") and not tag.startswith("val/")})
    has_routing = any("moe/load_max_mean" in r["scalars"] for r in rows if r["kind"] == "train")
    panels = ["loss", "lr"] + (["routing"] if has_routing else []) + (["tasks"] if tasks else [])
    ncols = 2
    nrows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(nrows, ncols, figsize=(11, 3.8 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(flat, panels, strict=False):
        ax.grid(alpha=0.3)
        ax.set_xlabel("tokens")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.xaxis.set_major_formatter(FuncFormatter(_tokens_label))
        if panel == "loss":
            x, y, _ = _series(rows, "train", "train/loss")
            if x:
                ax.plot(x, y, color="tab:blue", alpha=0.3, lw=0.8, label="train (each step)")
                w = max(1, len(y) // 20)
                if w > 1:
                    ax.plot(x, _running_mean(y, w), color="tab:blue", lw=1.5, label=f"train (mean of {w} steps)")
            x, y, _ = _series(rows, "val", "val/loss")
            if x:
                ax.plot(x, y, "o-", color="tab:orange", ms=4, label="validation")
                ax.set_title(f"loss: validation {y[0]:.3f} -> {y[-1]:.3f} (ppl {math.exp(min(y[-1], 50)):.1f})")
            else:
                ax.set_title("loss")
            ax.set_ylabel("loss (nats / token)")
            ax.legend(fontsize=8)
        elif panel == "lr":
            x, y, _ = _series(rows, "train", "lr")
            ax.plot(x, y, color="tab:green")
            ax.set_ylabel("learning rate")
            ax.set_title(f"learning rate (peak {max(y):.3g})" if y else "learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        elif panel == "routing":
            x, y, _ = _series(rows, "train", "moe/load_max_mean")
            ax.plot(x, y, color="tab:purple", lw=1.0)
            ax.axhline(1.0, color="gray", ls="--", lw=0.8, label="even load")
            ax.set_ylabel("max / mean tokens per expert")
            ax.set_title(f"routing balance (last {y[-1]:.2f}, mean over routed layers)" if y else "routing balance")
            ax.legend(fontsize=8)
        else:
            for tag in tasks:
                x, y, _ = _series(rows, "val", tag)
                ax.plot(x, y, "o-", ms=4, label=tag.rsplit("/", 1)[0])
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("accuracy")
            ax.set_title("eval tasks (train.eval_tasks)")
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    out = Path(path)
    save_figure(fig, out)
    return out


class RunHistory:
    """Rank 0's record of a run's scalars (``metrics.jsonl``) and its picture (``curves.png``).

    A sink of :class:`~lctrain.train.metrics.MetricsLogger`.

    Args:
        out_dir: the run directory.
        initial_step: steps already trained (a resume); rows of later steps are dropped. 0 starts
            a new file.
        title: the figure's title (e.g. recipe and run directory).
        draw: draw ``curves.png`` at checkpoints and at :meth:`close` (``train.curves``).
    """

    def __init__(self, out_dir: str | os.PathLike, initial_step: int = 0, title: str = "", draw: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        self.title = title
        self.draw_enabled = draw
        self.rows = [r for r in read_history(self.path) if r["step"] <= initial_step] if initial_step > 0 else []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def record(self, kind: str, step: int, tokens: int, scalars: dict[str, float]) -> None:
        """Append one row (``kind`` ``train`` or ``val``) to memory and to ``metrics.jsonl``."""
        if not scalars or self._file is None:
            return
        row = {"kind": kind, "step": step, "tokens": tokens, "scalars": scalars}
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def draw(self) -> Path | None:
        """Redraw ``curves.png`` (None when drawing is off or nothing was recorded).

        A failure to draw is reported on stderr and does not stop the run.
        """
        if not self.draw_enabled or not self.rows:
            return None
        try:
            return plot_curves(self.rows, self.out_dir / CURVES_FILE, self.title)
        except Exception as e:  # a picture must never end a training run
            print(f"[lctrain] could not draw {self.out_dir / CURVES_FILE}: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            return None

    # the MetricsLogger sink interface
    def log_scalars(self, step: int, tokens: int, values: dict[str, float], kind: str = "train") -> None:
        self.record(kind, step, tokens, values)

    def log_histogram(self, tag: str, values: Any, step: int, tokens: int) -> None:
        """Histograms are not drawn."""

    def checkpoint(self, step: int) -> None:
        """A checkpoint was saved at ``step``: redraw the picture."""
        self.draw()

    def close(self) -> None:
        """Redraw the picture and close ``metrics.jsonl`` (idempotent)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        self.draw()


def main(argv: list[str] | None = None) -> int:
    """``python -m lctrain.train.curves RUN_DIR``: redraw ``RUN_DIR/curves.png``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    run = Path(argv[0])
    rows = read_history(run / METRICS_FILE)
    if not rows:
        print(f"error: {run / METRICS_FILE} does not exist or is empty (written by runs of train.curves=true)",
              file=sys.stderr)
        return 2
    print(plot_curves(rows, run / CURVES_FILE, run_title(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
