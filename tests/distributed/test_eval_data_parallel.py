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
