"""Data pipeline: corpus loading, document split, tokenizer, packing, sampler, build_data.

References are hand-computed (packing windows, cu_seqlens, sampler slices) or independent
(a direct torch.randperm for the epoch order, per-document encodes for the packed stream).
"""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lctrain.config import DataConfig
from lctrain.data import build_data, next_micro_batches
from lctrain.data import packing as packing_mod
from lctrain.data import tokenizer as tokenizer_mod
from lctrain.data.corpus import corpus_fingerprint, load_documents, split_documents
from lctrain.data.packing import PackedDataset, collate_packed, load_or_pack, pack_documents, token_cache_path
from lctrain.data.sampler import DistributedBatchSampler
from lctrain.data.tokenizer import (
    Tokenizer,
    check_vocab,
    load_tokenizer,
    tokenizer_cache_path,
    train_tokenizer,
)

TINY = [
    "The quick brown fox jumps over the lazy dog.\nA second line, with  two spaces.\n" * 20,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n" * 15,
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 12,
    "In the beginning God created the heaven and the earth. 1234 5678 90\n" * 10,
]


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_tok() -> Tokenizer:
    return train_tokenizer(TINY, 320)


# ----------------------------------------------------------------------------- corpus


def test_load_jsonl_and_gz_keep_order_and_drop_empty(tmp_path):
    rows = [{"text": "first doc"}, {"text": ""}, {"text": "second\ndoc"}, {"text": "  \n"}, {"text": "third"}]
    cache = tmp_path / "cache"
    for name, gz in [("c.jsonl", False), ("c.jsonl.gz", True)]:
        p = write_jsonl(tmp_path / name, rows, gz=gz)
        assert load_documents(str(p), cache_dir=cache) == ["first doc", "second\ndoc", "third"]
    # datasets' Arrow cache lives under the given cache dir
    assert (cache / "hf_datasets").is_dir()


def test_load_custom_key_json_array_txt_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = tmp_path / "cache"
    p = write_jsonl(tmp_path / "k.jsonl", [{"body": "alpha", "title": "A"}, {"body": "beta", "title": "B"}])
    assert load_documents(str(p), text_key="body", cache_dir=cache) == ["alpha", "beta"]

    j = tmp_path / "arr.json"
    j.write_text(json.dumps([{"text": "x1"}, {"text": "x2"}]))
    assert load_documents(str(j), cache_dir=cache) == ["x1", "x2"]

    t = tmp_path / "whole.txt"
    t.write_text("line one\n\nline three\n")
    assert load_documents(str(t), cache_dir=cache) == ["line one\n\nline three\n"]

    q = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"], "n": [1, 2, 3]}), q)
    assert load_documents(str(q), cache_dir=cache) == ["p1", "p2", "p3"]


def test_load_directory_sorted_mixed(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("doc b")
    write_jsonl(d / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    (d / "sub" / "c.txt").write_text("doc c")
    (d / ".hidden.txt").write_text("hidden")
    (d / "notes.md").write_text("ignored")
    assert load_documents(str(d), cache_dir=tmp_path / "cache") == ["a1", "a2", "doc b", "doc c"]


def test_builtin_corpus(tmp_path):
    docs = load_documents("pd_english", cache_dir=tmp_path / "cache")
    assert len(docs) == 115
    assert docs[0].startswith("ALL'S WELL THAT ENDS WELL")
    assert 10_000_000 < sum(map(len, docs)) < 11_500_000


def test_corpus_errors(tmp_path):
    cache = tmp_path / "cache"
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl") as e:
        load_documents(str(missing), cache_dir=cache)
    assert "pd_english" in str(e.value) and "hf:" in str(e.value) and ".parquet" in str(e.value)

    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(ValueError, match="empty"):
        load_documents(str(empty), cache_dir=cache)

    keyed = write_jsonl(tmp_path / "keyed.jsonl", [{"content": "x", "title": "t"}])
    with pytest.raises(ValueError, match="no column 'text'") as e:
        load_documents(str(keyed), cache_dir=cache)
    assert "content" in str(e.value) and "title" in str(e.value) and "data.text_key" in str(e.value)

    numeric = write_jsonl(tmp_path / "num.jsonl", [{"text": 5}])
    with pytest.raises(ValueError, match="strings"):
        load_documents(str(numeric), cache_dir=cache)

    bad_ext = tmp_path / "data.csv"
    bad_ext.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported extension"):
        load_documents(str(bad_ext), cache_dir=cache)

    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="no corpus files"):
        load_documents(str(tmp_path / "emptydir"), cache_dir=cache)

    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match="only the split 'train'"):
        load_documents(str(ok), split="validation", cache_dir=cache)


