"""The memory planner: its fake-tensor trace equals the same step measured on real tensors, on one
process and on 2 gloo ranks under context parallelism; its CLI answers and its linear model holds."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lctrain.config import load_config
from lctrain.planner import estimate, fake_process_group, trace_step
from tests.conftest import free_port

TINY = ["scale=cpu", "model.d_model=64", "model.vocab_size=512", "model.attn.num_heads=2", "model.attn.num_kv_heads=1",
        "model.attn.head_dim=32", "model.gdn.num_heads=2", "model.gdn.head_dim=32", "train.micro_batch_size=1",
        "train.dtype=fp32"]
TOL = 0.10  # the bound on the live-tensor peak


def _cfg(recipe, seq_len, *extra):
    return load_config([f"recipe={recipe}", f"data.seq_len={seq_len}", *TINY, *extra])


@pytest.mark.parametrize("recipe, extra", [("hybrid_gdn_3to1", ()), ("transformer", ()),
                                           # bf16: torch._grouped_mm's shape function accepts bf16 only
                                           ("hybrid_gdn_3to1_moe", ("train.dtype=bf16",)),
                                           ("hybrid_gdn_3to1", ("model.activation_checkpointing=true",))])
def test_prediction_equals_measurement_one_process(recipe, extra):
    cfg = _cfg(recipe, 1024, *extra)
    pred = trace_step(cfg, 1, target="cpu", fake=True)
    meas = trace_step(cfg, 1, target="cpu", fake=False)
    assert abs(pred.peak_live_mib / meas.peak_live_mib - 1) < TOL, (pred.peak_live_mib, meas.peak_live_mib)
    for part in ("parameters", "activations"):
        assert abs(pred.parts[part] - meas.parts[part]) <= TOL * meas.parts[part] + 0.01, part
    assert pred.parts["parameters"] > 0 and pred.parts["activations"] > pred.parts["parameters"]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {impl: trace_step(_cfg("hybrid_gdn_3to1", 2048, "parallel.cp_degree=2", f"parallel.cp_impl={impl}"),
                                world, target="cpu", fake=False, rank=rank).peak_live_mib
               for impl in ("ring", "ulysses")}
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_prediction_equals_measurement_cp2(tmp_path):
    out = tmp_path / "m.json"
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    measured = json.loads(out.read_text())
    for impl in ("ring", "ulysses"):
        with fake_process_group(2):
            pred = trace_step(_cfg("hybrid_gdn_3to1", 2048, "parallel.cp_degree=2", f"parallel.cp_impl={impl}"), 2,
                              target="cpu", fake=True)
        m = max(r[impl] for r in measured)
        assert abs(pred.peak_live_mib / m - 1) < TOL, (impl, pred.peak_live_mib, m)
        one = trace_step(_cfg("hybrid_gdn_3to1", 2048), 1, target="cpu", fake=True)
        assert pred.parts["activations"] < 0.7 * one.parts["activations"]  # the shard halves the activations


def test_cuda_target_is_linear_in_seq_len_and_adds_the_reserve():
    """The CUDA plan at three lengths: activations grow linearly (fused kernels), the reserve is stated."""
    peaks = [estimate(_cfg("hybrid_gdn_3to1", n), 1, target="cuda").peak_live_mib for n in (1024, 2048, 4096)]
    a, b = peaks[1] - peaks[0], (peaks[2] - peaks[1]) / 2
    assert abs(a / b - 1) < 0.05, peaks
    est = estimate(_cfg("hybrid_gdn_3to1", 1024), 1, target="cuda")
    assert est.predicted_peak_mib > est.peak_live_mib + 1000 and est.assumptions


def test_cli_fit_finds_the_longest_seq_len(tmp_path, capsys):
    from lctrain.planner.cli import main

    out = tmp_path / "fit.json"
    rc = main(["recipe=hybrid_gdn_3to1", *TINY, "--gpus", "2", "--gpu-mib", "1400", "--fit", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    best = res["fit"][0]
    assert best["predicted_peak_mib"] <= 1400 and best["layout"]["cp"] == 2
    # one step longer does not fit: the answer is the longest on the 4096-token grid
    longer = estimate(_cfg("hybrid_gdn_3to1", best["seq_len"] + 4096, "parallel.cp_degree=2", "parallel.dp_impl=fsdp",
                           f"parallel.cp_impl={best['layout']['cp_impl']}", "model.activation_checkpointing=true",
                           "model.loss_chunk_size=4096"), 2, target="cuda")
    assert longer.predicted_peak_mib > 1400
    assert "set: data.seq_len=" in capsys.readouterr().out


def test_cli_reports_and_refuses_bad_input(capsys):
    from lctrain.planner.cli import main

    assert main(["recipe=hybrid_gdn_3to1", *TINY, "data.seq_len=1024", "--gpus", "3"]) == 2
    assert "--gpus=3" in capsys.readouterr().err
    assert main(["recipe=hybrid_gdn_3to1", *TINY, "data.seq_len=1024", "--gpu-mib", "100"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
