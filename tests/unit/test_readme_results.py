"""The README's result tables are the ones benchmarks/readme_results.py writes from benchmarks/results/."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_readme_tables_match_the_results_json():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "readme_results.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    readme = (REPO / "README.md").read_text()
    for name in ("quickstart", "mixers"):
        start, end = readme.index(f"<!-- results:{name} -->"), readme.index(f"<!-- /results:{name} -->")
        assert "|---|" in readme[start:end], f"table {name} is empty"
