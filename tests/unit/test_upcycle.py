"""BAM / BTX upcycling (lctrain.upcycle), the document filter and the parallel block.

* Identical seeds: the upcycled model (BTX, BAM full experts, BAM shared K/V; sequential and
  parallel blocks) computes the seed's logits (fp32).
* Three different seeds: shapes of the mixed state dict; every averaged tensor equals the mean of
  the seeds' (computed here from the seed state dicts); FFN expert e is seed e's FFN; attention
  expert e is seed e's attention (read back with MoAttention.expert_weights); shared K/V is the
  seeds' mean; new routers are random (the same FFN routers for every variant) or zeros.
* Shared expert from the parent; ``model.parallel_block`` off = the old block, on = the formula.
* ``data.filter``: syntax, selection, messages; stratified splits (the union run holds out what
  the per-domain runs hold out).
* Bad input: seeds of different architectures, a missing checkpoint (exit 2, no traceback), a
  filter selecting no document, overlapping domains.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lctrain.config import load_config
from lctrain.data import build_data
from lctrain.data.corpus import FilterClause, load_documents, parse_filter
from lctrain.errors import ConfigError
from lctrain.models import HybridLM
from lctrain.upcycle.mix import architecture_differences, mix_state_dicts, upcycled_model_config
from lctrain.upcycle.pipeline import upcycle_main

REPO = Path(__file__).resolve().parents[2]
BUILTIN = REPO / "lctrain" / "data" / "builtin" / "pd_english.jsonl.gz"
DOMAINS = {"shakespeare": "author=William Shakespeare", "milton": "author=John Milton", "bible": "author~King James"}
TINY_MODEL = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=4", "model.attn.num_heads=2",
              "model.attn.num_kv_heads=1", "model.attn.head_dim=32", "model.gdn.num_heads=2", "model.gdn.head_dim=32",
              "model.kernels=torch"]


def write_domain_corpus(path: Path) -> Path:
    """11 documents of the built-in corpus with their metadata (4 Shakespeare, 3 Milton, 4 Bible), 6-10.5 K chars."""
    with gzip.open(BUILTIN, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    out = []
    for author, n in (("William Shakespeare", 4), ("John Milton", 3), ("King James Version (1611)", 4)):
        docs = [r for r in rows if r["author"] == author and len(r["text"]) > 20000][:n]
        out += [{"title": d["title"], "author": d["author"], "text": d["text"][2000: 8000 + 1500 * i]}
                for i, d in enumerate(docs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def domain_corpus(tmp_path_factory) -> Path:
    return write_domain_corpus(tmp_path_factory.mktemp("bam_corpus") / "domains.jsonl")


def dense_cfg(*extra: str):
    return load_config(["recipe=hybrid_gdn_3to1", *TINY_MODEL, *extra]).model


def seed_model(cfg, seed: int) -> HybridLM:
    torch.manual_seed(seed)
    m = HybridLM(cfg)
    with torch.no_grad():  # non-trivial norms, decays and gates, so averaging is visible everywhere
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


IDS = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(7))
CU = torch.tensor([0, 30, 96], dtype=torch.int32)  # a packed batch: two documents in one row


@pytest.mark.parametrize("parallel_block", [False, True])
@pytest.mark.parametrize("variant", ["btx", "full", "shared_kv"])
def test_identical_seeds_reproduce_the_seed(variant, parallel_block):
    cfg = dense_cfg(f"model.parallel_block={parallel_block}")
    seed = seed_model(cfg, 0)
    sd = seed.state_dict()
    moe_cfg = upcycled_model_config(cfg, 3, variant)
    up = HybridLM(moe_cfg).eval()
    up.load_state_dict(mix_state_dicts([sd, sd, sd], moe_cfg))
    with torch.no_grad():
        torch.testing.assert_close(up(IDS), seed(IDS), rtol=0, atol=2e-5)
        ids = IDS.reshape(1, -1)
        torch.testing.assert_close(up(ids, cu_seqlens=CU), seed(ids, cu_seqlens=CU), rtol=0, atol=2e-5)
    assert moe_cfg.layer_pattern == ("GGGA" if variant == "btx" else "GGGE")
    if variant != "btx":  # random attention routers: the output is the seed's whatever the gate
        assert up.layers[3].mixer.router.weight.abs().sum() > 0


@pytest.fixture(scope="module")
def three_seeds():
    cfg = dense_cfg()
    return cfg, [seed_model(cfg, s).state_dict() for s in (1, 2, 3)]


@pytest.mark.parametrize("variant", ["btx", "full", "shared_kv"])
def test_mixed_state_dict_layout(three_seeds, variant):
    cfg, seeds = three_seeds
    N, D, F = 3, cfg.d_model, 192
    a = cfg.attn
    hq, hkv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    moe_cfg = upcycled_model_config(cfg, N, variant)
    mixed = mix_state_dicts(seeds, moe_cfg, router_seed=5)
    model = HybridLM(moe_cfg)
    assert {k: tuple(v.shape) for k, v in mixed.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(mixed)

    def mean(key):
        return torch.stack([s[key] for s in seeds]).mean(0)

    routed = set()
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        assert mixed[p + "ffn.experts.gate_up_proj"].shape == (N, D, 2 * F)
        assert mixed[p + "ffn.experts.down_proj"].shape == (N, F, D)
        for e, s in enumerate(seeds):  # FFN expert e == seed e's FFN
            gate_up = mixed[p + "ffn.experts.gate_up_proj"][e]
            assert torch.equal(gate_up[:, :F], s[p + "ffn.gate_proj.weight"].t())
            assert torch.equal(gate_up[:, F:], s[p + "ffn.up_proj.weight"].t())
            assert torch.equal(mixed[p + "ffn.experts.down_proj"][e], s[p + "ffn.down_proj.weight"].t())
        router = mixed[p + "ffn.router.weight"]
        assert router.shape == (N, D) and 0.01 < float(router.std()) < 0.03  # N(0, init_std = 0.02)
        assert torch.equal(mixed[p + "ffn.expert_bias"], torch.zeros(N))
        routed |= {k for k in mixed if k.startswith(p + "ffn.")}
        if i == 3 and variant != "btx":  # attention experts
            moa = model.layers[3].mixer
            assert mixed[p + "mixer.q_proj.weight"].shape == (N * hq, D)
            assert mixed[p + "mixer.o_proj.weight"].shape == (D, N * hq)
            kv_rows = hkv if variant == "shared_kv" else N * hkv
            assert mixed[p + "mixer.k_proj.weight"].shape == (kv_rows, D)
            for e, s in enumerate(seeds):
                got = moa.expert_weights(e)
                for proj in ("q_proj", "g_proj", "o_proj"):
                    assert torch.equal(got[f"{proj}.weight"], s[p + f"mixer.{proj}.weight"])
                for proj in ("k_proj", "v_proj"):
                    want = mean(p + f"mixer.{proj}.weight") if variant == "shared_kv" else s[p + f"mixer.{proj}.weight"]
                    torch.testing.assert_close(got[f"{proj}.weight"], want, rtol=0, atol=1e-6)
            assert mixed[p + "mixer.router.weight"].shape == (N, D)
            routed |= {k for k in mixed if k.startswith(p + "mixer.")}
    for key, value in mixed.items():  # everything else: the seeds' mean (BTX: attention too)
        if key not in routed:
            torch.testing.assert_close(value, mean(key), rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    # the FFN routers are the same draw for every variant; zeros on request
    other = mix_state_dicts(seeds, upcycled_model_config(cfg, N, "btx"), router_seed=5)
    assert torch.equal(other["layers.0.ffn.router.weight"], mixed["layers.0.ffn.router.weight"])
    zeros = mix_state_dicts(seeds, moe_cfg, router_init="zeros")
    assert not zeros["layers.0.ffn.router.weight"].any()


def test_shared_expert_from_parent_keeps_the_function():
    cfg = dense_cfg()
    parent = seed_model(cfg, 4)
    sd = parent.state_dict()
    moe_cfg = upcycled_model_config(cfg, 2, "full", shared_expert=True)
    assert moe_cfg.moe.num_shared_experts == 1
    mixed = mix_state_dicts([sd, sd], moe_cfg, parent=sd)
    assert torch.equal(mixed["layers.1.ffn.shared_experts.up_proj.weight"], sd["layers.1.ffn.up_proj.weight"])
    assert torch.equal(mixed["layers.1.ffn.shared_experts.down_proj.weight"], 0.5 * sd["layers.1.ffn.down_proj.weight"])
    up = HybridLM(moe_cfg).eval()
    up.load_state_dict(mixed)
    with torch.no_grad():
        torch.testing.assert_close(up(IDS), parent(IDS), rtol=0, atol=2e-5)
    with pytest.raises(ConfigError, match="shared expert from the parent"):
        mix_state_dicts([sd, sd], moe_cfg)


def test_parallel_block_off_is_unchanged_and_on_is_the_formula():
    torch.manual_seed(0)
    for flag in (False, True):
        block = HybridLM(dense_cfg(f"model.parallel_block={flag}")).layers[3].eval()
        x = torch.randn(2, 16, 64)
        pos = torch.arange(16).expand(2, 16)
        with torch.no_grad():
            a = x + block.mixer(block.mixer_norm(x), pos, None)
            want = x + block.mixer(block.mixer_norm(x), pos, None) + block.ffn(block.ffn_norm(x)) if flag \
                else a + block.ffn(block.ffn_norm(a))
            torch.testing.assert_close(block(x, pos, None), want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ filter


def test_filter_syntax_and_selection(domain_corpus, tmp_path):
    assert parse_filter(" author = John Milton ; title!~Poemata | title~x=y ") == [
        [FilterClause("author", "=", "John Milton"), FilterClause("title", "!~", "Poemata")],
        [FilterClause("title", "~", "x=y")],
    ]
    for bad in ("author", "=x", "a=b;;c=d", "a=b|"):
        with pytest.raises(ConfigError, match="no FIELD before an operator"):
            parse_filter(bad)
    c = tmp_path / "cache"
    assert len(load_documents(str(domain_corpus), cache_dir=c, doc_filter="author=William Shakespeare")) == 4
    assert len(load_documents(str(domain_corpus), cache_dir=c, doc_filter="author~KING JAMES")) == 4
    assert len(load_documents(str(domain_corpus), cache_dir=c, doc_filter="author!~king;author!=John Milton")) == 4
    both = "author=John Milton|author~"  # the second alternative matches all; documents go to their first match
    assert len(load_documents(str(domain_corpus), cache_dir=c, doc_filter=both, filter_alternative=0)) == 3
    assert len(load_documents(str(domain_corpus), cache_dir=c, doc_filter=both, filter_alternative=1)) == 8
    with pytest.raises(ConfigError) as info:
        load_documents(str(domain_corpus), cache_dir=c, doc_filter="author=Shakspeare")
    msg = str(info.value)
    assert "selects no" in msg and "'author=Shakspeare'" in msg and "'William Shakespeare' (4)" in msg
    with pytest.raises(ConfigError, match="field.s. auth, which .* columns found: title, author, text"):
        load_documents(str(domain_corpus), cache_dir=c, doc_filter="auth=x")


def test_union_filter_holds_out_what_each_domain_holds_out(domain_corpus, tmp_path):
    cfg = load_config(["recipe=hybrid_gdn_3to1", *TINY_MODEL, f"data.path={domain_corpus}", "data.val_fraction=0.3",
                       "data.seq_len=64"])
    d, cache = cfg.data, tmp_path / "cache"
    d.filter = "|".join(DOMAINS.values())
    tok_all, train_all, val_all = build_data(d, 64, 512, cache)
    d.tokenizer = str(tok_all.path)
    per = [build_data(d, 64, 512, cache) for d.filter in DOMAINS.values()]
    assert sum(p[1].num_tokens for p in per) == train_all.num_tokens
    assert sum(p[2].num_tokens for p in per) == val_all.num_tokens
    assert all(len(p[2]) > 0 for p in per)


# ------------------------------------------------------------------------------------------------ bad input


def _bam_args(out: Path, corpus: Path, *extra: str) -> list[str]:
    branches = ", ".join(f'{{name: {n}, filter: "{f}"}}' for n, f in DOMAINS.items())
    return ["recipe=bam_hybrid_gdn_3to1", *TINY_MODEL, f"data.path={corpus}", "data.seq_len=64",
            "data.val_fraction=0.3", f"data.cache_dir={out.parent / 'cache'}", f"train.out_dir={out}",
            f"upcycle.branches=[{branches}]", *extra]


def _fake_checkpoint(path: Path, model_overrides: list[str]) -> Path:
    """A directory the checkpoint reader accepts (COMPLETE marker + trainer_state.json with a config)."""
    import dataclasses

    path.mkdir(parents=True)
    (path / "COMPLETE").write_text("{}")
    (path / "trainer_state.json").write_text(json.dumps(
        {"config": {"model": dataclasses.asdict(dense_cfg(*model_overrides))}, "train_state": {"step": 5, "tokens": 1}}))
    return path


def test_bad_input_is_a_clear_config_error(domain_corpus, tmp_path, capsys):
    # a domain filter that selects nothing
    args = _bam_args(tmp_path / "a", domain_corpus)
    args[-1] = args[-1].replace("author=John Milton", "author=John Miltonn")
    assert upcycle_main(args) == 2
    err = capsys.readouterr().err
    assert "upcycle.branches.1.filter (milton)" in err and "'author=John Miltonn'" in err and "John Milton' (3)" in err
    # overlapping domains
    args = _bam_args(tmp_path / "b", domain_corpus)
    args[-1] = args[-1].replace("author~King James", "author~i")
    assert upcycle_main(args) == 2
    assert "filters overlap" in capsys.readouterr().err
    # seeds with different architectures
    ok = _fake_checkpoint(tmp_path / "ck" / "s0" / "step_00000005", [])
    wide = _fake_checkpoint(tmp_path / "ck" / "s1" / "step_00000005", ["model.d_model=96"])
    branches = (f'[{{name: s0, filter: "author=William Shakespeare", checkpoint: "{ok}"}}, '
                f'{{name: s1, filter: "author=John Milton", checkpoint: "{wide}"}}]')
    assert upcycle_main([*_bam_args(tmp_path / "c", domain_corpus)[:-1], f"upcycle.branches={branches}"]) == 2
    err = capsys.readouterr().err
    assert "different architectures" in err and "seed 's1'" in err and "model.d_model (64 vs 96)" in err
    assert architecture_differences(dense_cfg(), dense_cfg("model.kernels=auto")) == []
    # a later stage without the earlier one's checkpoints
    assert upcycle_main(_bam_args(tmp_path / "d", domain_corpus, "upcycle.stage=mix")) == 2
    err = capsys.readouterr().err
    assert "seed 'shakespeare': missing checkpoint" in err and "upcycle.stage=branch" in err


def test_missing_parent_checkpoint_exits_2_without_traceback(domain_corpus, tmp_path):
    args = _bam_args(tmp_path / "run", domain_corpus, f"upcycle.parent={tmp_path / 'nope'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "upcycle.py"), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"upcycle.parent: checkpoint {tmp_path / 'nope'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