@pytest.mark.parametrize("name, content, fragments", [
    ("cut.jsonl", b'{"text": "a"}\n\n{"text": "b\n{"text": "c"}\n', ["cut.jsonl line 3", "not valid JSON"]),
    ("list.jsonl", b'{"text": "a"}\n[1, 2]\n', ["list.jsonl line 2", "a JSON array, not an object"]),
    ("mixed.jsonl", b'{"text": "a"}\n{"text": 5}\n', ["row 1 (", "mixed.jsonl line 2)", "must hold strings"]),
    ("array.json", b'[{"text": "a"},\n {"text": }]\n', ["array.json line 2", "not valid JSON"]),
    ("blank.jsonl", b"\n  \n", ["blank.jsonl holds only blank lines"]),
    ("latin1.txt", b"ok line\ncaf\xe9\n", ["invalid UTF-8 at byte offset 11", "(line 2)", "bytes e9"]),
    ("latin1.jsonl.gz", gzip.compress(b'{"text": "caf\xe9"}\n'), ["byte offset 13 (after decompression)"]),
])
def test_unreadable_files_are_named_with_their_line(tmp_path, name, content, fragments):
    from lctrain.errors import DataError

    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as e:
        load_documents(str(tmp_path / name), cache_dir=tmp_path / "cache")
    for frag in fragments:
        assert frag in str(e.value), (frag, str(e.value))


def test_unreachable_hub_dataset_is_a_data_error(tmp_path, monkeypatch):
    import datasets

    from lctrain.errors import DataError

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load hub dataset 'hf:nobody/no-such-dataset'"):
        load_documents("hf:nobody/no-such-dataset", cache_dir=tmp_path / "cache")


def test_startup_helpers_without_a_process_group():
    from lctrain.errors import ConfigError
    from lctrain.train.startup import agree, main_first, on_main

    assert main_first(lambda: 7) == 7
    agree(None)
    with pytest.raises(ConfigError, match="boom"):
        agree(ConfigError("boom"))
    with pytest.raises(ConfigError, match="held"):
        on_main(lambda: (_ for _ in ()).throw(ConfigError("held")))


def test_skipped_documents_and_empty_files_are_counted(tmp_path, caplog):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", [{"text": "one"}, {"text": None}, {"text": "  "}, {"text": ""}, {"text": "two"}])
    (shards / "b.jsonl").write_bytes(b"")
    with caplog.at_level("WARNING", logger="lctrain.data.corpus"):
        docs = load_documents(str(shards), cache_dir=tmp_path / "cache")
    assert docs == ["one", "two"]
    assert "skipped 1 of 2 files" in caplog.text and "b.jsonl (empty)" in caplog.text
    assert "skipped 3 of 5 documents" in caplog.text and "(1 null, 2 empty or whitespace-only" in caplog.text
    caplog.clear()
    load_documents(str(shards), cache_dir=tmp_path / "cache", quiet=True)
    assert "skipped" not in caplog.text


def test_split_documents():
    docs = [f"doc{i}" for i in range(10)]
    train, val = split_documents(docs, 0.2, seed=7)
    assert len(val) == 2 and len(train) == 8
    assert sorted(train + val) == sorted(docs)
    # both parts keep corpus order
    assert train == [d for d in docs if d in train] and val == [d for d in docs if d in val]
    assert split_documents(docs, 0.2, seed=7) == (train, val)
    assert any(split_documents(docs, 0.2, seed=s)[1] != val for s in range(8, 12))
    # at least one val doc for a tiny fraction, none for 0, and never all documents
    assert len(split_documents(docs, 0.001, 0)[1]) == 1
    assert split_documents(docs, 0.0, 0) == (docs, [])
    assert split_documents(["a", "b"], 0.49, 0)[0] != []
    assert split_documents(["only"], 0.3, 0) == (["only"], [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0, 0)


def test_corpus_fingerprint_sees_order_and_boundaries():
    assert corpus_fingerprint(["ab", "c"]) == corpus_fingerprint(["ab", "c"])
    assert corpus_fingerprint(["ab", "c"]) != corpus_fingerprint(["a", "bc"])
    assert corpus_fingerprint(["ab", "c"]) != corpus_fingerprint(["c", "ab"])


# -------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    ["The quick brown fox", "  leading and  double  spaces \n\n\ttabs\n", "héllo wörld ünïcode 🙂 日本語", "</s> <unk>", ""],
)
def test_tokenizer_roundtrip(tiny_tok, text):
    ids = tiny_tok.encode(text)
    assert tiny_tok.decode(ids) == text
    assert all(0 <= i < tiny_tok.vocab_size for i in ids)
    assert tiny_tok.eos_id not in ids  # text never produces the control id


