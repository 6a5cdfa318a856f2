"""glibc mmap threshold and the peak-RSS figure of the run summary."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lctrain.config import load_config
from lctrain.errors import ConfigError
from lctrain.train.host_memory import peak_rss_mib, set_malloc_mmap_threshold

SCRIPT = """
import ctypes, os, sys
import torch
from lctrain.train.host_memory import set_malloc_mmap_threshold
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) / 1024
if sys.argv[1] == 'fixed':
    assert set_malloc_mmap_threshold(4)
base = rss()
big = torch.ones(64 << 18); del big          # 64 MiB, mmapped; glibc's dynamic threshold rises to it
keep = []
for i in range(40):                          # 40 x 8 MiB, every other one kept: holes in the heap
    t = torch.ones(2 << 20)
    if i % 2:
        keep.append(t)
    del t
keep.clear()
print(rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_fixed_threshold_returns_freed_tensors_to_the_system():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    left = {}
    for mode in ("dynamic", "fixed"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
        left[mode] = float(out.stdout.split()[-1])
    # fixed: every 8 MiB tensor was its own mapping, gone at free; dynamic: they came from the heap
    assert left["fixed"] < 16, left
    assert left["dynamic"] > left["fixed"] + 32, left  # measured: 57.6 vs 1.5 MiB


def test_set_threshold_switches_and_peak_rss():
    assert set_malloc_mmap_threshold(0) is False
    assert peak_rss_mib() > 10  # this process holds torch
    if sys.platform.startswith("linux"):
        assert set_malloc_mmap_threshold(4) is True


def test_threshold_key_is_validated(small_corpus, tmp_path):
    with pytest.raises(ConfigError, match="train.malloc_mmap_threshold_mib"):
        load_config(["recipe=gdn", f"data.path={small_corpus}", f"train.out_dir={tmp_path}",
                     "train.malloc_mmap_threshold_mib=64"])
