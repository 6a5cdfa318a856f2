"""Whole-model training with context parallelism equals the single-process run.

``Trainer.fit`` in spawned gloo ranks with ``parallel.cp_degree=2`` (2 ranks; and dp=2 x cp=2 on
4 ranks, slow) must give the per-step losses of one process on the same global batches within
1e-4, and a cp=2 run resumed from its own step-2 checkpoint must continue with the same losses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lctrain.config import load_config
from lctrain.train.trainer import train
from tests.conftest import free_port, tiny_overrides

pytestmark = pytest.mark.distributed

STEPS = 5
TOL = 1e-4


def _args(out: Path, corpus: Path, cache: Path, **extra) -> list[str]:
    extra = {"train.max_steps": STEPS, "train.eval_every": 0, "train.keep_last": 5, "train.global_batch_size": 4, **extra}
    return tiny_overrides(out, corpus, cache, **extra)


def _fit_worker(rank: int, world: int, port: int, runs: list[list[str]], out_file: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from lctrain.train.trainer import Trainer

    summaries = [Trainer(load_config(args)).fit() for args in runs]  # later runs may resume earlier ones
    if rank == 0:
        Path(out_file).write_text(json.dumps(summaries))
    torch.distributed.destroy_process_group()


def _spawn(world: int, runs: list[list[str]], tmp_path: Path) -> list[dict]:
    out_file = tmp_path / f"summaries_{world}.json"
    mp.start_processes(_fit_worker, args=(world, free_port(), runs, str(out_file)), nprocs=world, start_method="spawn")
    return json.loads(out_file.read_text())


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("cp_ref")
    cache = root / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each spawned rank; several threads on a busy 2-core machine crawl
    try:
        return cache, train(load_config(_args(root / "run", small_corpus, cache)))
    finally:
        torch.set_num_threads(threads)


def _assert_losses(got: dict, ref: dict) -> None:
    assert len(got["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=TOL)
    # evaluation reads the same eval_batches * micro_batch_size windows at any dp x cp layout
    assert abs(got["final_val_loss"] - ref["final_val_loss"]) < TOL


def test_cp2_losses_equal_one_rank_and_resume(small_corpus, tmp_path, reference):
    """cp=2 (ring) on 2 ranks == 1 rank; resuming the cp=2 run from its step-2 checkpoint == both."""
    cache, ref = reference
    run = _args(tmp_path / "cp2", small_corpus, cache, **{"parallel.cp_degree": 2})
    ckpt = tmp_path / "cp2" / "checkpoints" / "step_00000002"
    resumed = _args(tmp_path / "cp2_resumed", small_corpus, cache, **{"parallel.cp_degree": 2, "train.resume": str(ckpt)})
    full, again = _spawn(2, [run, resumed], tmp_path)
    assert full["world_size"] == 2 and full["cp_degree"] == 2 and full["dp_degree"] == 1
    _assert_losses(full, ref)
    assert len(again["losses"]) == STEPS  # steps 1-2 restored from the checkpoint, 3-5 recomputed
    _assert_losses(again, ref)


def test_dp2_cp2_losses_equal_one_rank(small_corpus, tmp_path, reference):
    """dp=2 x cp=2 on 4 ranks, ring and Ulysses attention, == 1 rank."""
    cache, ref = reference
    runs = [
        _args(tmp_path / f"dp2cp2_{impl}", small_corpus, cache, **{"parallel.cp_degree": 2, "parallel.cp_impl": impl})
        for impl in ("ring", "ulysses")
    ]
    for got in _spawn(4, runs, tmp_path):
        assert got["world_size"] == 4 and got["cp_degree"] == 2 and got["dp_degree"] == 2
        _assert_losses(got, ref)


MOBA = {"model.moba.num_heads": 2, "model.moba.num_kv_heads": 1, "model.moba.head_dim": 32,
        "model.moba.block_size": 16, "model.moba.top_k": 2}


def test_moba_hybrid_ulysses_cp2_equals_one_rank(small_corpus, tmp_path):
    """hybrid_gdn_moba (G M G A) under cp=2 Ulysses == the same recipe in one process, 5 steps."""
    cache = tmp_path / "cache"
    one = _args(tmp_path / "one", small_corpus, cache, **MOBA)
    one[0] = "recipe=hybrid_gdn_moba"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train(load_config(one))
    finally:
        torch.set_num_threads(threads)
    run = _args(tmp_path / "cp2", small_corpus, cache, **MOBA, **{"parallel.cp_degree": 2, "parallel.cp_impl": "ulysses"})
    run[0] = "recipe=hybrid_gdn_moba"
    (got,) = _spawn(2, [run], tmp_path)
    assert got["cp_degree"] == 2
    _assert_losses(got, ref)
    assert len(got["attended_fraction"]) == STEPS and 0 < got["attended_fraction"][0] < 1
    assert got["attended_fraction"] == pytest.approx(ref["attended_fraction"])


ROUTED = {
    "hybrid_gdn_3to1_moh": {"model.moh.num_heads": 4, "model.moh.num_kv_heads": 2, "model.moh.head_dim": 16,
                            "model.moh.num_shared_heads": 1, "model.moh.top_k": 2},
    "hybrid_gdn_3to1_moa": {"model.moa.num_experts": 4, "model.moa.top_k": 2, "model.moa.head_dim": 16},
    "hybrid_gdn_3to1_lora_mixer": {"model.lora_mixer.num_experts": 3, "model.lora_mixer.r": 4},
}


@pytest.mark.parametrize("recipe", sorted(ROUTED))
def test_routed_attention_recipes_cp2_equal_one_rank(recipe, small_corpus, tmp_path):
    """MoH / MoA / LoRA-Mixer recipes: 5 steps under cp=2 (ring) == one process (losses, val loss, aux)."""
    cache = tmp_path / "cache"
    one = _args(tmp_path / "one", small_corpus, cache, **ROUTED[recipe])
    one[0] = f"recipe={recipe}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train(load_config(one))
    finally:
        torch.set_num_threads(threads)
    run = _args(tmp_path / "cp2", small_corpus, cache, **ROUTED[recipe], **{"parallel.cp_degree": 2})
    run[0] = f"recipe={recipe}"
    (got,) = _spawn(2, [run], tmp_path)
    assert got["cp_degree"] == 2
    _assert_losses(got, ref)
    assert ref["moe"]["aux_loss"][0] > 0  # the routed layers' balance losses are on
    torch.testing.assert_close(torch.tensor(got["moe"]["aux_loss"]), torch.tensor(ref["moe"]["aux_loss"]),
                               rtol=1e-4, atol=1e-6)
    if recipe.endswith("_moh"):
        assert got["active_head_fraction"] == pytest.approx(0.75)
