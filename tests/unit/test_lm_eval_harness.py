"""EleutherAI's lm-evaluation-harness on a model exported by ``launch/export.py``, against lctrain's own scoring.

A 3-step Qwen3-Next-shaped run is exported to a transformers directory; the harness (its Python
API, ``model="hf"``, the HF ``Qwen3NextForCausalLM`` on CPU in fp32) evaluates it on a
``loglikelihood`` task defined by a local YAML over a local JSONL of (context, continuation)
pairs cut from the built-in corpus, with the Hugging Face hub and datasets offline. Each
example's log-likelihood the harness logs (``samples[...]["resps"]``) must agree within 1e-4 nats
with :func:`lctrain.eval.scoring.continuation_loglikelihoods` on lctrain's own model from the
same checkpoint, and the harness's perplexity metric must be the one those log-likelihoods give.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

from lctrain.config import load_config  # noqa: E402
from lctrain.eval.run import load_run  # noqa: E402
from lctrain.eval.scoring import continuation_loglikelihoods, split_continuation  # noqa: E402
from lctrain.train.trainer import train  # noqa: E402
from tests.conftest import BUILTIN, REPO  # noqa: E402

TASK_YAML = """\
task: lctrain_continuations
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def continuation_pairs(n: int = 8, skip_docs: int = 50) -> list[dict]:
    """``n`` (context, continuation) pairs from the built-in corpus: a few sentences, then the next one.

    Documents from ``skip_docs`` on (the tests' small corpus uses the first 40).
    """
    pairs = []
    with gzip.open(BUILTIN, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < skip_docs:
                continue
            text = " ".join(json.loads(line)["text"].split())
            sentences = [s for s in re.split(r"(?<=[.!?])\s+", text[2000:6000]) if 20 <= len(s) <= 120]
            if len(sentences) < 4:
                continue
            pairs.append({"context": " ".join(sentences[:3]), "continuation": " " + sentences[3]})
            if len(pairs) == n:
                break
    return pairs


@pytest.fixture(scope="module")
def exported(small_corpus, tmp_path_factory):
    """A 3-step qwen3_next run and its ``launch/export.py`` directory."""
    tmp = tmp_path_factory.mktemp("lmeval")
    run, hf_dir = tmp / "run", tmp / "hf"
    shapes = {"model.vocab_size": 512, "model.d_model": 32, "model.attn.num_heads": 2, "model.attn.num_kv_heads": 1,
              "model.attn.head_dim": 16, "model.gdn.num_heads": 2, "model.gdn.head_dim": 8,
              "model.gdn.num_value_heads": 4, "model.moe.num_experts": 4, "model.moe.ffn_hidden_size": 16,
              "model.kernels": "torch", "data.path": small_corpus, "data.cache_dir": tmp / "cache",
              "data.seq_len": 64, "train.out_dir": run, "train.max_steps": 3, "train.global_batch_size": 4,
              "train.micro_batch_size": 2, "train.eval_every": 0, "train.eval_batches": 1,
              "train.progress": False, "train.tensorboard": False, "train.curves": False, "optim.lr": 3e-3,
              "optim.warmup_steps": 1}
    train(load_config(["recipe=qwen3_next", *(f"{k}={v}" for k, v in shapes.items())]))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), f"run={run}", f"out={hf_dir}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, hf_dir


def test_lm_eval_scores_an_exported_model_like_lctrain(exported, tmp_path, monkeypatch):
    run, hf_dir = exported
    # no downloads: the task, its data, the model and the tokenizer are all local
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))

    pairs = continuation_pairs()
    data = tmp_path / "continuations.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lctrain_continuations.yaml").write_text(TASK_YAML.format(data=data))

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"},
        tasks=["lctrain_continuations"], task_manager=TaskManager(include_path=str(tasks)), batch_size=4,
        log_samples=True, bootstrap_iters=0, random_seed=0,
    )
    samples = sorted(results["samples"]["lctrain_continuations"], key=lambda s: s["doc_id"])
    assert len(samples) == len(pairs)
    harness = [float(s["resps"][0][0][0]) for s in samples]
    assert [s["doc"] for s in samples] == pairs

    loaded = load_run(run, device="cpu")
    assert loaded.step == 3
    ours = continuation_loglikelihoods(loaded.model, loaded.tokenizer,
                                       [(p["context"], p["continuation"]) for p in pairs])
    for h, (ll, _) in zip(harness, ours, strict=True):
        assert abs(h - ll) <= 1e-4, (harness, ours)
    assert all(ll < 0 for ll, _ in ours) and len({round(ll, 3) for ll, _ in ours}) == len(pairs)
    # the harness's perplexity metric: exp(-mean log-likelihood per example)
    ppl = results["results"]["lctrain_continuations"]["perplexity,none"]
    assert ppl == pytest.approx(math.exp(-sum(ll for ll, _ in ours) / len(ours)), rel=1e-5)


def test_split_continuation_moves_trailing_spaces_and_splits_the_whole_encoding():
    class Chars:  # one token per character: the split is exact
        def encode(self, text):
            return [ord(c) for c in text]

    ctx, cont = split_continuation(Chars(), "To be, or not ", "to be")
    assert ctx == [ord(c) for c in "To be, or not"] and cont == [ord(c) for c in " to be"]
    with pytest.raises(ValueError):
        split_continuation(Chars(), "", "x")