def test_tokenizer_properties_and_files(tiny_tok, tmp_path):
    assert tiny_tok.vocab_size == 320 and tiny_tok.eos_id == 2
    # BPE merges: common words take fewer tokens than characters
    assert len(tiny_tok.encode("The quick brown fox")) < len("The quick brown fox")
    texts = ["a b c", "The lazy dog", "1234"]
    assert tiny_tok.encode_batch(texts) == [tiny_tok.encode(t) for t in texts]
    # concatenation-compatible: no dummy prefix is added or stripped
    assert tiny_tok.decode(tiny_tok.encode("ab") + [tiny_tok.eos_id] + tiny_tok.encode(" cd")) == "ab cd"

    saved = train_tokenizer(TINY, 320, model_prefix=tmp_path / "m")
    assert (tmp_path / "m.model").is_file()
    loaded = Tokenizer.from_file(tmp_path / "m.model")
    assert loaded.encode(TINY[2]) == saved.encode(TINY[2]) == tiny_tok.encode(TINY[2])  # training is deterministic
    assert loaded.fingerprint == tiny_tok.fingerprint

    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.from_file(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_file(junk)
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(TINY, 100)


def test_load_tokenizer_auto_caches(tmp_path, monkeypatch):
    tok = load_tokenizer("auto", TINY, 320, tmp_path)
    expected = tokenizer_cache_path(TINY, 320, tmp_path)
    assert expected.name.startswith("tokenizer_") and expected.name.endswith("_320.model")
    assert tok.path == expected and expected.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def boom(*a, **k):
        raise AssertionError("must not retrain when the cache exists")

    monkeypatch.setattr(tokenizer_mod, "_train_proto", boom)
    again = load_tokenizer("auto", TINY, 320, tmp_path)
    assert again.fingerprint == tok.fingerprint
    assert load_tokenizer(str(expected), None, 0, tmp_path).fingerprint == tok.fingerprint
    # another corpus gets another cache entry (and would be trained)
    assert tokenizer_cache_path(TINY[:2], 320, tmp_path) != expected
    with pytest.raises(AssertionError, match="must not retrain"):
        load_tokenizer("auto", TINY[:2], 320, tmp_path)


def test_check_vocab(tiny_tok):
    check_vocab(tiny_tok, 320)
    check_vocab(tiny_tok, 4096)
    with pytest.raises(ValueError, match="model.vocab_size") as e:
        check_vocab(tiny_tok, 256)
    assert "256" in str(e.value) and "320" in str(e.value)


# ---------------------------------------------------------------------------- packing

EOS = 2
# three documents of lengths 3, 4, 2 and 4 (EOS included)
STREAM = np.array([5, 6, 2, 7, 8, 9, 2, 10, 2, 11, 12, 13, 2], dtype=np.uint16)


def test_packed_windows_hand_example():
    ds = PackedDataset(STREAM, EOS, seq_len=4)
    assert len(ds) == 3  # (13 - 1) // 4
    expect = [
        # input_ids, labels, position_ids, doc_lens
        ([5, 6, 2, 7], [6, 2, -100, 8], [0, 1, 2, 0], [3, 1]),
        ([8, 9, 2, 10], [9, 2, -100, 2], [0, 1, 2, 0], [3, 1]),
        ([2, 11, 12, 13], [-100, 12, 13, 2], [0, 0, 1, 2], [1, 3]),
    ]
    for i, (inp, lab, pos, lens) in enumerate(expect):
        s = ds[i]
        assert s["input_ids"].tolist() == inp and s["input_ids"].dtype == torch.int64
        assert s["labels"].tolist() == lab and s["labels"].dtype == torch.int64
        assert s["position_ids"].tolist() == pos and s["position_ids"].dtype == torch.int64
        assert s["doc_lens"].tolist() == lens and s["doc_lens"].dtype == torch.int32
    assert ds[-1]["input_ids"].tolist() == expect[2][0]
    with pytest.raises(IndexError):
        ds[3]

    batch = collate_packed([ds[0], ds[1], ds[2]])
    assert batch["input_ids"].shape == (1, 12) and batch["input_ids"].tolist() == [[5, 6, 2, 7, 8, 9, 2, 10, 2, 11, 12, 13]]
    assert batch["labels"].tolist() == [[6, 2, -100, 8, 9, 2, -100, 2, -100, 12, 13, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 0, 0, 0, 1, 2]]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 3, 4, 7, 8, 9, 12]
    assert batch["max_seqlen"] == 3 and batch["num_tokens"] == 9


