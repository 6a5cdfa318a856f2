"""What a run leaves and prints for its user: W&B logging, ``metrics.jsonl`` / ``curves.png``, a clean console.

* ``train.wandb=true train.wandb_mode=offline``: the W&B run's summary (read back with W&B's own
  reader, ``wandb leet inspect --summary --json``, or ``wandb-summary.json`` where the installed
  wandb writes one offline) holds the final step's loss of ``summary.json``, its config is the
  resolved config, and a resume continues the same run id. Without the wandb package,
  ``train.wandb=true`` is one ``error:`` line naming the extra, exit code 2.
* ``metrics.jsonl`` holds exactly the losses of ``summary.json`` (also across a resume from an
  earlier checkpoint, whose later rows are replaced); ``curves.png`` has the routing / task panels
  only when the run has them.
* A 2-rank run under torchrun: the start-up report, no warning on the console, the progress
  bar's final line printed once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lctrain.config import load_config, to_dict
from lctrain.train.curves import main as curves_main
from lctrain.train.curves import plot_curves, read_history
from lctrain.train.metrics import MetricsLogger
from lctrain.train.trainer import train
from tests.conftest import REPO, tiny_overrides


def _train_losses_and_val(rows: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(r["step"], r["scalars"]["train/loss"]) for r in rows if r["kind"] == "train"]
    val = [(r["step"], r["scalars"]["val/loss"]) for r in rows if r["kind"] == "val" and "val/loss" in r["scalars"]]
    return train, val


# ------------------------------------------------------------------------------------------ W&B
def _wandb_summary(run_dir: Path) -> dict:
    """The summary of one offline W&B run directory, as W&B itself reads it back."""
    f = run_dir / "files" / "wandb-summary.json"
    if f.is_file():  # wandb versions that write the standard files offline too
        return {"summary": json.loads(f.read_text()), "config": None}
    wandb_cli = shutil.which("wandb") or str(Path(sys.executable).parent / "wandb")
    out = subprocess.run([wandb_cli, "leet", "inspect", "--summary", "--json", str(run_dir)], capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_wandb_offline_run_holds_the_final_loss_and_resumes_the_same_run(small_corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    common = {"train.wandb": True, "train.wandb_mode": "offline", "train.wandb_project": "lctrain-test",
              "train.checkpoint_every": 2, "train.eval_every": 2}
    first = train(load_config(tiny_overrides(run, small_corpus, tmp_path / "cache", **common)))
    run_id = (run / "wandb_run_id").read_text().strip()
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in runs] == [run_id]
    got = _wandb_summary(runs[0])
    assert got["summary"]["train/loss"] == first["final_train_loss"] == first["losses"][-1]
    assert got["summary"]["step"] == 4 and got["summary"]["tokens"] == first["tokens"]
    assert got["summary"]["val/loss"] == first["final_val_loss"]
    if got["config"] is not None:  # the resolved config, section by section
        cfg = to_dict(load_config(tiny_overrides(run, small_corpus, tmp_path / "cache", **common)))
        assert got["config"]["model"] == json.loads(json.dumps(cfg["model"]))
        assert got["config"]["train"]["wandb_mode"] == "offline"

    # resume from the step-2 checkpoint (steps 3-4 are trained again) and go on to step 6
    resume = {**common, "train.max_steps": 6, "train.resume": str(run / "checkpoints" / "step_00000002")}
    second = train(load_config(tiny_overrides(run, small_corpus, tmp_path / "cache", **resume)))
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {p.name.rsplit("-", 1)[1] for p in runs} == {run_id}
    assert (run / "wandb_run_id").read_text().strip() == run_id
    got = _wandb_summary(runs[-1])
    assert got["summary"]["train/loss"] == second["final_train_loss"] and got["summary"]["step"] == 6
    if got.get("run_id") is not None:
        assert got["run_id"] == run_id

    # metrics.jsonl: the rows of steps 3-4 from the first run were replaced by the resumed run's
    train_rows, val_rows = _train_losses_and_val(read_history(run / "metrics.jsonl"))
    assert train_rows == list(enumerate(second["losses"], start=1))
    assert val_rows == [(s, v) for s, v in second["val_history"]]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_without_the_package_stops_at_start_up_naming_the_extra(tmp_path):
    code = ("import sys; sys.modules['wandb'] = None\n"  # as if not installed
            "from lctrain.cli import train_main\n"
            f"sys.exit(train_main(['recipe=hybrid_gdn_3to1', 'train.wandb=true', 'train.out_dir={tmp_path / 'run'}']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert 'pip install -e ".[wandb]"' in proc.stderr and "train.wandb=false" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_wandb_mode_is_validated():
    from lctrain.errors import ConfigError

    with pytest.raises(ConfigError, match="train.wandb_mode='cloud'.*online, offline, disabled"):
        load_config(["recipe=hybrid_gdn_3to1", "train.wandb_mode=cloud"])


# ------------------------------------------------------------------------------------------ curves
def _rows(n: int, routing: bool, tasks: bool) -> list[dict]:
    rows = [{"kind": "val", "step": 0, "tokens": 0, "scalars": {"val/loss": 8.0, "val/ppl": 2981.0}}]
    for s in range(1, n + 1):
        sc = {"train/loss": 8.0 - 3.0 * s / n, "lr": 1e-3 * min(1.0, s / 5), "grad_norm": 1.0}
        if routing:
            sc["moe/load_max_mean"] = 1.0 + 1.0 / s
        rows.append({"kind": "train", "step": s, "tokens": 64 * s, "scalars": sc})
        if s % 10 == 0:
            sc = {"val/loss": 8.0 - 3.0 * s / n}
            if tasks:
                sc.update({"mqar/accuracy": s / n, "passkey/accuracy": 0.5})
            rows.append({"kind": "val", "step": s, "tokens": 64 * s, "scalars": sc})
    return rows


def test_curves_png_has_the_panels_the_run_has(tmp_path):
    from matplotlib.image import imread

    heights = {}
    for routing, tasks in [(False, False), (True, False), (True, True)]:
        path = plot_curves(_rows(40, routing, tasks), tmp_path / f"c_{routing}_{tasks}.png", "test run")
        heights[routing, tasks] = imread(path).shape[0]
    # two panels (loss, lr) on one row; routing and tasks add a second row of the 2-column grid
    assert heights[True, False] == heights[True, True] > 1.8 * heights[False, False]


def test_metrics_jsonl_of_a_run_equals_its_summary_and_keeps_routing(small_corpus, tmp_path):
    run = tmp_path / "run"
    over = {"train.checkpoint_every": 0, "train.eval_every": 2, "model.moe.num_experts": 4,
            "model.moe.ffn_hidden_size": 32, "model.moe.top_k": 2, "train.eval_tasks": "[mqar?num_examples=8]"}
    summary = train(load_config(tiny_overrides(run, small_corpus, tmp_path / "cache", **over)))
    rows = read_history(run / "metrics.jsonl")
    train_rows, val_rows = _train_losses_and_val(rows)
    assert train_rows == list(enumerate(summary["losses"], start=1))
    assert val_rows == [(s, v) for s, v in summary["val_history"]]
    moe = [r["scalars"]["moe/load_max_mean"] for r in rows if r["kind"] == "train"]
    assert moe == summary["moe"]["load_max_mean"]
    assert [r["step"] for r in rows if "mqar/accuracy" in r["scalars"]] == [0, 2, 4]
    assert all(r["tokens"] == r["step"] * 8 * 64 for r in rows)
    assert (run / "curves.png").stat().st_size > 10_000
    (run / "curves.png").unlink()
    assert curves_main([str(run)]) == 0 and (run / "curves.png").stat().st_size > 10_000  # redrawn from the file


# ------------------------------------------------------------------------------------------ console
def test_progress_bar_final_line_is_printed_once(tmp_path, capsys):
    with MetricsLogger(tmp_path, rank=0, enabled_tensorboard=False, progress=True, total_steps=3,
                       tokens_per_step=8) as log:
        log.log_eval(0, {"loss": 2.0})
        for s in (1, 2, 3):
            log.log_step(s, {"loss": 1.0 / s})
        log.log_eval(3, {"loss": 1.5})
    out = capsys.readouterr()
    lines = [x for x in re.split(r"[\r\n]", out.err) if x.strip()]
    assert sum("3/3" in x for x in lines) == 1, out.err
    assert out.out.splitlines() == ["step 0: val/loss 2.0000 val/ppl 7.389", "step 3: val/loss 1.5000 val/ppl 4.482"]


def test_two_rank_run_console_is_clean(small_corpus, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(run, small_corpus, tmp_path / "cache", **{"train.progress": True, "train.tensorboard": True})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "launch" / "train.py"), *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "Warning" not in console and "warn" not in console.lower(), console
    out = proc.stdout
    for fragment in ("[lctrain] recipe hybrid_gdn_3to1", "M parameters", "[lctrain] layout: 2 processes on cpu (gloo), "
                     "dp=2 (ddp), cp=1, ep=1", f"[lctrain] writes: {run}/", "metrics.jsonl and curves.png"):
        assert fragment in out, out
    assert len(re.findall(r"\[lctrain\] (kernel plan|kernels)", out)) == 1, out  # the kernel plan, once
    bar_lines = [x for x in re.split(r"[\r\n]", proc.stderr) if "4/4" in x]
    assert len(bar_lines) == 1, proc.stderr
    assert out.count("val/loss") == 3  # steps 0, 2, 4: printed once each
    assert (run / "curves.png").is_file() and (run / "metrics.jsonl").is_file()
