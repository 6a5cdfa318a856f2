"""The one checkpoint reader (lctrain.checkpoint): evaluation, generation and export verify the
checkpoint as resume does and refuse a corrupt one, naming the file; pruning reports what it
cannot remove."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from lctrain.checkpoint import (
    CheckpointCorruptError,
    checkpoint_model_config,
    find_latest_checkpoint,
    load_model_weights,
    open_checkpoint,
    read_run_config,
    save_checkpoint,
    store,
)
from lctrain.errors import ConfigError
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_corpus) -> Path:
    """A 2-step synthetic MQAR run (no tokenizer to train; ``qk_norm`` so that it exports), trained here."""
    from lctrain.config import load_config
    from lctrain.train.trainer import Trainer

    root = tmp_path_factory.mktemp("reader")
    out = root / "mqar"
    Trainer(load_config(tiny_overrides(out, small_corpus, root / "cache", **{
        "train.max_steps": 2, "train.eval_every": 0, "model.vocab_size": 128, "model.attn.qk_norm": True,
        "data.path": "'synthetic:mqar?vocab=128&num_pairs=4&num_val=16'"}))).fit()
    return out


def _corrupt_copy(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``run`` whose newest checkpoint has one byte flipped in its largest DCP shard."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = find_latest_checkpoint(copy / "checkpoints")
    shard = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return copy, shard


def test_reader_reads_config_and_weights_of_a_trained_run(run):
    from lctrain.eval.run import load_run

    ckpt = open_checkpoint(run, "run")  # a run directory resolves to its newest checkpoint
    assert ckpt == find_latest_checkpoint(run / "checkpoints") and ckpt.name == "step_00000002"
    cfg = read_run_config(run)
    assert checkpoint_model_config(ckpt, "run") == cfg.model
    weights = load_model_weights(ckpt, cfg.model)
    loaded = load_run(run, device="cpu")
    assert loaded.step == 2 and loaded.checkpoint == ckpt
    own = loaded.model.state_dict()
    assert set(own) == set(weights) and all(torch.equal(own[k], weights[k]) for k in own)


def test_eval_generate_export_refuse_a_checkpoint_that_fails_its_checksum(run, tmp_path, capsys):
    from lctrain.eval.cli import eval_main, generate_main
    from lctrain.export.cli import export_main

    # the intact run passes all three
    assert eval_main([f"run={run}", "task=perplexity", f"out={tmp_path / 'ev'}"]) == 0
    assert generate_main([f"run={run}", "prompt=5 70 9", "max_new_tokens=2", "temperature=0"]) == 0
    assert export_main([f"run={run}", f"out={tmp_path / 'hf'}"]) == 0, capsys.readouterr().err
    capsys.readouterr()

    bad, shard = _corrupt_copy(run, tmp_path)
    with pytest.raises(CheckpointCorruptError, match="fails its checksum") as e:
        open_checkpoint(bad, "checkpoint")
    assert str(shard) in str(e.value) and isinstance(e.value, ConfigError)
    for main, args in [(eval_main, ["task=perplexity", f"out={tmp_path / 'ev2'}"]),
                       (generate_main, ["prompt=5 70 9", "max_new_tokens=2"]),
                       (export_main, [f"out={tmp_path / 'hf2'}"])]:
        assert main([f"run={bad}", *args]) == 2, main.__name__
        err = capsys.readouterr().err
        assert err.startswith("error: checkpoint: ") and f"{shard} fails its checksum" in err, (main.__name__, err)
    assert not (tmp_path / "ev2").exists() and not (tmp_path / "hf2").exists()
    # an explicit checkpoint= path is verified too
    assert eval_main([f"run={run}", f"checkpoint={shard.parent}", "task=perplexity"]) == 2
    assert str(shard) in capsys.readouterr().err


def test_prune_reports_a_checkpoint_it_cannot_remove(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    first = save_checkpoint(tmp_path, 1, model, None, {"step": 1}, keep_last=1)
    real_rmdir = os.rmdir

    def refuse(path, *args, **kwargs):
        if Path(path) == first:
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(store.os, "rmdir", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = save_checkpoint(tmp_path, 2, model, None, {"step": 2}, keep_last=1)
    msgs = [str(w.message) for w in caught if str(first) in str(w.message)]
    assert len(msgs) == 1 and "could not remove the old checkpoint" in msgs[0] and "Permission denied" in msgs[0]
    assert find_latest_checkpoint(tmp_path) == second  # the save itself succeeded
