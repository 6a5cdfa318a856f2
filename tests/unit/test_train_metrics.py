"""MetricsLogger (TensorBoard scalars read back from the event file), summary.json and MFU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lctrain.train.metrics import MetricsLogger, mfu, peak_bf16_flops, peak_bf16_flops_for_name, write_summary


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_logger_writes_expected_tags(tmp_path):
    with MetricsLogger(tmp_path, rank=0, enabled_tensorboard=True, progress=True, total_steps=10,
                       tokens_per_step=64) as log:
        log.log_step(1, {"loss": torch.tensor(2.5), "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1000.0,
                         "mfu": None})
        log.log_step(2, {"loss": 2.0, "lr": 2e-3, "grad_norm": 0.5, "mfu": 0.25, "aux_loss": 0.125})
        log.log_eval(2, {"loss": 1.5})
        log.log_step(3, {"train/loss": 1.75, "tokens_per_s": 10.0})  # prefixed spellings are the same keys
        log.log_eval(3, {"val/loss": 1.25, "val/ppl": 3.5})
        assert log.bar.n == 3 and log.bar.total == 10
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0), (3, 1.75)]
    assert scalars["lr"] == [(1, pytest.approx(1e-3)), (2, pytest.approx(2e-3))]
    assert scalars["grad_norm"] == [(1, 0.75), (2, 0.5)]
    assert scalars["mfu"] == [(2, 0.25)]  # None is skipped
    assert scalars["train/aux_loss"] == [(2, 0.125)]
    assert scalars["val/loss"] == [(2, 1.5), (3, 1.25)]
    assert scalars["val/ppl"] == [(2, pytest.approx(math.exp(1.5), rel=1e-6)), (3, 3.5)]
    # step 1 was given, step 2 derived from wall time: 64 tokens / elapsed seconds > 0
    assert scalars["tokens_per_s"][0] == (1, 1000.0)
    assert scalars["tokens_per_s"][1][0] == 2 and scalars["tokens_per_s"][1][1] > 0
    assert scalars["tokens_per_s"][2] == (3, 10.0)
    assert set(scalars) == {"train/loss", "lr", "grad_norm", "mfu", "train/aux_loss", "tokens_per_s",
                            "val/loss", "val/ppl"}


def test_resume_starts_bar_at_initial_step(tmp_path):
    log = MetricsLogger(tmp_path, rank=0, enabled_tensorboard=False, progress=True, total_steps=10,
                        tokens_per_step=1, initial_step=6)
    assert log.bar is None  # drawn from the first step on
    log.log_step(8, {"loss": 1.0})
    assert log.bar.n == 8 and log.bar.initial == 6
    log.close()
    log.close()  # idempotent
    assert not (tmp_path / "tb").exists()


def test_nonzero_rank_does_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", rank=1, enabled_tensorboard=True, progress=True, total_steps=5,
                        tokens_per_step=8)
    log.log_step(1, {"loss": 1.0})
    log.log_eval(1, {"loss": 1.0})
    log.close()
    assert log.writer is None and log.bar is None and not (tmp_path / "run").exists()


def test_write_summary_atomic_and_converting(tmp_path):
    target = write_summary(tmp_path, {"final_loss": torch.tensor(1.25), "out": tmp_path, "steps": 3})
    assert json.loads(target.read_text()) == {"final_loss": 1.25, "out": str(tmp_path), "steps": 3}
    write_summary(tmp_path, {"steps": 4})
    assert json.loads(target.read_text()) == {"steps": 4}
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        write_summary(tmp_path, {"bad": object()})
    with pytest.raises(ValueError, match="must be a dict"):
        write_summary(tmp_path, [1, 2])
    assert json.loads(target.read_text()) == {"steps": 4}  # a failed write leaves the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp files left


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_peak_table(name, peak):
    assert peak_bf16_flops_for_name(name) == peak


def test_mfu_formula():
    assert mfu(6e9, 1000.0, "cpu") is None and peak_bf16_flops("cpu") is None
    assert mfu(6e9, 1000.0, "cpu", peak_flops=1e13) == pytest.approx(0.6)  # 6e12 / 1e13
    with pytest.raises(ValueError, match="peak_flops"):
        mfu(1.0, 1.0, "cpu", peak_flops=0.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        mfu(-1.0, 1.0, "cpu")
