"""``torchrun launch/eval.py``: two gloo ranks split the batches and examples; the merged results
equal one process's (the reference: ``eval_main`` in this process on the same checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lctrain.config import load_config
from lctrain.eval.cli import eval_main
from lctrain.train.trainer import Trainer
from tests.conftest import REPO, free_port, tiny_overrides

pytestmark = pytest.mark.distributed

ARGS = ["task=perplexity,passkey,niah,mqar", "max_tokens=3000", "batch_size=3", "trials=2", "passkey.lengths=256,384",
        "passkey.depths=0,0.5,1", "niah.lengths=512", "niah.subtasks=single,multikey,vt", "mqar.num_examples=20",
        "mqar.seq_len=64", "mqar.vocab=128"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, small_corpus):
    root = tmp_path_factory.mktemp("evaldp")
    run = root / "run"
    Trainer(load_config(tiny_overrides(run, small_corpus, root / "cache", **{"train.max_steps": 2}))).fit()
    return run


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "meta"}


def _close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-9 * max(1.0, abs(a)), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_two_rank_eval_equals_one_process(text_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert eval_main([f"run={text_run}", f"out={one}", *ARGS]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "launch" / "eval.py"), f"run={text_run}", f"out={two}", *ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("[lctrain eval] perplexity:") == 1  # rank 0 reports
    assert "2 rank(s)" in proc.stdout
    for task in ("perplexity", "passkey", "niah", "mqar"):
        a = json.loads((one / f"{task}.json").read_text())
        b = json.loads((two / f"{task}.json").read_text())
        assert b["meta"]["world_size"] == 2
        _close(_strip(a), _strip(b), task)
        assert (two / f"{task}.png").exists()
    assert json.loads((one / "perplexity.json").read_text())["tokens"] == 3000


def test_training_eval_tasks_split_over_ddp_ranks(tmp_path, small_corpus):
    """``train.eval_tasks`` in a dp=2 DDP run: the two ranks split the examples (an odd number) and
    the logged figures equal a one-process run's on the same data (same initial weights, so step 0
    is exact; after the steps the weights agree to float rounding)."""
    import torch.multiprocessing as mp

    from tests.conftest import fit_worker

    extra = {"train.max_steps": 2, "train.eval_every": 1, "model.vocab_size": 128,
             "data.path": "'synthetic:mqar?vocab=128&num_pairs=4&num_val=16'",
             "train.eval_tasks": "[mqar?num_examples=9,perplexity]"}
    one, two = tmp_path / "one", tmp_path / "two"
    Trainer(load_config(tiny_overrides(one, small_corpus, tmp_path / "cache", **extra))).fit()
    mp.start_processes(fit_worker, args=(2, free_port(), tiny_overrides(two, small_corpus, tmp_path / "cache", **extra),
                                         str(tmp_path / "summary.json")), nprocs=2, start_method="spawn")
    hist = {}
    for name, run in (("one", one), ("two", two)):
        hist[name] = [json.loads(x) for x in (run / "eval" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist["two"]] == [h["step"] for h in hist["one"]] == [0, 1, 2]
    for a, b in zip(hist["one"], hist["two"], strict=True):
        assert set(a) == set(b) and {"mqar/accuracy", "perplexity/loss"} <= set(a)
        for key in a:
            tol = 1e-9 if a["step"] == 0 else 1e-5
            assert abs(a[key] - b[key]) <= tol * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    for run, ranks in ((one, 1), (two, 2)):
        meta = json.loads((run / "eval" / "step_00000002" / "mqar.json").read_text())["meta"]
        assert meta == {"step": 2, "eval_ranks": ranks}
