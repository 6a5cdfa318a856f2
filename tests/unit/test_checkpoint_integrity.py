"""Corrupt checkpoints, changed data and failing saves, on a real tiny run (one process).

Reference: the uninterrupted run's own checkpoints: resuming from the step-2 checkpoint after the
step-4 one was damaged must give that run's state at step 2 (and its losses from there on).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

import lctrain.checkpoint.store as ckpt
from lctrain.checkpoint import (
    CheckpointCorruptError,
    CheckpointSaveError,
    find_latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from lctrain.config import load_config
from lctrain.data import train_tokenizer
from lctrain.errors import ConfigError
from lctrain.train.safety import LOCK_FILE, LockHeldError, RunLock
from lctrain.train.trainer import Trainer, train
from tests.conftest import tiny_overrides


def _args(out: Path, corpus: Path, cache: Path, **extra) -> list[str]:
    return tiny_overrides(out, corpus, cache, **{"train.keep_last": 3, "train.eval_every": 0, **extra})


@pytest.fixture(scope="module")
def finished(small_corpus, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, and its summary."""
    root = tmp_path_factory.mktemp("integrity")
    cache = root / "cache"
    summary = train(load_config(_args(root / "run", small_corpus, cache)))
    return root, cache, summary


def _copy(finished, tmp_path) -> Path:
    root, _, _ = finished
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    return run


def _resume(run: Path, corpus: Path, cache: Path, **extra) -> Trainer:
    return Trainer(load_config(_args(run, corpus, cache, **extra)))


def _newest(run: Path) -> Path:
    return run / "checkpoints" / "step_00000004"


