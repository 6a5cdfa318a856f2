"""The MoBA mixer (letter M): identities against dense attention, config rules, recipe schedule, statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lctrain.config import ConfigError, load_config
from lctrain.kernels.moba import moba_selected_fraction
from lctrain.layers.attention import Attention, AttentionConfig, attention_flops_per_token
from lctrain.layers.moba import MoBAAttention, MoBAConfig, moba_flops_per_token
from lctrain.models import HybridLM, expand_layer_pattern
from lctrain.train.metrics import attention_sparsity_step


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _pair(block_size, top_k, kv=2):
    torch.manual_seed(0)
    dense = Attention(32, 4, kv, 8, output_gate=True, kernels="torch")
    moba = MoBAAttention(32, 4, kv, 8, block_size=block_size, top_k=top_k, output_gate=True, kernels="torch")
    moba.load_state_dict(dense.state_dict(), strict=True)  # same parameter names: a dense checkpoint loads
    return dense, moba


def _grads(layer, x, cu):
    x = x.clone().requires_grad_(True)
    out = layer(x, None, cu)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * w).sum().backward()
    return out, [x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("cu", [None, torch.tensor([0, 7, 30, 45], dtype=torch.int32)])
def test_all_blocks_selected_equals_dense_attention(cu):
    """block_size * top_k >= T: MoBA is full causal attention (outputs and every gradient)."""
    dense, moba = _pair(block_size=8, top_k=6)
    x = torch.randn(1, 45, 32, generator=torch.Generator().manual_seed(1))
    out_d, g_d = _grads(dense, x, cu)
    out_m, g_m = _grads(moba, x, cu)
    assert rel(out_m, out_d) < 1e-5
    for a, b in zip(g_m, g_d):
        assert rel(a, b) < 1e-5


def test_top1_equals_block_diagonal_attention_of_the_layer():
    """top_k = 1: each query sees only its own block; oracle from the layer's q, k, v with an explicit mask."""
    dense, moba = _pair(block_size=5, top_k=1, kv=4)
    x = torch.randn(1, 23, 32, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(23)[None]
    q = dense.q_proj(x).view(1, 23, 4, 8)
    k = dense.k_proj(x).view(1, 23, 4, 8)
    v = dense.v_proj(x).view(1, 23, 4, 8)
    q, k = dense.rope(q, k, pos)
    i = torch.arange(23)
    mask = (i[:, None] >= i[None, :]) & (i[:, None] // 5 == i[None, :] // 5)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    o = o.transpose(1, 2) * torch.sigmoid(dense.g_proj(x)).view(1, 23, 4, 8)
    ref = dense.o_proj(o.reshape(1, 23, 32))
    assert rel(moba(x), ref) < 1e-5
    assert rel(dense(x), ref) > 1e-2  # the oracle is not dense attention


def test_config_rules_and_schedule():
    cfg = load_config(["recipe=hybrid_gdn_moba"])
    assert cfg.model.layer_pattern == "GM" and cfg.model.final_layers == "A"
    assert HybridLM(cfg.model).layer_types == "GMGA"
    assert expand_layer_pattern("GM", 8, "AA") == "GMGMGMAA"
    big = load_config(["recipe=hybrid_gdn_moba", "scale=340m"]).model
    assert expand_layer_pattern(big.layer_pattern, big.n_layers, big.final_layers) == "GM" * 11 + "GA"
    assert big.moba.block_size == 512 and big.moba.top_k == 3
    for bad, match in [
        (["model.moba.top_k=0"], "model.moba.top_k"),
        (["model.moba.block_size=0"], "model.moba.block_size"),
        (["model.final_layers=Q"], "model.final_layers"),
        (["parallel.cp_degree=2"], "MoBA.*parallel.cp_impl=ulysses"),
        (["parallel.cp_degree=4", "parallel.cp_impl=usp", "parallel.ulysses_degree=2"], "cp_impl=ulysses"),
        (["parallel.cp_degree=4", "parallel.cp_impl=ulysses", "model.moba.num_heads=6",
          "model.moba.num_kv_heads=2"], "model.moba.num_heads=6 must be divisible by the Ulysses degree 4"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(["recipe=hybrid_gdn_moba", *bad])
    load_config(["recipe=hybrid_gdn_moba", "parallel.cp_degree=2", "parallel.cp_impl=ulysses"])


def test_attended_fraction_is_recorded_and_flops_scale_with_it():
    _, moba = _pair(block_size=4, top_k=2)
    moba.train()
    cu = torch.tensor([0, 10, 32], dtype=torch.int32)
    x = torch.randn(1, 32, 32)
    moba(x, None, cu).sum().backward()
    moba(x, None, cu).sum().backward()
    with torch.no_grad():
        moba(x, None, cu)  # evaluation is not counted
    stats = attention_sparsity_step(torch.nn.ModuleList([moba]))
    # hand count, doc of 10 tokens (blocks 0-3, 4-7, 8-9) and of 22 tokens, top-2: attended / causal keys
    def doc(L):
        got = sum(min(1, i // 4) * 4 + (i % 4) + 1 for i in range(L))
        return got, L * (L + 1) // 2
    a, b = doc(10), doc(22)
    assert stats["attended_fraction"] == pytest.approx((a[0] + b[0]) / (a[1] + b[1]))
    assert float(moba.attended_stats.sum()) == 0.0  # reset
    cfg = MoBAConfig(num_heads=4, head_dim=8, block_size=64, top_k=3)
    T = 4096
    frac = moba_selected_fraction(T, 64, 3, None, unit="keys")
    dense = attention_flops_per_token(AttentionConfig(num_heads=4, head_dim=8), T)
    assert moba_flops_per_token(cfg, T) == pytest.approx(dense * frac + 2 * 4 * 8 * T / 64)
    assert frac < 0.1


def test_hybrid_moba_model_trains():
    cfg = load_config(["recipe=hybrid_gdn_moba", "model.vocab_size=64", "model.d_model=32", "model.moba.num_heads=2",
                       "model.moba.num_kv_heads=1", "model.moba.head_dim=16", "model.moba.block_size=8",
                       "model.moba.top_k=2", "model.attn.num_heads=2", "model.attn.num_kv_heads=1",
                       "model.attn.head_dim=16", "model.gdn.num_heads=2", "model.gdn.head_dim=16"]).model
    torch.manual_seed(0)
    model = HybridLM(cfg)
    ids = torch.randint(0, 64, (2, 65), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.2, losses
