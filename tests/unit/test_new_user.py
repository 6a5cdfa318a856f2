"""What a new user meets first: clean start-up errors (exit 2, the key named, no traceback), a
non-editable install that finds its recipes, the console entry point, re-running a finished run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lctrain.cluster.ray import make_spec
from lctrain.config import ConfigError, load_config
from lctrain.data.sampler import DistributedBatchSampler
from lctrain.train.trainer import train
from tests.conftest import REPO, tiny_overrides


def _launch(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


@pytest.mark.parametrize("extra, fragments", [
    (["data.path=/no/such/corpus.jsonl"], ["data.path '/no/such/corpus.jsonl' does not exist", "pd_english"]),
    (["train.resume=AUTO"], ["train.resume='AUTO'", "auto", "none"]),
    (["train.resume=runs/typo/checkpoints/step_00000007"], ["train.resume=", "existing checkpoint directory"]),
    (["train.eval_batches=0"], ["train.eval_batches=0", "data.val_fraction=0"]),
    (["optim.fused=maybe"], ["optim.fused='maybe'", "auto, true, false"]),
])
def test_bad_input_is_one_clean_line_and_exit_2(extra, fragments, tmp_path):
    proc = _launch(["recipe=hybrid_gdn_3to1", f"train.out_dir={tmp_path / 'run'}", *extra])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: "), proc.stderr
    for frag in fragments:
        assert frag in proc.stderr, (frag, proc.stderr)


def test_vocab_too_small_for_the_tokenizer_is_a_clean_error(small_corpus, tmp_path):
    args = tiny_overrides(tmp_path / "run", small_corpus, tmp_path / "cache", **{"model.vocab_size": 300})[1:]
    proc = _launch(["recipe=hybrid_gdn_3to1", *args])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "model.vocab_size" in proc.stderr


def test_optim_fused_accepts_booleans():
    for value, want in (("true", "true"), ("False", "false"), ("auto", "auto")):
        assert load_config(["recipe=hybrid_gdn_3to1", f"optim.fused={value}"]).optim.fused == want


def test_sampler_seed_mismatch_names_train_seed():
    saved = DistributedBatchSampler(64, 8, 4, 0, 1, seed=3).state_dict()
    with pytest.raises(ConfigError, match="train.seed=3"):
        DistributedBatchSampler(64, 8, 4, 0, 1, seed=4).load_state_dict(saved)


def test_ray_job_takes_overrides_after_options(tmp_path):
    spec = make_spec(["recipe=hybrid_gdn_3to1", "--num-workers", "2", "train.max_steps=3",
                      f"train.out_dir={tmp_path}", "--gpus-per-worker", "0"])
    assert "train.max_steps=3" in spec.overrides and spec.num_workers == 2


def test_rerunning_a_finished_run_leaves_it_alone(small_corpus, tmp_path, capsys):
    args = tiny_overrides(tmp_path / "run", small_corpus, tmp_path / "cache",
                          **{"train.max_steps": 2, "train.checkpoint_every": 0, "train.eval_every": 0})
    first = train(load_config(args))
    summary = tmp_path / "run" / "summary.json"
    before = (summary.read_bytes(), summary.stat().st_mtime_ns, (tmp_path / "run" / "config.yaml").stat().st_mtime_ns)
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    again = train(load_config(args))
    assert "already complete" in capsys.readouterr().out
    assert again == json.loads(before[0]) and again["losses"] == first["losses"]
    assert (summary.read_bytes(), summary.stat().st_mtime_ns,
            (tmp_path / "run" / "config.yaml").stat().st_mtime_ns) == before
    assert sorted((tmp_path / "run" / "checkpoints").iterdir()) == ckpts


def test_non_editable_install_finds_recipes_and_runs_the_entry_point(tmp_path):
    """What a wheel, a Docker image or a Ray runtime env gets: no checkout beside the package."""
    target = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(REPO)], capture_output=True, text=True, timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (target / "lctrain" / "recipes" / "hybrid_gdn_3to1.yaml").is_file()
    assert (target / "bin" / "lctrain-train").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import lctrain, lctrain.config as c; assert lctrain.__file__.startswith(%r), lctrain.__file__; "
            "cfg = c.load_config(['recipe=hybrid_gdn_moba', 'scale=340m']); print(cfg.recipe, cfg.model.n_layers)"
            % str(target))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["hybrid_gdn_moba", "24"], proc.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "lctrain.cli", "recipe=nope"], capture_output=True, text=True,
                         cwd=elsewhere, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown recipe 'nope'" in bad.stderr and "hybrid_gdn_3to1" in bad.stderr


def test_ray_worker_records_input_errors_instead_of_raising(tmp_path, monkeypatch):
    """A user-input error found on a Ray worker is reported (status 'config', exit 2), not raised for a retry."""
    import ray.train  # in the test extra: a missing Ray fails this test rather than skipping it

    from lctrain.cluster import ray as lray

    monkeypatch.setattr(ray.train, "get_context", lambda: type("Ctx", (), {"get_world_rank": lambda self: 0})())
    lray.train_worker({"overrides": ["recipe=hybrid_gdn_3to1", "data.path=/no/such/dir"], "out_dir": str(tmp_path)})
    status = json.loads((tmp_path / lray.STATUS_FILE).read_text())
    assert status["status"] == "config" and "data.path '/no/such/dir' does not exist" in status["message"]
