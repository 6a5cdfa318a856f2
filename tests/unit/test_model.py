"""HybridLM: construction, init, packed vs per-document runs, gradients, activation checkpointing.

Tolerances (fp32, relative RMS): packed vs per-document logits and grads ``1e-5``; activation
checkpointing recomputes the same ops so loss and grads must agree to ``1e-6``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lctrain.config import ModelConfig
from lctrain.layers import Attention, GatedDeltaNet
from lctrain.layers.attention import AttentionConfig
from lctrain.layers.gated_deltanet import GatedDeltaNetConfig
from lctrain.layers.lightning import LightningConfig
from lctrain.models import HybridLM, expand_layer_pattern
from lctrain.parallel import apply_activation_checkpointing


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def tiny_cfg(**kw) -> ModelConfig:
    base = {
        "vocab_size": 128,
        "d_model": 64,
        "n_layers": 4,
        "layer_pattern": "GGGA",
        "attn": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16),
        "gdn": GatedDeltaNetConfig(num_heads=2, head_dim=16, conv_size=4),
        "lightning": LightningConfig(num_heads=4, head_dim=16),
        "init_std": 0.02,
    }
    base.update(kw)
    return ModelConfig(**base)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_pattern_is_tiled_to_n_layers():
    model = HybridLM(tiny_cfg(n_layers=8, layer_pattern="GGGA"))
    assert model.layer_types == "GGGAGGGA"
    kinds = [type(b.mixer) for b in model.layers]
    assert kinds.count(Attention) == 2 and kinds.count(GatedDeltaNet) == 6
    assert [i for i, k in enumerate(kinds) if k is Attention] == [3, 7]
    assert expand_layer_pattern("GA", 6) == "GAGAGA"


@pytest.mark.parametrize(
    "pattern,n_layers,match",
    [("GGXA", 4, "unknown letters"), ("", 4, "empty"), ("GGGA", 6, "multiple of len"), ("GA", 0, "multiple")],
)
def test_bad_pattern_or_n_layers_raises(pattern, n_layers, match):
    with pytest.raises(ValueError, match=match):
        HybridLM(tiny_cfg(layer_pattern=pattern, n_layers=n_layers))


def test_tied_embeddings_share_storage_and_count_once():
    tied = HybridLM(tiny_cfg(tie_embeddings=True))
    untied = HybridLM(tiny_cfg(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == 128 * 64
    assert tied.num_params() == tied.num_params(exclude_embedding=True) + 128 * 64
    # a training step on the tied model moves both views together
    ids = torch.randint(0, 128, (1, 8))
    lm_loss(tied(ids), ids).backward()
    with torch.no_grad():
        tied.lm_head.weight -= tied.lm_head.weight.grad
    assert torch.equal(tied.embed.weight, tied.lm_head.weight)


def test_meta_device_materialisation_keeps_tying():
    cfg = tiny_cfg(n_layers=2, layer_pattern="GA")
    with torch.device("meta"):
        model = HybridLM(cfg)
    model.to_empty(device="cpu")
    model.reset_parameters()
    assert model.lm_head.weight is model.embed.weight
    assert model.num_params() == HybridLM(cfg).num_params()
    ids = torch.randint(0, 128, (1, 8))
    assert torch.isfinite(model(ids)).all()


def test_init_std_and_loss_near_log_vocab():
    torch.manual_seed(0)
    cfg = tiny_cfg(vocab_size=512, n_layers=8, init_std=0.02)
    model = HybridLM(cfg)
    out_std = 0.02 / math.sqrt(2 * 8)
    assert abs(model.layers[0].ffn.down_proj.weight.std().item() / out_std - 1) < 0.1
    assert abs(model.layers[3].mixer.o_proj.weight.std().item() / out_std - 1) < 0.1
    assert abs(model.layers[0].ffn.up_proj.weight.std().item() / 0.02 - 1) < 0.1
    assert abs(model.embed.weight.std().item() / 0.02 - 1) < 0.1
    assert torch.equal(model.norm.weight, torch.ones(64))
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        loss = lm_loss(model(ids), ids).item()
    assert abs(loss - math.log(512)) < 0.1, f"init loss {loss:.3f} vs ln(vocab) {math.log(512):.3f}"


def test_packed_forward_equals_per_document_forward():
    torch.manual_seed(0)
    model = HybridLM(tiny_cfg(init_std=0.1))  # larger init so the layers mix tokens noticeably
    lengths = [11, 5, 16]
    cu = torch.tensor([0, 11, 16, 32], dtype=torch.int32)
    ids = torch.randint(0, 128, (1, 32))
    dlogits = torch.randn(1, 32, 128)

    model.zero_grad()
    logits = model(ids, cu_seqlens=cu)
    (logits * dlogits).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    ref = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out = model(ids[:, s:e])
        (out * dlogits[:, s:e]).sum().backward()
        ref.append(out.detach())
    ref = torch.cat(ref, 1)
    assert sum(lengths) == ref.shape[1]
    assert rel_rms(logits, ref) < 1e-5, rel_rms(logits, ref)
    for n, p in model.named_parameters():
        assert rel_rms(grads[n], p.grad) < 1e-5, (n, rel_rms(grads[n], p.grad))
    # explicit position_ids give the same result as the derived ones
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        assert rel_rms(model(ids, position_ids=pos, cu_seqlens=cu), ref) < 1e-5
        # and ignoring the boundaries changes the later documents
        assert rel_rms(model(ids)[:, 11:], ref[:, 11:]) > 1e-3


def test_every_parameter_gets_a_nonzero_gradient():
    torch.manual_seed(0)
    model = HybridLM(tiny_cfg(tie_embeddings=False, layer_pattern="GA", n_layers=2))
    ids = torch.randint(0, 128, (2, 24))
    lm_loss(model(ids), ids).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_activation_checkpointing_same_loss_and_grads():
    torch.manual_seed(0)
    plain = HybridLM(tiny_cfg())
    ckpt = apply_activation_checkpointing(HybridLM(tiny_cfg()))
    ckpt.load_state_dict(plain.state_dict())  # state-dict keys unchanged by the wrapping
    saved = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):  # checkpointing keeps fewer tensors for backward
        count = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.__setitem__(0, count[0] + 1) or t, lambda t: t):
            lm_loss(model(torch.randint(0, 128, (1, 24))), torch.randint(0, 128, (1, 24)))
        saved[name] = count[0]
    assert saved["ckpt"] < saved["plain"] / 2, saved
    cu = torch.tensor([0, 9, 24], dtype=torch.int32)
    ids = torch.randint(0, 128, (1, 24))
    losses = []
    for model in (plain, ckpt):
        loss = lm_loss(model(ids, cu_seqlens=cu), ids)
        loss.backward()
        losses.append(loss.detach())
    assert rel_rms(losses[1], losses[0]) < 1e-6
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert rel_rms(q.grad, p.grad) < 1e-6, n
    with torch.no_grad():  # checkpointing is skipped without grad
        assert torch.equal(ckpt(ids), plain(ids))


def test_activation_checkpointing_counts_routing_statistics_once():
    """The recomputed forward in backward counts nothing: MoE loads, MoH/MoA routing stats, MoH head
    counts and MoBA attended fractions after one training forward + backward equal the plain model's."""
    from lctrain.layers.moa import MoAConfig
    from lctrain.layers.moba import MoBAConfig
    from lctrain.layers.moe import MoEConfig
    from lctrain.layers.moh import MoHConfig
    from lctrain.layers.routing import routed_layers

    kw = dict(
        n_layers=3, layer_pattern="HEM",
        moh=MoHConfig(num_heads=4, num_kv_heads=2, head_dim=16, num_shared_heads=1, top_k=2),
        moa=MoAConfig(num_experts=4, top_k=2, head_dim=16),
        moba=MoBAConfig(num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, top_k=2),
        moe=MoEConfig(num_experts=4, top_k=2),
    )
    torch.manual_seed(0)
    plain = HybridLM(tiny_cfg(**kw)).train()
    ckpt = apply_activation_checkpointing(HybridLM(tiny_cfg(**kw)).train())
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 128, (1, 24))
    counters = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        lm_loss(model(ids), ids).backward()
        c = {}
        for n, m in routed_layers(model):
            c[f"{n}.load"] = m.routing_stats.load.clone()
            c[f"{n}.calls"] = m.routing_stats.calls.clone()
        for n, m in model.named_modules():
            for attr in ("head_counts", "tokens_counted", "attended_stats"):
                if torch.is_tensor(getattr(m, attr, None)):
                    c[f"{n}.{attr}"] = getattr(m, attr).clone()
        counters[name] = c
    assert len(counters["plain"]) >= 11, sorted(counters["plain"])  # 4 routed layers x 2, MoH x 2, MoBA
    assert counters["plain"].keys() == counters["ckpt"].keys()
    for key, ref in counters["plain"].items():
        assert ref.sum() > 0, key
        assert torch.equal(counters["ckpt"][key], ref), (key, counters["ckpt"][key], ref)


def test_forward_input_errors():
    model = HybridLM(tiny_cfg(n_layers=2, layer_pattern="GA"))
    ids = torch.randint(0, 128, (2, 8))
    with pytest.raises(ValueError, match="batch size 1|packed layout"):
        model(ids, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="must equal the packed length"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 4, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(8)[None])
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float())


def test_flops_per_token_terms():
    cfg = tiny_cfg(layer_pattern="GGGA", n_layers=4, tie_embeddings=True)
    model = HybridLM(cfg)
    n = model.num_params(exclude_embedding=True) + cfg.vocab_size * cfg.d_model
    gdn = 3 * 18 * cfg.gdn.num_heads * cfg.gdn.head_dim * cfg.gdn.head_dim
    for T in (64, 1024):
        attn = 6 * cfg.attn.num_heads * cfg.attn.head_dim * T  # one causal attention layer
        assert model.flops_per_token(T) == pytest.approx(6 * n + gdn + attn)
    with pytest.raises(ValueError):
        model.flops_per_token(0)
