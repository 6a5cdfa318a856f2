"""The prepared GPU check keeps working and fits: ``benchmarks/gpu_check.py --dry-run`` on CPU runs every
section's stand-in in its own subprocess, writes the JSON section by section, survives a section that
fails or hangs, and prints its time plan (at most 6 minutes on a GPU) first."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, *extra):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--workdir",
                           str(tmp_path / "work"), *extra], capture_output=True, text=True, timeout=900, env=ENV)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_gpu_time_plan_fits_six_minutes():
    mod = _load()
    assert mod.BUDGET_S <= 360 and sum(gpu for _, gpu, _ in mod.SECTIONS) <= mod.BUDGET_S
    names = [s for s, *_ in mod.SECTIONS]  # kernel timings first, then correctness, then end to end
    assert names.index("timing_lctrain") < names.index("correctness") < names.index("end_to_end")
    assert names.index("timing_lctrain") < names.index("kernel_tests")


def test_gpu_check_dry_run_every_section(tmp_path):
    proc, res = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("[gpu_check] time plan")
    secs = res["sections"]
    assert list(secs) == [s for s, *_ in _load().SECTIONS] and all(s["status"] == "ok" for s in secs.values())
    assert res["dry_run"] and res["sections"]["env"]["rows"][0]["fla_import_error"] is None
    rows = secs["timing_lctrain"]["rows"]
    assert {r["op"] for r in rows} == {"gated_delta_rule", "lightning_attn", "flash_attn", "sdpa", "moba",
                                       "linear_cross_entropy"}
    assert all(r["ms"] > 0 for r in rows) and max(r["T"] for r in rows if r["op"] == "gated_delta_rule") > max(
        r["T"] for r in rows if r["op"] == "flash_attn")  # the longest length for Gated DeltaNet only
    (loss,) = [r for r in rows if r["op"] == "linear_cross_entropy"]
    assert loss["rel_err"] < 1e-5
    fla = secs["timing_fla"]["rows"]
    assert {r["impl"] for r in fla} == {"fla_chunk", "fla_simple_gla"} and all(r["ms"] > 0 for r in fla)
    corr = secs["correctness"]["rows"]
    assert {r["op"] for r in corr} == {"gated_delta_rule", "lightning_attn", "flash_attn_varlen",
                                       "fla_gated_delta_rule", "fla_lightning_attn"}
    assert all(r["pass"] and r["out_rel_err"] < 1e-4 for r in corr)
    assert "tests collected" in secs["kernel_tests"]["rows"][0]["summary"]
    e2e = secs["end_to_end"]["rows"][-1]
    assert e2e["tokens_per_s"] > 0 and e2e["warmup_steps_excluded"] == 2 and len(e2e["step_s"]) == e2e["steps"]
    assert e2e["host_syncs_per_step"] is not None and not e2e["final_checkpoint_written"]
    assert e2e["kernel_plan"]["gated_delta_rule"] == "torch_chunk"


def test_gpu_check_survives_a_failing_and_a_hanging_section(tmp_path):
    proc, res = _run(tmp_path, "--sections", "env", "timing_fla", "correctness", "kernel_tests",
                     "--force", "timing_fla=raise", "--force", "correctness=sleep", "--timeout", "correctness=10")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    secs = res["sections"]
    assert [s["status"] for s in secs.values()] == ["ok", "error", "timeout", "ok"]
    assert any("forced failure" in ln for ln in secs["timing_fla"]["stderr_tail"])
    assert secs["correctness"]["rows"] == [{"note": "forced to hang (--force)"}]  # rows written before the hang
    assert secs["correctness"]["seconds"] < 60 and res["time_plan_s"]["correctness"] == 10
    assert "correctness" in proc.stdout and "timeout" in proc.stdout
