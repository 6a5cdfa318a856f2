"""Numerics unchanged by the structure: fixed runs give the losses recorded before the seams refactor.

``tests/fixtures/seams_baseline.json`` holds the per-step training losses of three 6-step runs
(tiny ``tiny_overrides`` model on the ``small_corpus`` fixture, seed 0, no evaluation) recorded
on main at af4a4a7, before the mixer registry, per-mixer config sections and ``parallelize()``
existed. The same runs must give the same losses within 1e-5 (absolute, per step).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.conftest import fit_worker, free_port, tiny_overrides

pytestmark = pytest.mark.distributed

FIXTURE = json.loads((Path(__file__).resolve().parent.parent / "fixtures" / "seams_baseline.json").read_text())


@pytest.mark.parametrize("name", sorted(FIXTURE["runs"]))
def test_losses_equal_the_pre_refactor_run(name, small_corpus, tmp_path):
    run = FIXTURE["runs"][name]
    extra = {"train.max_steps": 6, "train.checkpoint_every": 0, "train.eval_every": 0, **run["overrides"]}
    args = tiny_overrides(tmp_path / "run", small_corpus, tmp_path / "cache", **extra)
    args[0] = f"recipe={run['recipe']}"
    out = tmp_path / "summary.json"
    mp.spawn(fit_worker, args=(run["world"], free_port(), args, str(out)), nprocs=run["world"], join=True)
    losses = json.loads(out.read_text())["losses"]
    assert len(losses) == len(run["losses"]) == 6
    diffs = [abs(a - b) for a, b in zip(losses, run["losses"])]
    print(f"{name}: max per-step loss difference to the pre-refactor run {max(diffs):.2e}")
    assert max(diffs) < 1e-5, (name, diffs, losses)
