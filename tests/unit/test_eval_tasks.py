"""Evaluation tasks (lctrain.eval): generator invariants, scorers with perfect / chance test doubles, the CLIs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lctrain.data.synthetic import (
    IGNORE_INDEX,
    MQARSpec,
    SyntheticTokenizer,
    build_synthetic_data,
    mqar_example,
    parse_synthetic,
)
from lctrain.errors import ConfigError
from lctrain.eval import haystack as hs
from lctrain.eval.tasks import EvalContext, run_tasks
from tests.conftest import tiny_overrides


# ------------------------------------------------------------------------------------------ test doubles
def oracle(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Reads the answer: the logits at i are one-hot on the input token at i + 1."""
    return torch.nn.functional.one_hot(ids.roll(-1, dims=1), vocab).float()


def copy_model(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """A hand-built induction model: find the earlier position whose preceding tokens match the current
    suffix longest (ties: the earliest) and predict the token that followed it."""
    out = torch.zeros(*ids.shape, vocab)
    for b in range(ids.shape[0]):
        x = ids[b].numpy()
        prev = np.zeros(len(x), dtype=np.int64)  # prev[j]: common suffix length of x[:i] and x[:j+1]
        for i in range(len(x)):
            cur = np.zeros(len(x), dtype=np.int64)
            if i:
                shifted = np.concatenate([[0], prev[: i - 1]])
                cur[:i] = np.where(x[:i] == x[i], shifted + 1, 0)
                if cur[:i].max() > 0:
                    out[b, i, x[int(np.argmax(cur[:i])) + 1]] = 1.0
            prev = cur
    return out


def recall_first(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """MQAR's perfect associative memory: predict the token that followed the first occurrence of the current one."""
    out = torch.zeros(*ids.shape, vocab)
    for b in range(ids.shape[0]):
        first: dict[int, int] = {}
        for i, t in enumerate(ids[b].tolist()):
            if t in first:
                out[b, i, int(ids[b, first[t] + 1])] = 1.0
            first.setdefault(t, i)
    return out


@pytest.fixture(scope="module")
def text_tokenizer(small_corpus):
    from lctrain.data.corpus import load_documents
    from lctrain.data.tokenizer import train_tokenizer

    return train_tokenizer(load_documents(str(small_corpus)), 512)


# ------------------------------------------------------------------------------------------ generators
def test_mqar_invariants():
    spec = MQARSpec(vocab=64, num_pairs=6, seq_len=48)
    for i in range(20):
        ex = mqar_example(spec, i)
        ids, n = ex.input_ids, spec.num_pairs
        keys, values = ids[0:2 * n:2], ids[1:2 * n:2]
        assert ((keys >= 1) & (keys < 32)).all() and ((values >= 32) & (values < 64)).all()
        assert len(set(keys)) == n and len(set(values)) == n and not set(keys) & set(values)
        labelled = np.flatnonzero(ex.labels != IGNORE_INDEX)
        assert sorted(labelled) == sorted(ex.query_pos) and len(labelled) == n
        assert (ex.query_pos >= 2 * n).all() and (ex.query_pos % 2 == 0).all()
        for q, p in zip(ex.query_pos, ex.pair_pos, strict=True):
            assert p < q and ids[q] == ids[p] and ex.labels[q] == ids[p + 1]  # the answer is earlier in the context
    assert np.array_equal(mqar_example(spec, 3).input_ids, mqar_example(spec, 3).input_ids)
    assert not np.array_equal(mqar_example(spec, 3, 0).input_ids, mqar_example(spec, 3, 1).input_ids)
    gaps = np.concatenate([mqar_example(spec, i).query_pos for i in range(200)]) - 2 * spec.num_pairs
    assert (gaps < 10).mean() > (gaps >= 30).mean()  # power law: early slots are likelier


def test_synthetic_path_parsing():
    src = parse_synthetic("synthetic:mqar?vocab=128&num_pairs=4", seq_len=64, vocab_size=256, seed=5)
    assert (src.spec.vocab, src.spec.num_pairs, src.spec.seq_len, src.spec.seed) == (128, 4, 64, 5)
    for bad, match in [("synthetic:mqar?colour=3", "unknown key"), ("synthetic:mqar?seq_len=32", "data.seq_len"),
                       ("synthetic:mqar?vocab=999", "model.vocab_size"), ("synthetic:nope", "unknown synthetic"),
                       ("synthetic:mqar?num_pairs=40", "seq_len"), ("synthetic:mqar?num_pairs=x", "expected int")]:
        with pytest.raises(ConfigError, match=match):
            parse_synthetic(bad, seq_len=64, vocab_size=256)
    tok, train, val = build_synthetic_data("synthetic:mqar?num_pairs=4&num_val=8", 64, 128, seed=1)
    assert tok.vocab_size == 128 and len(val) == 8 and train[0]["input_ids"].shape == (64,)
    assert int(train[0]["doc_lens"].sum()) == 64 and (train[0]["labels"] != IGNORE_INDEX).sum() == 4
    assert SyntheticTokenizer(10).encode(tok.decode([1, 2, 3])) == [1, 2, 3]


@pytest.mark.parametrize("length", [180, 301])
def test_passkey_length_and_depth(text_tokenizer, length):
    pieces = hs.make_pieces(text_tokenizer)
    rng = np.random.default_rng(0)
    unit = len(pieces.filler)
    for depth in (0.0, 0.5, 1.0):
        ex = hs.passkey_example(text_tokenizer, length, depth, rng, pieces)
        assert len(ex.prompt) == length
        start = ex.meta["needle_start"]
        assert abs(ex.meta["actual_depth"] - depth) <= unit / (length - 100)
        needle_text = text_tokenizer.decode(ex.prompt[start:start + 40])
        assert needle_text.startswith("\nThe pass key is " + ex.meta["key"])
        assert text_tokenizer.decode(ex.answer).strip() == ex.meta["key"]
        assert text_tokenizer.decode(ex.prompt).endswith("What is the pass key? The pass key is")
    with pytest.raises(ValueError, match="cannot hold"):
        hs.passkey_example(text_tokenizer, 40, 0.5, rng, pieces)


def test_niah_subtasks(text_tokenizer):
    pieces = hs.make_pieces(text_tokenizer)
    rng = np.random.default_rng(1)
    for sub in hs.NIAH_SUBTASKS:
        ex = hs.niah_example(text_tokenizer, sub, 500, rng, pieces=pieces)
        assert len(ex.prompt) == 500
        text = text_tokenizer.decode(ex.prompt)
        assert all(e in text for e in ex.expected)
        assert sorted({g for g in ex.groups if g >= 0}) == list(range(len(ex.expected)))
        n_needles = text.count("One of the special magic numbers for") if sub != "vt" else text.count("\nVAR ")
        assert n_needles == {"single": 1, "multikey": 4, "multivalue": 4, "vt": 5}[sub]
    with pytest.raises(ValueError, match="text tokenizer"):
        hs.make_pieces(SyntheticTokenizer(100))


# ------------------------------------------------------------------------------------------ scorers
def test_mqar_scores_perfect_chance_and_wrong():
    params = {"vocab": "64", "num_pairs": "8", "seq_len": "64", "num_examples": "40"}

    def acc(model):
        (r,) = run_tasks(EvalContext(model=model, vocab=64), [("mqar", dict(params))])
        return r.result

    assert acc(lambda ids: recall_first(ids, 64))["accuracy"] == 1.0
    g = torch.Generator().manual_seed(0)

    def guess(ids):  # uniform guess among the values in the context
        out = torch.zeros(*ids.shape, 64)
        vals = ids[:, 1:16:2]
        pick = vals.gather(1, torch.randint(0, 8, ids.shape, generator=g))
        return out.scatter(-1, pick[..., None], 1.0)

    r = acc(guess)
    assert abs(r["accuracy"] - r["chance_in_context"]) < 0.06
    assert acc(lambda ids: torch.zeros(*ids.shape, 64))["accuracy"] == 0.0  # argmax 0 is never a value


def test_text_recall_scores(text_tokenizer):
    V = text_tokenizer.vocab_size
    ctx = lambda model: EvalContext(model=model, tokenizer=text_tokenizer, vocab=V)
    pk = {"lengths": "200,260", "depths": "0,0.5,1", "trials": "2"}
    niah = {"lengths": "420", "trials": "2"}
    for model, expect in [(lambda ids: oracle(ids, V), 1.0), (lambda ids: copy_model(ids, V), 1.0)]:
        (r,) = run_tasks(ctx(model), [("passkey", dict(pk))])
        assert r.result["accuracy"] == expect
    (r,) = run_tasks(ctx(lambda ids: oracle(ids, V)), [("niah", dict(niah))])
    assert r.result["accuracy"] == 1.0
    (r,) = run_tasks(ctx(lambda ids: copy_model(ids, V)), [("niah", {**niah, "subtasks": "single,multikey"})])
    assert r.result["accuracy"] == 1.0
    g = torch.Generator().manual_seed(0)
    noise = lambda ids: torch.randn(*ids.shape, V, generator=g)
    for r in run_tasks(ctx(noise), [("passkey", dict(pk)), ("niah", dict(niah))]):
        assert r.result["accuracy"] == 0.0  # chance: 1e-5 for a 5-digit key, less for 7-digit values


# ------------------------------------------------------------------------------------------ CLIs on tiny runs
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, small_corpus):
    """A 2-step text run and a 2-step synthetic MQAR run (with train.eval_tasks), trained here."""
    from lctrain.config import load_config
    from lctrain.train.trainer import Trainer

    root = tmp_path_factory.mktemp("runs")
    text = root / "text"
    Trainer(load_config(tiny_overrides(text, small_corpus, root / "cache", **{"train.max_steps": 2}))).fit()
    mqar = root / "mqar"
    Trainer(load_config(tiny_overrides(mqar, small_corpus, root / "cache", **{
        "train.max_steps": 2, "train.eval_every": 1, "model.vocab_size": 128,
        "data.path": "'synthetic:mqar?vocab=128&num_pairs=4&num_val=16'",
        "train.eval_tasks": "[mqar?num_examples=8,perplexity]"}))).fit()
    return text, mqar


def test_training_hook_logs_eval_tasks(tiny_runs):
    _, mqar = tiny_runs
    lines = [json.loads(x) for x in (mqar / "eval" / "history.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    assert all({"mqar/accuracy", "perplexity/loss", "perplexity/ppl"} <= set(x) for x in lines)
    assert json.loads((mqar / "eval" / "step_00000002" / "mqar.json").read_text())["spec"]["num_pairs"] == 4


def test_eval_cli_writes_json_and_png(tiny_runs, tmp_path, capsys):
    from lctrain.eval.cli import eval_main

    text, mqar = tiny_runs
    out = tmp_path / "ev"
    rc = eval_main([f"run={text}", "task=perplexity,passkey,niah,mqar", f"out={out}", "max_tokens=2048",
                    "trials=1", "passkey.lengths=256", "passkey.depths=0,1", "niah.lengths=512",
                    "niah.subtasks=single,vt", "mqar.num_examples=8", "mqar.seq_len=64"])
    assert rc == 0, capsys.readouterr().err
    for name, key in [("perplexity", "ppl"), ("passkey", "accuracy"), ("niah", "accuracy"), ("mqar", "accuracy")]:
        result = json.loads((out / f"{name}.json").read_text())
        assert isinstance(result[key], float) and result["meta"]["step"] == 2
        assert (out / f"{name}.png").stat().st_size > 1000
    ppl = json.loads((out / "perplexity.json").read_text())
    assert ppl["loss"] > 0 and ppl["by_position"][0]["start"] == 0 and ppl["per_document"]
    assert eval_main([f"run={mqar}", "task=mqar,perplexity", "num_examples=8"]) == 0
    assert json.loads((mqar / "eval" / "mqar.json").read_text())["spec"]["vocab"] == 128
    capsys.readouterr()
    assert eval_main([f"run={text}", "task=passkey", "colour=red"]) == 2
    assert "no task among passkey has a parameter 'colour'" in capsys.readouterr().err
    assert eval_main([f"run={text}", "task=nope"]) == 2


def test_generate_cli(tiny_runs, capsys):
    from lctrain.eval.cli import generate_main

    text, mqar = tiny_runs
    assert generate_main([f"run={text}", "prompt=To be, or not", "max_new_tokens=5", "seed=1"]) == 0
    assert capsys.readouterr().out.startswith("To be, or not")
    assert generate_main([f"run={mqar}", "prompt=5 70 9", "max_new_tokens=3", "temperature=0"]) == 0
    words = capsys.readouterr().out.split()
    assert words[:3] == ["5", "70", "9"] and len(words) == 6
    assert generate_main([f"run={mqar}", "prompt=hello"]) == 2


def test_unknown_eval_task_stops_training(tmp_path, small_corpus):
    from lctrain.config import load_config
    from lctrain.train.trainer import Trainer

    args = tiny_overrides(tmp_path / "r", small_corpus, tmp_path / "cache",
                          **{"train.max_steps": 1, "train.eval_tasks": "[nope]"})
    with pytest.raises(ConfigError, match="unknown eval task"):
        Trainer(load_config(args)).fit()
