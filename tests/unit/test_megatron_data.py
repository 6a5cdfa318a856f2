"""Megatron indexed datasets: preprocess round trip, ``data.path=megatron:`` windows, blends, errors, memory."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import megatron.core  # noqa: E402,F401  (in the test extra: missing megatron-core fails instead of skipping)

from lctrain.config import ConfigError, load_config
from lctrain.data import build_data
from lctrain.data.corpus import load_documents, split_documents
from lctrain.data.megatron import (
    BlendedWindows,
    parse_megatron_path,
    preprocess_corpus,
    split_document_ids,
)
from lctrain.data.sampler import DistributedBatchSampler
from lctrain.data.tokenizer import Tokenizer, load_tokenizer
from tests.conftest import REPO, tiny_overrides

VAL_FRACTION, SEED = 0.1, 1234  # tiny_overrides' data.val_fraction and DataConfig's data.seed
SEQ = 64


def _indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


@pytest.fixture(scope="module")
def mg(small_corpus, tmp_path_factory):
    """The small corpus preprocessed with a tokenizer trained as data.tokenizer=auto would: ``(root, summary)``."""
    root = tmp_path_factory.mktemp("mg")
    summary = preprocess_corpus(str(small_corpus), root / "small", vocab_size=512, val_fraction=VAL_FRACTION,
                                seed=SEED, cache_dir=root / "cache", progress=False)
    return root, summary


def _data_cfg(tmp_path, path, **extra):
    args = tiny_overrides(tmp_path / "run", Path(__file__), tmp_path / "cache", **extra)  # data.path replaced below
    args = [a for a in args if not a.startswith("data.path=")] + [f"data.path={path}"]
    return load_config(args)


def _windows_equal(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        for key in ("input_ids", "labels", "position_ids", "doc_lens"):
            assert torch.equal(x[key], y[key]), (i, key)


# ---------------------------------------------------------------------------------------------- writing
def test_preprocess_round_trip_equals_lctrain_tokenisation(mg, small_corpus):
    root, summary = mg
    prefix = Path(summary["prefix"])
    assert prefix.name == "small_text_document"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("small")) == [
        "small_text_document.bin", "small_text_document.idx", "small_text_document.json", "small_text_document.model"]
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    docs = load_documents(str(small_corpus))
    tok = Tokenizer.from_file(summary["tokenizer"])
    ds = _indexed(prefix)
    assert len(ds) == len(docs) == summary["documents"] and len(ds.document_indices) == len(docs) + 1
    assert ds.index.dtype == np.uint16
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == tok.encode(doc) + [tok.eos_id], i
    assert summary["tokens"] == int(ds.sequence_lengths.sum())
    meta = json.loads((root / "small_text_document.json").read_text())
    assert meta["tokenizer_fingerprint"] == tok.fingerprint and meta["eos_appended"]
    # the tokenizer trained here is the one data.tokenizer=auto trains on this corpus and split
    auto = load_tokenizer("auto", split_documents(docs, VAL_FRACTION, SEED)[0], 512, root / "auto_cache")
    assert auto.fingerprint == tok.fingerprint


def test_preprocess_cli_reports_bad_input(tmp_path):
    cmd = [sys.executable, str(REPO / "launch" / "preprocess.py"), "--input", str(tmp_path / "nope"),
           "--output-prefix", str(tmp_path / "x"), "--no-progress"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert not list(tmp_path.glob("x*"))


# ---------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("n,frac,seed", [(12, 0.1, 1234), (115, 0.02, 1234), (7, 0.3, 0), (1, 0.1, 5), (40, 0.0, 1)])
def test_document_split_is_split_documents(n, frac, seed):
    docs = [f"doc {i}" for i in range(n)]
    train, val = split_documents(docs, frac, seed)
    tid, vid = split_document_ids(n, frac, seed)
    assert [docs[i] for i in tid] == train and [docs[i] for i in vid] == val


def test_megatron_windows_and_first_loss_equal_the_corpus_pipeline(mg, small_corpus, tmp_path):
    """Same tokenizer and seed: every train/val window (tokens, labels, positions, cu_seqlens) and step-1 loss."""
    from lctrain.train.trainer import train

    root, summary = mg
    tok = summary["tokenizer"]
    text_cfg = _data_cfg(tmp_path / "t", small_corpus, **{"data.tokenizer": tok})
    mg_cfg = _data_cfg(tmp_path / "m", f"megatron:{root / 'small'}")  # tokenizer found beside the files
    _, text_train, text_val = build_data(text_cfg.data, SEQ, 512, tmp_path / "cache")
    mg_tok, mg_train, mg_val = build_data(mg_cfg.data, SEQ, 512, tmp_path / "cache")
    assert mg_tok.fingerprint == Tokenizer.from_file(tok).fingerprint
    assert len(mg_train) > 100 and len(mg_val) > 0
    _windows_equal(mg_train, text_train)
    _windows_equal(mg_val, text_val)
    one = {"train.max_steps": 1, "train.checkpoint_every": 0}
    a = train(_data_cfg(tmp_path / "ta", small_corpus, **{"data.tokenizer": tok}, **one))
    b = train(_data_cfg(tmp_path / "tb", f"megatron:{summary['prefix']}", **one))
    assert abs(a["losses"][0] - b["losses"][0]) < 1e-6 and abs(a["final_val_loss"] - b["final_val_loss"]) < 1e-6


def _megatron_lm_files(src_prefix: str, out_prefix: Path, append_eod: bool, dtype) -> None:
    """Rewrite a prefix the way Megatron-LM's preprocess_data.py lays documents out: several sequences each."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    src = _indexed(src_prefix)
    builder = IndexedDatasetBuilder(f"{out_prefix}.bin", dtype=dtype)
    for i in range(len(src)):
        ids = src[i][:-1]  # without our EOS
        cuts = sorted({len(ids) // 3, len(ids) // 2, len(ids)} - {0})
        pieces = np.split(ids, cuts[:-1])
        lens = [len(p) for p in pieces]
        if append_eod:
            ids = np.concatenate([ids, src[i][-1:]])
            lens[-1] += 1
        builder.add_document(ids, lens)
    builder.finalize(f"{out_prefix}.idx")


@pytest.mark.parametrize("append_eod,dtype", [(True, np.uint16), (False, np.uint16), (True, np.int32)])
def test_megatron_lm_layouts_give_the_same_windows(mg, tmp_path, append_eod, dtype):
    """Sentence-level sequences, with or without --append-eod, int32 tokens: document boundaries from the index."""
    _, summary = mg
    other = tmp_path / "lm_text_sentence"
    _megatron_lm_files(summary["prefix"], other, append_eod, dtype)
    ds = _indexed(other)
    assert len(ds) > ds.document_indices.shape[0] - 1  # several sequences per document
    ref = _data_cfg(tmp_path / "r", f"megatron:{summary['prefix']}")
    cfg = _data_cfg(tmp_path / "o", f"megatron:{other}", **{"data.tokenizer": summary["tokenizer"]})
    _, ref_train, ref_val = build_data(ref.data, SEQ, 512, tmp_path / "cache")
    _, got_train, got_val = build_data(cfg.data, SEQ, 512, tmp_path / "cache")
    assert got_train.tokens.docs.appends_eos == (not append_eod)
    _windows_equal(got_train, ref_train)
    _windows_equal(got_val, ref_val)


def test_resume_from_megatron_prefix_equals_uninterrupted(mg, tmp_path, monkeypatch):
    from lctrain.train.trainer import Trainer, train

    _, summary = mg
    extra = {"train.max_steps": 3, "train.checkpoint_every": 1, "train.eval_every": 0}
    path = f"megatron:{summary['prefix']}"
    ref = train(_data_cfg(tmp_path / "ref", path, **extra))
    real = Trainer.train_step

    def crash(self):
        if self.state.step == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(_data_cfg(tmp_path / "crash", path, **extra))
    monkeypatch.setattr(Trainer, "train_step", real)
    resumed = train(_data_cfg(tmp_path / "crash", path, **extra))
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- blends
@pytest.fixture(scope="module")
def two_prefixes(mg, small_corpus, tmp_path_factory):
    """The small corpus cut in two halves, each preprocessed with the same tokenizer."""
    _, summary = mg
    out = tmp_path_factory.mktemp("blend")
    rows = small_corpus.read_text().splitlines()
    for name, part in (("a", rows[:6]), ("b", rows[6:])):
        (out / f"{name}.jsonl").write_text("\n".join(part) + "\n")
        preprocess_corpus(str(out / f"{name}.jsonl"), out / name, tokenizer=summary["tokenizer"],
                          cache_dir=out / "cache", progress=False)
    return out


def test_blend_samples_in_the_given_ratio(two_prefixes, tmp_path):
    out = two_prefixes
    cfg = _data_cfg(tmp_path, f"megatron:0.3,{out / 'a'},0.7,{out / 'b'}")
    _, train, val = build_data(cfg.data, SEQ, 512, tmp_path / "cache")
    assert isinstance(train, BlendedWindows) and isinstance(val, BlendedWindows)
    _, a_train, _ = build_data(_data_cfg(tmp_path, f"megatron:{out / 'a'}").data, SEQ, 512, tmp_path / "cache")
    _, b_train, _ = build_data(_data_cfg(tmp_path, f"megatron:{out / 'b'}").data, SEQ, 512, tmp_path / "cache")
    n = len(train)
    assert n == len(a_train) + len(b_train)
    from_a = train.dataset_index == 0
    assert abs(from_a.sum() - 0.3 * n) <= 1  # Megatron's greedy blend: every prefix holds the share up to 1
    running = np.cumsum(from_a)
    assert np.all(np.abs(running - 0.3 * np.arange(1, n + 1)) <= 1.0 + 1e-9)
    for i in (0, 1, 7, n - 1):  # a blended sample is a window of its part
        part, w = train.source(i)
        assert torch.equal(train[i]["input_ids"], (a_train, b_train)[part][w]["input_ids"])
    # what the trainer's sampler draws over an epoch keeps the ratio
    sampler = DistributedBatchSampler(n, 8, 2, 0, 1, seed=0)
    drawn = [i for _ in range(sampler.steps_per_epoch) for micro in sampler.next_global_batch() for i in micro]
    share = float(np.mean(train.dataset_index[drawn] == 0))
    assert abs(share - 0.3) < 0.03, share
    # no weights: proportional to the parts' sizes, i.e. every window of both once
    _, plain, _ = build_data(_data_cfg(tmp_path, f"megatron:{out / 'a'},{out / 'b'}").data, SEQ, 512, tmp_path / "c")
    assert abs(int((plain.dataset_index == 0).sum()) - len(a_train)) <= 1


# ---------------------------------------------------------------------------------------------- errors
def test_clear_errors(mg, two_prefixes, tmp_path):
    _, summary = mg
    prefix = summary["prefix"]
    # a missing .idx stops at start-up (config validation)
    broken = tmp_path / "broken_text_document"
    shutil.copy(f"{prefix}.bin", f"{broken}.bin")
    with pytest.raises(ConfigError, match=r"broken_text_document\.idx is missing"):
        _data_cfg(tmp_path, f"megatron:{tmp_path / 'broken'}")
    with pytest.raises(ConfigError, match="no Megatron indexed dataset"):
        _data_cfg(tmp_path, f"megatron:{tmp_path / 'absent'}")
    with pytest.raises(ConfigError, match="weight before every prefix"):
        parse_megatron_path(f"megatron:0.3,{prefix},{prefix}")
    # tokenizer vocabulary larger than the model's
    cfg = _data_cfg(tmp_path, f"megatron:{prefix}", **{"model.vocab_size": 400})
    with pytest.raises(ConfigError, match="model.vocab_size=400"):
        build_data(cfg.data, SEQ, cfg.model.vocab_size, tmp_path / "cache")
    # a dtype the .idx claims but the .bin does not hold
    for code, what in ((4, "dtype mismatch or a truncated"), (1, "uint8")):
        bad = tmp_path / f"dtype{code}"
        shutil.copy(f"{prefix}.bin", f"{bad}.bin")
        idx = bytearray(Path(f"{prefix}.idx").read_bytes())
        idx[17:18] = struct.pack("<B", code)
        Path(f"{bad}.idx").write_bytes(bytes(idx))
        shutil.copy(f"{prefix}.model", f"{bad}.model")
        with pytest.raises(ConfigError, match=what):
            build_data(_data_cfg(tmp_path, f"megatron:{bad}").data, SEQ, 512, tmp_path / "cache")
    # files tokenised with a larger vocabulary than the tokenizer given
    small_tok = tmp_path / "small_tok"
    from lctrain.data.tokenizer import train_tokenizer

    train_tokenizer(["a small corpus of few letters, very few. " * 20], 300, small_tok)
    cfg = _data_cfg(tmp_path, f"megatron:{prefix}", **{"data.tokenizer": f"{small_tok}.model"})
    with pytest.raises(ConfigError, match="outside the tokenizer"):
        build_data(cfg.data, SEQ, 512, tmp_path / "cache")
    # no tokenizer beside a foreign prefix
    foreign = tmp_path / "foreign"
    for ext in (".bin", ".idx"):
        shutil.copy(f"{prefix}{ext}", f"{foreign}{ext}")
    with pytest.raises(ConfigError, match="no tokenizer model beside"):
        build_data(_data_cfg(tmp_path, f"megatron:{foreign}").data, SEQ, 512, tmp_path / "cache")
    with pytest.raises(ConfigError, match="data.filter"):
        build_data(_data_cfg(tmp_path, f"megatron:{prefix}", **{"data.filter": "title~a"}).data, SEQ, 512, tmp_path)


# ---------------------------------------------------------------------------------------------- memory
_RSS_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[3])

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}