def _truncate_shard(path: Path) -> str:
    shard = sorted(path.glob("__0_*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return shard.name


def _remove_rng(path: Path) -> str:
    (path / "rng_rank0.pt").unlink()
    return "rng_rank0.pt"


def _flip_byte(path: Path) -> str:
    shard = sorted(path.glob("__0_*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(bytes(data))  # same size: only the checksum can tell
    return shard.name


@pytest.mark.parametrize("damage", [_truncate_shard, _remove_rng, _flip_byte], ids=["truncated", "no_rng", "flipped"])
def test_auto_resume_falls_back_to_previous_good_checkpoint(finished, small_corpus, tmp_path, damage):
    _, cache, summary = finished
    run = _copy(finished, tmp_path)
    bad_file = damage(_newest(run))
    with pytest.warns(UserWarning, match=bad_file):
        trainer = _resume(run, small_corpus, cache)
    assert trainer.state.step == 2 and trainer.state.losses == summary["losses"][:2]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert (run / "checkpoints" / "step_00000004.corrupt").is_dir()  # set aside, not deleted
    resumed = trainer.fit()
    assert max(abs(a - b) for a, b in zip(resumed["losses"], summary["losses"])) <= 1e-6
    assert len(resumed["losses"]) == 4


def test_explicit_resume_of_corrupt_checkpoint_is_an_error(finished, small_corpus, tmp_path):
    _, cache, _ = finished
    run = _copy(finished, tmp_path)
    name = _flip_byte(_newest(run))
    with pytest.raises(CheckpointCorruptError, match=f"{name} fails its checksum"):
        _resume(run, small_corpus, cache, **{"train.resume": str(_newest(run))})
    # sizes-only verification does not read the data and accepts it
    verify_checkpoint(_newest(run), checksum=False)


def test_no_good_checkpoint_left_is_an_error_not_a_fresh_start(finished, small_corpus, tmp_path):
    _, cache, _ = finished
    run = _copy(finished, tmp_path)
    for _, path in list_checkpoints(run / "checkpoints"):
        _truncate_shard(path)
    with pytest.warns(UserWarning), pytest.raises(CheckpointCorruptError, match="no checkpoint under .* passes"):
        _resume(run, small_corpus, cache)
    with pytest.raises(CheckpointCorruptError, match="set aside earlier"):  # a second attempt does not start over
        _resume(run, small_corpus, cache)


def test_changed_corpus_is_refused_unless_allowed(finished, small_corpus, tmp_path):
    _, cache, _ = finished
    run = _copy(finished, tmp_path)
    rows = [json.loads(line) for line in small_corpus.read_text().splitlines()]
    rows[0]["text"] = rows[0]["text"][::-1]  # same length, other content
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tmp_path / "tok"
    # the run's tokenizer file (cache keyed by the corpus), so only the corpus differs
    tokenizer_file = next(cache.glob("tokenizer_*.model"))
    with pytest.raises(ConfigError, match=r"trained on other data: the corpus"):
        _resume(run, other, cache, **{"data.tokenizer": str(tokenizer_file)})
    with pytest.warns(UserWarning, match="allow_data_change"):
        trainer = _resume(run, other, cache, **{"data.tokenizer": str(tokenizer_file), "train.allow_data_change": True})
    assert trainer.state.step == 4
    # another tokenizer of the same size
    train_tokenizer([r["text"] for r in rows[::-1]] * 2, 512, tok)
    with pytest.raises(ConfigError, match=r"trained on other data: the tokenizer"):
        _resume(run, small_corpus, cache, **{"data.tokenizer": str(tok) + ".model"})
    with pytest.raises(ConfigError, match=r"data.seed \(1234 -> 7\)"):
        _resume(run, small_corpus, cache, **{"data.seed": 7})


def test_enospc_during_save_keeps_previous_checkpoint(finished, small_corpus, tmp_path, monkeypatch):
    _, cache, summary = finished
    run = tmp_path / "run"
    real = ckpt._write_rng_state

    def full_disk(directory, rank):
        if directory.name.startswith("step_00000004"):
            (directory / f"rng_rank{rank}.pt").write_bytes(b"\0" * 10)  # a partial file, then the error
            raise OSError(errno.ENOSPC, "No space left on device")
        real(directory, rank)

    monkeypatch.setattr(ckpt, "_write_rng_state", full_disk)
    with pytest.raises(CheckpointSaveError, match="No space left on device") as info:
        train(load_config(_args(run, small_corpus, cache)))
    assert "step_00000002 is intact" in str(info.value)
    root = run / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_00000002"]  # no .tmp left, nothing good removed
    assert not (run / LOCK_FILE).exists()
    monkeypatch.undo()
    verify_checkpoint(find_latest_checkpoint(root))
    resumed = train(load_config(_args(run, small_corpus, cache)))
    assert max(abs(a - b) for a, b in zip(resumed["losses"], summary["losses"])) <= 1e-6


def test_permission_denied_during_dcp_write_is_reported(finished, small_corpus, tmp_path, monkeypatch):
    _, cache, _ = finished
    run = tmp_path / "run"
    import torch.distributed.checkpoint as dcp

    real = dcp.save

    def denied(state, checkpoint_id, **kw):
        if checkpoint_id.endswith("step_00000004.tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", checkpoint_id)
        return real(state, checkpoint_id=checkpoint_id, **kw)

    monkeypatch.setattr(ckpt.dcp, "save", denied)
    with pytest.raises(CheckpointSaveError, match="Permission denied"):
        train(load_config(_args(run, small_corpus, cache)))
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]


def test_lock_refuses_live_holder_and_takes_over_dead_one(tmp_path):
    import subprocess
    import sys

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / LOCK_FILE
        fake = {"host": __import__("socket").gethostname(), "pid": sleeper.pid,
                "proc_start": ckpt_start(sleeper.pid), "boot_id": None, "started": 0, "token": "x", "argv": ["other"]}
        lock.write_text(json.dumps(fake))
        with pytest.raises(LockHeldError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path)
        lock.write_text(json.dumps({**fake, "proc_start": (fake["proc_start"] or 0) + 1}))  # pid reused
        with pytest.warns(UserWarning, match="took over"):
            RunLock(tmp_path).release()
        lock.write_text(json.dumps({**fake, "host": "some-other-node"}))
        with pytest.raises(LockHeldError, match="some-other-node.*delete"):
            RunLock(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(json.dumps(fake))
    with pytest.warns(UserWarning, match="took over"):  # its pid is dead now
        held = RunLock(tmp_path)
    again = RunLock(tmp_path)  # re-entrant in one process
    again.release()
    assert lock.exists()
    held.release()
    assert not lock.exists()


def ckpt_start(pid: int):
    from lctrain.train.safety import _proc_start_ticks

    return _proc_start_ticks(pid)


def test_marker_records_sizes_and_checksums(finished):
    root, _, _ = finished
    path = find_latest_checkpoint(root / "run" / "checkpoints")
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["format"] == 2 and marker["checksum"] == "crc32"
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "COMPLETE")
    assert sorted(marker["files"]) == on_disk
    import zlib

    for name, (size, crc) in marker["files"].items():
        data = (path / name).read_bytes()
        assert size == len(data) and crc == zlib.crc32(data)
    assert torch.load(path / "rng_rank0.pt", weights_only=True)["torch_cpu"].dtype == torch.uint8
