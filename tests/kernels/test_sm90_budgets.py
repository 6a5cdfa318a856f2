"""sm90 resource budgets of every Triton kernel (``tests/kernels/sm90_budgets.py``).

The slow test compiles every kernel for sm90 at the scale presets' shapes (bf16, the CUDA launch
configurations; minutes on 2 cores, no GPU needed), writes the registers, spills and shared
memory per kernel to JSON and fails past a budget. The fast test checks the budget rule itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_budgets.py")


def _module():
    spec = importlib.util.spec_from_file_location("sm90_budgets", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_budget_rule():
    mod = _module()
    ok = {"shared": 1000, "spill_stores": mod.SPILL_BUDGET, "spill_loads": 0}
    assert mod.check_budget("flash._fwd_kernel D=64", ok) == []
    assert mod.check_budget("x", dict(ok, spill_loads=mod.SPILL_BUDGET + 4))  # over the spill budget
    assert mod.check_budget("x", dict(ok, shared=mod.H100_SHARED_BYTES + 1))  # over the shared memory
    name, (stores, loads) = next(iter(mod.KNOWN_SPILLS.items()))
    assert mod.check_budget(name, dict(ok, spill_stores=stores, spill_loads=loads)) == []
    assert mod.check_budget(name, dict(ok, spill_stores=stores + 4, spill_loads=loads))  # a regression


@pytest.mark.slow
def test_every_kernel_within_its_sm90_budget(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "sm90_budgets.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                         timeout=3000, env=env, check=False)  # fmt: skip
    assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    families = {name.split(".")[0] for name in data["kernels"]}
    assert families == {"flash", "moba", "lightning", "gdn", "moe"}, families
    assert len(data["kernels"]) == 6 + 10 + 8 + 18 + 2
    for name, rec in data["kernels"].items():
        assert rec["registers"] > 0 and rec["shared"] > 0, (name, rec)
    assert res.returncode == 0 and not data["failures"], data["failures"]