import torch
torch.set_num_threads(1)
from lctrain.config import load_config
from lctrain.data.megatron import _import_indexed_dataset
from lctrain.train.trainer import Trainer
from tests.conftest import tiny_overrides
from pathlib import Path
_import_indexed_dataset()
before = status()
out = Path(sys.argv[2])
args = [a for a in tiny_overrides(out, Path("x"), out / "cache") if not a.startswith("data.path=")]
args += [f"data.path={sys.argv[1]}", "train.max_steps=3", "train.checkpoint_every=0", "train.eval_every=0",
         "data.val_fraction=0.02", f"data.seq_len={sys.argv[4]}"]
tr = Trainer(load_config(args))
built = status()
tr.fit()
print(json.dumps({"before_kb": before, "built_kb": built, "after_kb": status(), "train_tokens": tr.train_set.num_tokens,
                  "windows": len(tr.train_set)}))
"""


def _peak_rss(path: str, out: Path, seq_len: int) -> dict:
    """``/proc/self/status`` of a one-rank, 3-step run on ``path``: after imports, after building, after training."""
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, path, str(out), str(REPO), str(seq_len)],
                          check=False, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def repeat_prefix(src_prefix: str, out_prefix: Path, times: int) -> None:
    """``out_prefix`` = ``src_prefix``'s documents ``times`` times over (Megatron's ``add_index``), tokenizer copied."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{out_prefix}.bin", dtype=_indexed(src_prefix).index.dtype)
    for _ in range(times):
        builder.add_index(src_prefix)
    builder.finalize(f"{out_prefix}.idx")
    shutil.copy(f"{src_prefix}.model", f"{out_prefix}.model")


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_corpus_size(tmp_path):
    """Built-in corpus vs 10x it (by repetition): a rank training from the memory-mapped prefix stays flat."""
    one = preprocess_corpus("pd_english", tmp_path / "pd", vocab_size=512, cache_dir=tmp_path / "cache",
                            progress=False)
    repeat_prefix(one["prefix"], tmp_path / "pd10_text_document", 10)
    # seq_len 512: the trainer's sampler keeps its epoch order as a Python list (about 36 bytes per window),
    # which is the one per-window cost; with 512-token windows it stays far below the corpus size
    # (training itself varies the peak by up to ~20 MiB from run to run: the lower of two runs is compared)
    small, big = (min((_peak_rss(f"megatron:{prefix}", tmp_path / f"run_{tag}_{k}", 512) for k in range(2)),
                      key=lambda r: r["after_kb"]["VmHWM"])
                  for tag, prefix in (("1x", one["prefix"]), ("10x", tmp_path / "pd10_text_document")))
    bin_mb = os.path.getsize(tmp_path / "pd10_text_document.bin") / 2**20

    def mib(r, when, key):
        return r[when][key] / 1024

    grow_peak = mib(big, "after_kb", "VmHWM") - mib(small, "after_kb", "VmHWM")
    # what training (data, model, steps) added on top of the imports, in each run
    added = [mib(r, "after_kb", "VmRSS") - mib(r, "before_kb", "VmRSS") for r in (small, big)]
    data = [mib(r, "built_kb", "VmRSS") - mib(r, "before_kb", "VmRSS") for r in (small, big)]  # data + model
    print(f"\n1x: {small['train_tokens']} train tokens; 10x: {big['train_tokens']} (.bin {bin_mb:.1f} MiB)")
    for name, r, a in (("1x", small, added[0]), ("10x", big, added[1])):
        print(f"{name}: peak RSS {mib(r, 'after_kb', 'VmHWM'):.1f} MiB, RSS after imports "
              f"{mib(r, 'before_kb', 'VmRSS'):.1f} MiB, after 3 steps {mib(r, 'after_kb', 'VmRSS'):.1f} MiB "
              f"(anon {mib(r, 'after_kb', 'RssAnon'):.1f}, file {mib(r, 'after_kb', 'RssFile'):.1f}); training added {a:.1f} MiB")
    print(f"peak RSS growth 10x vs 1x: {grow_peak:+.1f} MiB; added-by-training growth {added[1] - added[0]:+.1f} "
          f"MiB; building data + model added {data[0]:.1f} / {data[1]:.1f} MiB (1x / 10x)")
    assert big["train_tokens"] > 9 * small["train_tokens"]
    assert grow_peak < 0.1 * bin_mb, (small, big, bin_mb)  # peak RSS: flat while the .bin grows by 99 MiB
    assert data[1] - data[0] < 0.02 * bin_mb, (small, big, bin_mb)  # opening the prefix holds no corpus
