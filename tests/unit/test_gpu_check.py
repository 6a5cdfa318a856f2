"""The prepared GPU check keeps working: ``benchmarks/gpu_check.py --dry-run`` on CPU (Triton interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] and res["tests"]["returncode"] == 0 and "tests collected" in res["tests"]["summary"]
    ops = {r["op"] for r in res["kernels"]}
    assert ops == {"gated_delta_rule", "flash_attn", "lightning_attn", "moba"}
    for r in res["kernels"]:
        assert r["ms"] > 0 and r["baseline_ms"] > 0, r
        if "rel_err_vs_baseline" in r:  # fp32 under the interpreter: the kernels agree with their baselines
            assert r["rel_err_vs_baseline"] < 1e-4, r
    (loss,) = res["loss"]  # chunked linear cross entropy vs whole logits
    assert loss["op"] == "linear_cross_entropy" and loss["ms"] > 0 and loss["rel_err_vs_baseline"] < 1e-5, loss
    assert [r["kernels"] for r in res["end_to_end"]] == ["triton", "torch"]
    assert all(r["tokens_per_s"] > 0 for r in res["end_to_end"])
    assert res["e2e_loss_rel_diff"] < 1e-4