def test_packed_eos_at_window_end_and_tail_dropped():
    ds = PackedDataset(np.array([5, 6, 2, 7, 8, 9, 2]), EOS, seq_len=3)
    assert len(ds) == 2
    assert ds[0]["doc_lens"].tolist() == [3]  # no empty segment after a final EOS
    assert ds[0]["labels"].tolist() == [6, 2, -100]
    assert collate_packed([ds[0], ds[1]])["cu_seqlens"].tolist() == [0, 3, 6]
    short = PackedDataset(STREAM, EOS, seq_len=5)
    assert len(short) == 2  # tokens 10..12 would need a third window: dropped
    assert len(PackedDataset(STREAM[:4], EOS, seq_len=4)) == 0
    with pytest.raises(ValueError, match="seq_len"):
        PackedDataset(STREAM, EOS, seq_len=0)


@pytest.mark.parametrize("seq_len", [1, 7, 16, 33])
def test_packed_every_token_once_and_labels_next(seq_len):
    rng = np.random.default_rng(seq_len)
    tokens = rng.integers(3, 50, size=500).astype(np.int32)
    tokens[rng.random(500) < 0.08] = EOS
    ds = PackedDataset(tokens, EOS, seq_len)
    n = (len(tokens) - 1) // seq_len
    assert len(ds) == n
    samples = [ds[i] for i in range(n)]
    inputs = torch.cat([s["input_ids"] for s in samples]).numpy()
    np.testing.assert_array_equal(inputs, tokens[: n * seq_len])  # each token an input exactly once
    labels = torch.cat([s["labels"] for s in samples]).numpy()
    nxt = tokens[1 : n * seq_len + 1]
    masked = inputs == EOS
    np.testing.assert_array_equal(labels[~masked], nxt[~masked])
    assert (labels[masked] == -100).all()
    batch = collate_packed(samples)
    cu = batch["cu_seqlens"].numpy()
    assert cu[0] == 0 and cu[-1] == n * seq_len and (np.diff(cu) > 0).all()
    # independent reference for segment starts: window starts and positions after an EOS
    ref_starts = sorted({k * seq_len for k in range(n)} | {t + 1 for t in range(n * seq_len - 1) if inputs[t] == EOS})
    assert cu[:-1].tolist() == ref_starts
    pos = batch["position_ids"][0].numpy()
    for a, b in itertools.pairwise(cu):
        np.testing.assert_array_equal(pos[a:b], np.arange(b - a))
    assert batch["num_tokens"] == int((~masked).sum())


def test_pack_documents_and_cache(tiny_tok, tmp_path, monkeypatch):
    docs = ["first document", "second one\nwith two lines", "x"]
    stream = pack_documents(docs, tiny_tok)
    ref = []
    for d in docs:
        ref += tiny_tok.encode(d) + [tiny_tok.eos_id]
    assert stream.dtype == np.uint16 and stream.tolist() == ref

    cached = load_or_pack(docs, tiny_tok, tmp_path, "train")
    assert cached.tolist() == ref
    path = token_cache_path(docs, tiny_tok, tmp_path, "train")
    assert path.is_file() and path != token_cache_path(docs, tiny_tok, tmp_path, "val")
    monkeypatch.setattr(packing_mod, "pack_documents", lambda *a: pytest.fail("cache not used"))
    assert load_or_pack(docs, tiny_tok, tmp_path, "train").tolist() == ref

    # segments decode back to the documents
    ds = PackedDataset(cached, tiny_tok.eos_id, seq_len=len(ref) - 1)
    s = ds[0]
    ids = torch.cat([s["input_ids"], s["labels"][-1:]]).tolist()
    bounds = np.cumsum([0] + s["doc_lens"].tolist())
    got = [tiny_tok.decode(ids[a:b]) for a, b in itertools.pairwise(bounds)]
    assert got == docs


# ---------------------------------------------------------------------------- sampler


def run_steps(sampler, steps):
    return [sampler.next_global_batch() for _ in range(steps)]


