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
    # measured: 57.6 vs 1.5 MiB alone; 25.4 vs 1.3 MiB late in a full-suite run (the heap's history differs)
    assert left["dynamic"] > left["fixed"] + 16, left


def test_set_threshold_switches_and_peak_rss():
    assert set_malloc_mmap_threshold(0) is False
    assert peak_rss_mib() > 10  # this process holds torch
    if sys.platform.startswith("linux"):
        assert set_malloc_mmap_threshold(4) is True


def test_threshold_key_is_validated(small_corpus, tmp_path):
    with pytest.raises(ConfigError, match="train.malloc_mmap_threshold_mib"):
        load_config(["recipe=gdn", f"data.path={small_corpus}", f"train.out_dir={tmp_path}",
                     "train.malloc_mmap_threshold_mib=64"])


TRIM_SCRIPT = """
import torch
from lctrain.train.host_memory import release_free_heap, set_malloc_mmap_threshold
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) / 1024
assert set_malloc_mmap_threshold(4)
ts = [torch.ones(1 << 18) for _ in range(200)]  # 200 x 1 MiB from the heap (below the threshold)
pin = torch.ones(16)                             # a live allocation above them: the heap top cannot shrink
before = rss()
ts.clear()
freed = rss()
assert release_free_heap()
print(before, freed, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim exists on Linux only")
def test_release_free_heap_returns_freed_heap_pages():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True, env=env, check=True)
    before, freed, after = (float(x) for x in out.stdout.split()[-3:])
    assert freed > before - 20, (before, freed, after)  # free() alone keeps the pages (heap holes)
    assert after < freed - 150, (before, freed, after)  # malloc_trim hands back nearly all 200 MiB


def test_malloc_trim_key_turns_it_off(small_corpus, tmp_path):
    cfg = load_config(["recipe=gdn", f"data.path={small_corpus}", f"train.out_dir={tmp_path}", "train.malloc_trim=false"])
    assert cfg.train.malloc_trim is False
