"""Hugging Face export / import in the Qwen3-Next format (lctrain.export), against transformers itself.

The reference is transformers' own ``Qwen3NextForCausalLM`` (its pure-torch Gated DeltaNet path on
CPU), loaded with ``from_pretrained`` from what lctrain wrote, or random-initialised and written by
its ``save_pretrained``. Everything is fp32 and tiny (d_model 32-48, 4 layers), unpacked batches
(one document per row: transformers ignores packing).

* Layer options (qk_norm, partial RoPE, grouped GDN value heads with their own value dim, the
  gated shared expert) decode like the full forward and validate with messages.
* Export: ``from_pretrained`` gives the same logits (max abs error / max abs logit <= 1e-4) and
  loss, for an untied model with a dense block and sharded weights and for a tied one with
  ``every_2`` MoE blocks; greedy decoding gives the same 16 tokens; bf16 export casts.
* Round trip export -> import is bit-identical; a transformers random init imports with the same
  logits; the tokenizer loads with ``AutoTokenizer`` and encodes like lctrain's.
* The launchers: a run exported, imported into a new run that the trainer resumes from.
* Every inexpressible option is refused with a message naming the block and the key.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, Qwen3NextConfig, Qwen3NextForCausalLM

from lctrain.config import ModelConfig, load_config
from lctrain.errors import ConfigError
from lctrain.export.qwen3_next import (
    check_exportable,
    hf_config,
    load_pretrained,
    model_config_from_hf,
    read_hf_state_dict,
    save_pretrained,
    to_hf_state_dict,
)
from lctrain.generate import decode_consistency, generate
from lctrain.models import HybridLM
from tests.conftest import BUILTIN, set_dotted

TOL = 1e-4  # max |logit difference| / max |logit|, fp32


def qwen_cfg(**over) -> ModelConfig:
    """A tiny lctrain model with every Qwen3-Next option (torch kernels, fp32)."""
    m = ModelConfig(vocab_size=128, d_model=32, n_layers=4, layer_pattern="GGGA", tie_embeddings=False,
                    kernels="torch")
    m.attn.num_heads, m.attn.num_kv_heads, m.attn.head_dim = 4, 2, 16
    m.attn.qk_norm, m.attn.partial_rotary_factor, m.attn.rope_theta = True, 0.25, 1e6
    m.gdn.num_heads, m.gdn.head_dim, m.gdn.num_value_heads, m.gdn.value_head_dim = 2, 8, 4, 12
    m.gdn.chunk_size, m.gdn.conv_size = 16, 4
    m.moe.num_experts, m.moe.top_k, m.moe.num_shared_experts, m.moe.shared_expert_gate = 4, 2, 1, True
    m.moe.ffn_hidden_size, m.moe.shared_expert_hidden_size = 16, 24
    m.moe.layers = "0,1,3"  # block 2 keeps a dense SwiGLU (mlp_only_layers=[2])
    m.ffn_hidden_size = 40
    for key, value in over.items():
        set_dotted(m, key, value)
    return m


def make_model(m: ModelConfig, seed: int = 0) -> HybridLM:
    """Random model whose norm scales are not all 1 (U(0.5, 1.5)), so the w - 1 mapping is exercised."""
    torch.manual_seed(seed)
    model = HybridLM(m).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_load(path) -> Qwen3NextForCausalLM:
    return Qwen3NextForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------ layer options
def test_defaults_keep_the_layers_as_before():
    m = ModelConfig(vocab_size=64, d_model=32, n_layers=4, kernels="torch", layer_pattern="GGGA")
    m.attn.num_heads, m.attn.num_kv_heads, m.attn.head_dim = 2, 1, 16
    m.gdn.num_heads, m.gdn.head_dim = 2, 16
    m.moe.num_experts, m.moe.num_shared_experts = 2, 1
    model = HybridLM(m)
    keys = set(model.state_dict())
    assert not any("q_norm" in k or "k_norm" in k or "shared_expert_gate" in k for k in keys)
    attn, gdn = model.layers[3].mixer, model.layers[0].mixer
    assert attn.rope.rotary_dim == 16 and attn.q_norm is None
    assert gdn.num_value_heads == 2 and gdn.A_log.shape == (2,) and gdn.v_proj.weight.shape == (32, 32)
    assert model.layers[0].ffn.shared_expert_gate is None


def test_new_options_decode_like_the_full_forward():
    model = make_model(qwen_cfg())
    x = torch.randint(0, 128, (2, 21))
    assert decode_consistency(model, x, prefill_len=0, chunk=1) < 1e-5
    assert decode_consistency(model, x, prefill_len=9, chunk=4) < 1e-5


def test_flops_count_the_value_heads():
    from lctrain.layers.gated_deltanet import gated_deltanet_flops_per_token

    g = qwen_cfg().gdn
    assert gated_deltanet_flops_per_token(g, 64) == 18.0 * 4 * 8 * 12


@pytest.mark.parametrize("key,value,needle", [
    ("attn.partial_rotary_factor", 0.1, "model.attn.partial_rotary_factor=0.1"),
    ("attn.partial_rotary_factor", 1.5, "must be in (0, 1]"),
    ("gdn.num_value_heads", 3, "model.gdn.num_value_heads=3: must be 0 (= num_heads) or a multiple"),
    ("gdn.expand_v", 2.0, "set the value dim one way only"),
    ("moe.num_shared_experts", 0, "model.moe.shared_expert_gate=True: needs a shared expert"),
])
def test_new_options_validate_with_messages(key, value, needle):
    m = qwen_cfg(**{key: value})
    with pytest.raises(ConfigError) as err:
        (m.attn.validate() if key.startswith("attn") else m.gdn.validate() if key.startswith("gdn")
         else m.moe.validate(m.n_layers))
    assert needle in str(err.value)


# ------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("case", ["untied-dense-block-sharded", "tied-every2", "no-moe"])
def test_export_loads_in_transformers_with_the_same_logits_and_loss(case, tmp_path):
    if case == "tied-every2":
        m = qwen_cfg(tie_embeddings=True, **{"moe.layers": "every_2", "gdn.num_value_heads": 0,
                                             "gdn.value_head_dim": 0, "attn.partial_rotary_factor": 0.5})
    elif case == "no-moe":
        m = qwen_cfg(**{"moe.num_experts": 0, "layer_pattern": "GA", "attn.partial_rotary_factor": 1.0})
    else:
        m = qwen_cfg()
    model = make_model(m)
    files = save_pretrained(tmp_path, m, model.state_dict(),
                            max_shard_size="20KB" if case.endswith("sharded") else "5GB")
    cfg = json.loads((tmp_path / "config.json").read_text())
    if case.endswith("sharded"):
        assert "model.safetensors.index.json" in files and len(list(tmp_path.glob("model-*.safetensors"))) > 2
        assert cfg["mlp_only_layers"] == [2] and cfg["decoder_sparse_step"] == 1
        assert cfg["linear_num_value_heads"] == 4 and cfg["linear_value_head_dim"] == 12
    elif case == "no-moe":
        assert cfg["num_experts"] == 0 and not any(".experts." in k for k in read_hf_state_dict(tmp_path))
    else:
        assert cfg["decoder_sparse_step"] == 2 and cfg["mlp_only_layers"] == [] and cfg["tie_word_embeddings"]
        assert "lm_head.weight" not in read_hf_state_dict(tmp_path)
    hf = hf_load(tmp_path)
    kinds = {"G": "linear_attention", "A": "full_attention"}
    assert hf.config.layer_types == [kinds[k] for k in m.layer_pattern * (4 // len(m.layer_pattern))]
    torch.manual_seed(1)
    x = torch.randint(0, m.vocab_size, (2, 48))
    with torch.no_grad():
        ours = model(x)
        out = hf(x, labels=x)
    err = rel_err(ours, out.logits)
    print(f"[{case}] max relative logits error {err:.2e}")
    assert err <= TOL
    loss = F.cross_entropy(ours[:, :-1].reshape(-1, m.vocab_size), x[:, 1:].reshape(-1))
    assert abs(float(loss) - float(out.loss)) <= 1e-5 * float(out.loss)


def test_greedy_generation_gives_the_same_16_tokens(tmp_path):
    m = qwen_cfg(init_std=0.2)  # larger weights: peaked logits, no near-ties
    model = make_model(m)
    save_pretrained(tmp_path, m, model.state_dict())
    hf = hf_load(tmp_path)
    torch.manual_seed(2)
    prompt = torch.randint(0, m.vocab_size, (2, 7))
    ours = generate(model, prompt, max_new_tokens=16, temperature=0.0)
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=16,
                             min_new_tokens=16, pad_token_id=0)
    assert ours.shape == theirs.shape == (2, 7 + 16)
    assert torch.equal(ours, theirs), (ours, theirs)


def test_bf16_export_casts_every_tensor(tmp_path):
    m = qwen_cfg()
    model = make_model(m)
    save_pretrained(tmp_path, m, model.state_dict(), dtype=torch.bfloat16)
    ref = to_hf_state_dict(m, model.state_dict())
    got = read_hf_state_dict(tmp_path)
    assert set(got) == set(ref)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, ref[k].to(torch.bfloat16)) for k, t in got.items())
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------ import
def test_round_trip_is_bit_identical(tmp_path):
    m = qwen_cfg()
    model = make_model(m)
    sd = model.state_dict()
    save_pretrained(tmp_path, m, sd, max_shard_size="30KB")
    m2, sd2, tok, _ = load_pretrained(tmp_path)
    assert tok is None
    assert set(sd2) == set(sd)
    bad = [k for k in sd if not torch.equal(sd[k], sd2[k])]
    assert not bad, bad[:5]
    assert (m2.layer_pattern, m2.n_layers, m2.gdn.value_heads, m2.gdn.head_v_dim, m2.moe.layers) == (
        "GGGA", 4, 4, 12, "0,1,3")
    assert HybridLM(m2).load_state_dict(sd2, strict=True)


def _random_hf(layer_types, **over) -> Qwen3NextForCausalLM:
    c = Qwen3NextConfig(
        vocab_size=96, hidden_size=48, intermediate_size=72, num_hidden_layers=len(layer_types),
        layer_types=layer_types, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=8, linear_value_head_dim=16,
        linear_conv_kernel_dim=3, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=20,
        shared_expert_intermediate_size=28, rope_theta=5e5, partial_rotary_factor=0.5, **over)
    torch.manual_seed(3)
    hf = Qwen3NextForCausalLM(c).eval()
    with torch.no_grad():  # transformers' init leaves norms at 0 (scale 1) and dt_bias at 1: randomise them
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("dt_bias"):
                p.uniform_(-0.4, 0.4)
    return hf


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_random_init_imports_with_the_same_logits(tied, tmp_path):
    types = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    hf = _random_hf(types, mlp_only_layers=[1], tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path)
    m, sd, _, _ = load_pretrained(tmp_path)
    assert m.layer_pattern == "GAGG" and m.moe.layers == "0,2,3" and m.tie_embeddings == tied
    m.kernels, m.gdn.chunk_size = "torch", 8
    model = HybridLM(m).eval()
    model.load_state_dict(sd, strict=True)
    torch.manual_seed(4)
    x = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        err = rel_err(model(x), hf(x).logits)
    print(f"[tied={tied}] max relative logits error {err:.2e}")
    assert err <= TOL


def test_fused_expert_tensors_import_too(tmp_path):
    hf = _random_hf(["linear_attention", "full_attention"])
    hf.save_pretrained(tmp_path)
    m, sd, _, _ = load_pretrained(tmp_path)
    fused = {k: v for k, v in hf.state_dict().items()}  # transformers 5 in-memory: experts.gate_up_proj [E, 2F, D]
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    from lctrain.export.qwen3_next import from_hf_state_dict

    sd2 = from_hf_state_dict(m, fused)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


# ------------------------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> tuple[Path, list[str]]:
    from lctrain.data.tokenizer import train_tokenizer

    with gzip.open(BUILTIN, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"][:30000] for _, line in zip(range(8), f)]
    d = tmp_path_factory.mktemp("sp")
    train_tokenizer(docs, 512, model_prefix=d / "sp")
    return d / "sp.model", docs


def test_tokenizer_loads_with_autotokenizer_and_encodes_like_lctrain(sp_model, tmp_path):
    from lctrain.data.tokenizer import Tokenizer
    from lctrain.export.qwen3_next import write_tokenizer

    path, docs = sp_model
    tok = Tokenizer.from_file(path)
    write_tokenizer(tmp_path, path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [docs[5][:20000], "Tabs\tand  two  spaces, digits 20250917, ünïcödé 日本語 🎉\n\n end ", " x", ""]
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf(text)["input_ids"] == ids  # no BOS / EOS added, as lctrain encodes
        assert hf.decode(ids) == tok.decode(ids) == text
    assert (hf.eos_token_id, hf.bos_token_id, len(hf)) == (tok.eos_id, 1, tok.vocab_size)


# ------------------------------------------------------------------------------------ launchers
def test_launchers_export_a_run_and_import_it_into_one_the_trainer_resumes(sp_model, tmp_path, small_corpus):
    from lctrain.checkpoint import load_model_weights, resolve_checkpoint
    from lctrain.export.cli import export_main, import_main
    from lctrain.parallel.data_parallel import unwrap
    from lctrain.train.init_checkpoint import write_init_checkpoint
    from lctrain.train.trainer import Trainer

    sp_path, _ = sp_model
    cache = tmp_path / "cache"
    common = [f"data.path={small_corpus}", f"data.cache_dir={cache}", "data.seq_len=64", "train.progress=false",
              "train.tensorboard=false", "model.kernels=torch", "train.global_batch_size=2",
              "train.micro_batch_size=2"]
    shapes = ["model.vocab_size=512", "model.d_model=32", "model.attn.num_heads=2", "model.attn.num_kv_heads=1",
              "model.attn.head_dim=16", "model.gdn.num_heads=2", "model.gdn.head_dim=8",
              "model.gdn.num_value_heads=4", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=16"]
    run = tmp_path / "run"
    cfg = load_config(["recipe=qwen3_next", f"data.tokenizer={sp_path}", f"train.out_dir={run}", *shapes, *common])
    model = make_model(cfg.model)
    write_init_checkpoint(cfg, model.state_dict())
    from lctrain.config import to_yaml

    (run / "config.yaml").write_text(to_yaml(cfg))
    hf_dir = tmp_path / "hf"
    assert export_main([f"run={run}", f"out={hf_dir}", "max_shard_size=100KB"]) == 0
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "model.safetensors.index.json").is_file()
    hf = hf_load(hf_dir)
    assert json.loads((hf_dir / "config.json").read_text())["eos_token_id"] == 2
    x = torch.randint(0, 512, (1, 64))
    with torch.no_grad():
        assert rel_err(model(x), hf(x).logits) <= TOL
    assert AutoTokenizer.from_pretrained(str(hf_dir)).encode("To be, or not", add_special_tokens=False)

    back = tmp_path / "back"
    assert import_main([f"path={hf_dir}", f"out={back}", *common]) == 0
    ckpt = resolve_checkpoint(back, "import")
    assert ckpt.name == "step_00000000" and (back / "recipe.yaml").is_file() and (back / "tokenizer.model").is_file()
    cfg2 = load_config([f"recipe={back / 'recipe.yaml'}"])
    assert cfg2.scale == "" and cfg2.model.gdn.value_heads == 4 and cfg2.data.tokenizer == str(
        (back / "tokenizer.model").resolve())
    sd = model.state_dict()
    got = load_model_weights(ckpt, cfg2.model)
    assert all(torch.equal(sd[k], got[k]) for k in sd)
    trainer = Trainer(cfg2)  # train.resume=auto: resumes from the imported step-0 checkpoint
    try:
        assert trainer.state.step == 0
        resumed = unwrap(trainer.model).state_dict()
        assert all(torch.equal(sd[k], resumed[k]) for k in sd)
    finally:
        trainer.close()
    # importing again over the same run is refused
    assert import_main([f"path={hf_dir}", f"out={back}", *common]) == 2


def test_export_launcher_refuses_before_reading_weights(tmp_path, capsys):
    from lctrain.checkpoint import COMPLETE_MARKER, TRAINER_STATE
    from lctrain.config import RunConfig, to_yaml
    from lctrain.export.cli import export_main

    cfg = RunConfig()
    cfg.model.layer_pattern = "GGGL"
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / COMPLETE_MARKER).write_text("")
    (ckpt / TRAINER_STATE).write_text(json.dumps({"config": {"model": {"layer_pattern": "GGGL"}}}))
    (run / "config.yaml").write_text(to_yaml(cfg))
    assert export_main([f"run={run}", f"out={tmp_path / 'hf'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: block 3 is a 'L' layer (Lightning Attention")
    assert export_main([f"run={run}", f"out={tmp_path / 'hf'}", "dtype=fp16"]) == 2
    assert "dtype='fp16'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ refusals
REFUSALS = [
    ({"layer_pattern": "GGGL"}, "block 3 is a 'L' layer (Lightning Attention"),
    ({"layer_pattern": "GGGM"}, "block 3 is a 'M' layer (MoBA"),
    ({"layer_pattern": "GGGH"}, "block 3 is a 'H' layer (mixture-of-head attention"),
    ({"layer_pattern": "GGGE"}, "block 3 is a 'E' layer (mixture of attention experts"),
    ({"final_layers": "L"}, "model.final_layers='L'"),
    ({"lora_mixer.num_experts": 2, "lora_mixer.layers": "A"}, "model.lora_mixer.num_experts=2"),
    ({"parallel_block": True}, "model.parallel_block=true"),
    ({"attn.output_gate": False}, "block 3 (attention): model.attn.output_gate=false"),
    ({"attn.qk_norm": False}, "block 3 (attention): model.attn.qk_norm=false"),
    ({"moe.score_func": "sigmoid"}, "block 0 (MoE FFN): model.moe.score_func='sigmoid'"),
    ({"moe.bias_update_rate": 1e-3}, "block 0 (MoE FFN): model.moe.bias_update_rate=0.001"),
    ({"moe.capacity_factor": 1.25}, "block 0 (MoE FFN): model.moe.capacity_factor=1.25"),
    ({"moe.num_shared_experts": 0, "moe.shared_expert_gate": False, "moe.shared_expert_hidden_size": 0},
     "block 0 (MoE FFN): model.moe.num_shared_experts=0"),
    ({"moe.shared_expert_gate": False}, "block 0 (MoE FFN): model.moe.shared_expert_gate=false"),
]


@pytest.mark.parametrize("over,needle", REFUSALS, ids=[next(iter(o)) + "=" + str(next(iter(o.values())))
                                                       for o, _ in REFUSALS])
def test_inexpressible_models_are_refused_with_the_block_and_key(over, needle):
    m = qwen_cfg(**over)
    with pytest.raises(ConfigError) as err:
        check_exportable(m)
    assert needle in str(err.value)
    with pytest.raises(ConfigError):
        hf_config(m)


@pytest.mark.parametrize("over,needle", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type='yarn'"),
    ({"layer_types": ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]},
     "unknown kinds ['sliding_attention']"),
    ({"linear_num_value_heads": 3}, "num_value_heads=3"),
    ({"model_type": "qwen3_moe"}, "model_type='qwen3_moe'"),
])
def test_inexpressible_hf_configs_are_refused(over, needle):
    hf = hf_config(qwen_cfg())
    hf.update(over)
    with pytest.raises(ConfigError) as err:
        model_config_from_hf(hf)
    assert needle in str(err.value)


def test_recipe_is_exportable_at_cpu_scale():
    cfg = load_config(["recipe=qwen3_next"])
    check_exportable(cfg.model)
    h = hf_config(cfg.model)
    assert h["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert (h["linear_num_value_heads"], h["linear_num_key_heads"], h["partial_rotary_factor"]) == (8, 4, 0.25)
    assert not h["tie_word_embeddings"] and h["num_experts"] == 8 and h["mlp_only_layers"] == []


if os.environ.get("LCTRAIN_HF_EXPORT_DEBUG"):  # pragma: no cover - handy when a layout changes
    print(transformers.__version__)