def test_sampler_hand_example_sequential():
    r0 = DistributedBatchSampler(10, 4, 2, dp_rank=0, dp_size=2, shuffle=False)
    r1 = DistributedBatchSampler(10, 4, 2, dp_rank=1, dp_size=2, shuffle=False)
    assert r0.steps_per_epoch == 2 and r0.grad_accum_steps == 1
    assert run_steps(r0, 3) == [[[0, 1]], [[4, 5]], [[0, 1]]]  # samples 8, 9 dropped; epoch 1 restarts
    assert run_steps(r1, 3) == [[[2, 3]], [[6, 7]], [[2, 3]]]
    assert r0.epoch == 1
    one = DistributedBatchSampler(10, 4, 1, shuffle=False)
    assert one.next_global_batch() == [[0], [1], [2], [3]]


def test_sampler_epoch_order_is_seeded_randperm():
    s = DistributedBatchSampler(13, 4, 2, seed=5)
    steps = run_steps(s, 6)  # 3 steps per epoch, then epoch 1
    flat = [i for step in steps for mb in step for i in mb]
    g0 = torch.Generator().manual_seed(5)
    g1 = torch.Generator().manual_seed(6)
    assert flat[:12] == torch.randperm(13, generator=g0).tolist()[:12]
    assert flat[12:] == torch.randperm(13, generator=g1).tolist()[:12]
    assert len(set(flat[:12])) == 12
    assert s.epoch == 1


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_sampler_union_over_ranks_matches_single_rank(dp_size):
    num, gbs, mbs, steps = 37, 8, 2, 11  # 4 steps per epoch: crosses two epoch boundaries
    single = run_steps(DistributedBatchSampler(num, gbs, mbs, seed=3), steps)
    ranks = [run_steps(DistributedBatchSampler(num, gbs, mbs, r, dp_size, seed=3), steps) for r in range(dp_size)]
    for k in range(steps):
        per_rank = [[i for mb in ranks[r][k] for i in mb] for r in range(dp_size)]
        for r in range(dp_size):
            assert len(ranks[r][k]) == gbs // (mbs * dp_size)
            assert all(len(mb) == mbs for mb in ranks[r][k])
        union = [i for part in per_rank for i in part]
        assert len(set(union)) == gbs  # disjoint across ranks
        assert union == [i for mb in single[k] for i in mb]  # same samples in the same order


def test_sampler_deterministic_and_seed_dependent():
    a = run_steps(DistributedBatchSampler(50, 8, 4, seed=1), 5)
    assert a == run_steps(DistributedBatchSampler(50, 8, 4, seed=1), 5)
    assert a != run_steps(DistributedBatchSampler(50, 8, 4, seed=2), 5)


