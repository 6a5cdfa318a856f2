"""End-to-end training runs on a small real-text corpus.

References: an uninterrupted single-process run (for resume, 2->1 reshard and data parallelism)
and a single-process gradient on the same global batch (for DP gradients).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lctrain.config import load_config
from lctrain.checkpoint import find_latest_checkpoint
from lctrain.train.trainer import NonFiniteLossError, Trainer, train
from tests.conftest import REPO, fit_worker, free_port, tiny_overrides

pytestmark = pytest.mark.distributed


def _cfg(out: Path, corpus: Path, cache: Path, **extra):
    return load_config(tiny_overrides(out, corpus, cache, **extra))


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(REPO / "launch" / "train.py"), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference_run(small_corpus, tmp_path_factory):
    """Uninterrupted single-process run: 4 steps, checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("ref")
    cache = root / "cache"
    summary = train(_cfg(root / "run", small_corpus, cache))
    return root, cache, summary


def test_single_process_run_writes_summary(reference_run):
    root, _, summary = reference_run
    on_disk = _summary(root / "run")
    for key in ("steps", "tokens", "final_train_loss", "final_val_loss", "tokens_per_s", "losses", "world_size", "recipe"):
        assert key in on_disk
    assert on_disk["steps"] == 4 and len(on_disk["losses"]) == 4 and on_disk["world_size"] == 1
    assert on_disk["tokens"] == 4 * 8 * 64
    assert on_disk["recipe"] == "hybrid_gdn_3to1"
    assert all(torch.isfinite(torch.tensor(on_disk["losses"])))
    # loss starts near ln(vocab) for a fresh model and goes down within 4 steps at this lr
    assert abs(on_disk["losses"][0] - torch.log(torch.tensor(512.0)).item()) < 0.5
    assert on_disk["losses"][-1] < on_disk["losses"][0]
    assert (root / "run" / "config.yaml").exists()
    assert find_latest_checkpoint(root / "run" / "checkpoints").name == "step_00000004"


def test_resume_equals_uninterrupted(reference_run, small_corpus, tmp_path, monkeypatch):
    """Crash at step 3 (after the step-2 checkpoint), resume with train.resume=auto: same losses."""
    _, cache, ref = reference_run
    out = tmp_path / "run"
    real_step = Trainer.train_step

    def crashing_step(self):
        if self.state.step == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(out, small_corpus, cache))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = train(_cfg(out, small_corpus, cache, **{"train.resume": "auto"}))
    assert resumed["steps"] == 4 and len(resumed["losses"]) == 4
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=1e-5)
    assert abs(resumed["final_val_loss"] - ref["final_val_loss"]) < 1e-5


def test_nan_loss_stops_with_step_and_keeps_checkpoint(small_corpus, tmp_path, monkeypatch, reference_run):
    _, cache, _ = reference_run
    real = Trainer.forward_loss_sum

    def poisoned(self, batch):
        loss = real(self, batch)
        return loss * float("nan") if self.state.step == 2 else loss

    monkeypatch.setattr(Trainer, "forward_loss_sum", poisoned)
    out = tmp_path / "stop"
    with pytest.raises(NonFiniteLossError, match="at step 3") as info:
        train(_cfg(out, small_corpus, cache))
    assert "step_00000002" in str(info.value)
    assert find_latest_checkpoint(out / "checkpoints").name == "step_00000002"

    skip = train(_cfg(tmp_path / "skip", small_corpus, cache, **{"train.nan_policy": "skip"}))
    assert skip["skipped_steps"] == [3] and skip["steps"] == 4
    assert all(torch.isfinite(torch.tensor(skip["losses"][i])) for i in (0, 1, 3))


def _dp_grads_worker(rank: int, world: int, port: int, args: list[str], out_file: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    tr = Trainer(load_config(args))
    loss = tr.forward_backward(tr.next_micro_batches())
    grads = {n: p.grad.detach().clone() for n, p in tr.model.module.named_parameters()}
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, out_file)
    torch.distributed.destroy_process_group()


def test_two_rank_gradients_equal_one_rank(small_corpus, tmp_path, reference_run):
    """DDP over 2 gloo ranks, each with half the global batch == 1 process with the whole batch."""
    _, cache, _ = reference_run
    args = tiny_overrides(tmp_path / "dp2", small_corpus, cache)
    out_file = str(tmp_path / "grads.pt")
    mp.start_processes(_dp_grads_worker, args=(2, free_port(), args, out_file), nprocs=2, start_method="spawn")
    dp2 = torch.load(out_file)
    tr = Trainer(load_config(tiny_overrides(tmp_path / "dp1", small_corpus, cache)))
    loss = tr.forward_backward(tr.next_micro_batches())
    assert abs(loss - dp2["loss"]) < 1e-5
    for name, p in tr.model.named_parameters():
        ref, got = p.grad, dp2["grads"][name]
        err = (got - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 1e-5, (name, float(err))


def test_torchrun_two_ranks_match_one_and_reshard(small_corpus, tmp_path, reference_run):
    """torchrun with 2 ranks gives the 1-rank losses; its step-2 checkpoint resumes on 1 rank."""
    _, cache, ref = reference_run
    out2 = tmp_path / "dp2"
    _torchrun(2, tiny_overrides(out2, small_corpus, cache))
    s2 = _summary(out2)
    assert s2["world_size"] == 2
    torch.testing.assert_close(torch.tensor(s2["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=1e-5)
    ckpt = out2 / "checkpoints" / "step_00000002"
    one = train(_cfg(tmp_path / "resharded", small_corpus, cache, **{"train.resume": str(ckpt)}))
    torch.testing.assert_close(torch.tensor(one["losses"]), torch.tensor(s2["losses"]), rtol=0, atol=1e-5)


def test_two_ranks_match_one_and_checkpoint_reshards_to_one(small_corpus, tmp_path, reference_run):
    """2 DDP ranks reproduce the 1-rank losses; their step-2 DCP checkpoint resumes in 1 process."""
    _, cache, ref = reference_run
    out_file = tmp_path / "summary2.json"
    args = tiny_overrides(tmp_path / "dp2", small_corpus, cache)
    mp.start_processes(fit_worker, args=(2, free_port(), args, str(out_file)), nprocs=2, start_method="spawn")
    s2 = json.loads(out_file.read_text())
    assert s2["world_size"] == 2 and s2["dp_degree"] == 2
    torch.testing.assert_close(torch.tensor(s2["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=1e-5)
    # validation reads the same windows at any data-parallel size
    torch.testing.assert_close(torch.tensor(s2["val_history"]), torch.tensor(ref["val_history"]), rtol=0, atol=1e-5)
    ckpt = tmp_path / "dp2" / "checkpoints" / "step_00000002"
    one = train(_cfg(tmp_path / "one", small_corpus, cache, **{"train.resume": str(ckpt)}))
    assert len(one["losses"]) == 4 and one["world_size"] == 1
    torch.testing.assert_close(torch.tensor(one["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=1e-5)