def test_sampler_resume():
    full = run_steps(DistributedBatchSampler(21, 4, 2, seed=9), 12)
    first = DistributedBatchSampler(21, 4, 2, seed=9)
    run_steps(first, 7)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 8  # 5 steps per epoch
    resumed = DistributedBatchSampler(21, 4, 2, seed=9)
    resumed.load_state_dict(state)
    assert run_steps(resumed, 5) == full[7:]
    # resuming on 2 data-parallel ranks continues the same global batches
    r = [DistributedBatchSampler(21, 4, 1, k, 2, seed=9) for k in range(2)]
    for s in r:
        s.load_state_dict(state)
    for k in range(5):
        union = [i for s in r for mb in s.next_global_batch() for i in mb]
        assert union == [i for mb in full[7 + k] for i in mb]
    with pytest.raises(ValueError, match="22"):
        DistributedBatchSampler(22, 4, 2, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        DistributedBatchSampler(21, 4, 2, seed=1).load_state_dict(state)


def test_sampler_validation():
    with pytest.raises(ValueError, match="train.global_batch_size=12") as e:
        DistributedBatchSampler(100, 12, 4, dp_rank=0, dp_size=2)
    assert "train.micro_batch_size=4" in str(e.value) and "data-parallel size 2" in str(e.value)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        DistributedBatchSampler(7, 8, 2)
    with pytest.raises(ValueError, match="dp_rank"):
        DistributedBatchSampler(100, 8, 2, dp_rank=2, dp_size=2)


# ------------------------------------------------------------------------- build_data


def test_build_data_end_to_end_and_cached(tmp_path, monkeypatch):
    # val_fraction=0 below changes the training documents, hence trains another tokenizer
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TINY * 3])
    cfg = DataConfig(path=str(corpus), val_fraction=0.25, seed=0)
    cache = tmp_path / "cache"
    tok, train, val = build_data(cfg, 32, 320, cache)
    assert tok.vocab_size == 320 and len(val) > 0
    train_docs, val_docs = split_documents(TINY * 3, 0.25, 0)
    assert len(val_docs) == 3
    assert train.num_tokens == sum(len(tok.encode(d)) + 1 for d in train_docs)
    assert val.num_tokens == sum(len(tok.encode(d)) + 1 for d in val_docs)
    assert len(train) == (train.num_tokens - 1) // 32

    with monkeypatch.context() as m:
        m.setattr(tokenizer_mod, "_train_proto", lambda *a: pytest.fail("tokenizer retrained"))
        m.setattr(packing_mod, "pack_documents", lambda *a: pytest.fail("corpus re-tokenized"))
        tok2, train2, val2 = build_data(cfg, 32, 320, cache)
    assert tok2.fingerprint == tok.fingerprint
    np.testing.assert_array_equal(train2.tokens, train.tokens)
    np.testing.assert_array_equal(val2.tokens, val.tokens)

    sampler = DistributedBatchSampler(len(train), 4, 2, seed=0)
    micro = next_micro_batches(train, sampler)
    assert len(micro) == 2 and micro[0]["input_ids"].shape == (1, 64)

    # tokenizer given as a path, model vocab too small for it
    with pytest.raises(ValueError, match="model.vocab_size=300"):
        build_data(DataConfig(path=str(corpus), tokenizer=str(tok.path)), 32, 300, cache)
    _, train0, no_val = build_data(DataConfig(path=str(corpus), val_fraction=0.0), 32, 320, cache)
    assert len(no_val) == 0 and train0.num_tokens > train.num_tokens
    # a window needs seq_len + 1 tokens: the val stream is one short, the train stream is longer
    _, train_long, short_val = build_data(cfg, val.num_tokens, 320, cache)
    assert len(short_val) == 0 and len(train_long) >= 1
    with pytest.raises(ValueError, match="data.seq_len=100000"):
        build_data(cfg, 100_000, 320, cache)


@pytest.mark.slow
def test_build_data_builtin_vocab_4096(tmp_path):
    tok, train, val = build_data(DataConfig(), 512, 4096, tmp_path)
    assert tok.vocab_size == 4096
    assert train.tokens.dtype == np.uint16
    assert len(val) > 0 and len(train) > 1000
    docs = load_documents("pd_english", cache_dir=tmp_path)
    text = docs[5][:2000]
    assert tok.decode(tok.encode(text)) == text


def test_prepared_manifest_skips_documents_until_a_file_changes(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    import lctrain.data as data_mod

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TINY * 3])
    cfg = DataConfig(path=str(corpus), val_fraction=0.25, seed=0)
    cache = tmp_path / "cache"
    tok, train, val = build_data(cfg, 32, 320, cache)
    assert len(list(cache.glob("prepared_*.json"))) == 1
    with monkeypatch.context() as m:
        m.setattr(data_mod, "load_documents", lambda *a, **k: pytest.fail("documents read again"))
        tok2, train2, val2 = build_data(cfg, 32, 320, cache)
    assert tok2.fingerprint == tok.fingerprint
    np.testing.assert_array_equal(train2.tokens, train.tokens)
    np.testing.assert_array_equal(val2.tokens, val.tokens)
    # a new process reads the prepared data without importing datasets (about 100 MB resident)
    code = ("import sys; from lctrain.config import DataConfig; from lctrain.data import build_data; "
            f"build_data(DataConfig(path={str(corpus)!r}, val_fraction=0.25, seed=0), 32, 320, {str(cache)!r}); "
            "print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
    # the corpus changes (new content, new modification time): rebuilt from the documents
    write_jsonl(corpus, [{"text": t} for t in TINY[::-1] * 3])
    os.utime(corpus, ns=(corpus.stat().st_atime_ns, corpus.stat().st_mtime_ns + 10**9))
    calls = []
    real = data_mod.load_documents
    monkeypatch.setattr(data_mod, "load_documents", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, train3, _ = build_data(cfg, 32, 320, cache)
    assert calls and not np.array_equal(np.asarray(train3.tokens), np.asarray(train.tokens))
    # a manifest whose files were deleted falls back to building
    for f in cache.glob("tokens_*.npy"):
        f.unlink()
    _, train4, _ = build_data(cfg, 32, 320, cache)
    np.testing.assert_array_equal(train4.tokens, train3.tokens)
