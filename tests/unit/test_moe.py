"""MoE router formulas, capacity dropping, bias balancing, grouped expert compute and the MoE layer.

References: hand-computed values for the losses on small inputs, the per-expert fp32 loop
(``lctrain.kernels.moe.naive``) for the expert compute, and an explicitly summed loss for the
gradients that :class:`AuxLossScaler` injects. Tolerances are stated per assertion.
"""

from __future__ import annotations

import math

import pytest
import torch

from lctrain.config import ConfigError, MoEConfig, load_config, moe_layer_indices
from lctrain.kernels.moe import grouped_swiglu, moe_ffn_reference
from lctrain.layers.moe import (
    MoE,
    capacity_keep_mask,
    expert_bias_update,
    load_balancing_loss,
    router_scores,
    router_z_loss,
    topk_route,
)
from lctrain.models import HybridLM
from lctrain.train.metrics import routing_step as finish_step


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- router formulas
def test_load_balancing_loss_matches_hand_computation():
    # 3 tokens, 3 experts, top-2
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    idx = torch.tensor([[0, 1], [1, 2], [2, 0]])
    # f = counts / (S*K) = [2, 2, 2] / 6; P = column means = [0.8, 1.1, 1.1] / 3
    expected = 3 * sum((2 / 6) * p for p in (0.8 / 3, 1.1 / 3, 1.1 / 3))
    assert abs(float(load_balancing_loss(probs, idx, 3)) - expected) < 1e-6
    # skewed routing: every slot on expert 0 -> f = [1, 0, 0], loss = 3 * P_0
    idx2 = torch.tensor([[0], [0], [0]])
    assert abs(float(load_balancing_loss(probs, idx2, 3)) - 3 * 0.8 / 3) < 1e-6
    # uniform probabilities and counts -> exactly 1 (the coefficient under perfect balance)
    u = torch.full((4, 4), 0.25)
    assert abs(float(load_balancing_loss(u, torch.tensor([[0], [1], [2], [3]]), 4)) - 1.0) < 1e-6


def test_z_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.e + math.e**2)]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    assert abs(float(router_z_loss(logits)) - expected) < 1e-6


def test_topk_route_softmax_renormalised_or_not_and_sigmoid_bias_selects_only():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(logits, -1)
    w, idx = topk_route(router_scores(logits, "softmax"), 2, norm_topk_prob=False)
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(w, p[:, :2], rtol=0, atol=1e-7)
    w, idx = topk_route(router_scores(logits, "softmax"), 2, norm_topk_prob=True)
    torch.testing.assert_close(w, p[:, :2] / p[:, :2].sum(), rtol=0, atol=1e-7)
    s = router_scores(logits, "sigmoid")
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])  # pushes expert 2 into the selection
    w, idx = topk_route(s, 2, norm_topk_prob=False, expert_bias=bias)
    assert idx.tolist() == [[2, 0]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[0.0, 2.0]])), rtol=0, atol=1e-7)  # unbiased scores
    with pytest.raises(ValueError, match="softmax, sigmoid"):
        router_scores(logits, "relu")


def test_capacity_drops_lowest_priority_slots():
    # expert 0 chosen by 4 slots with weights 0.9, 0.2, 0.7, 0.4; capacity 2 keeps 0.9 and 0.7
    w = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3]])
    keep = capacity_keep_mask(w, idx, 4, capacity=2)
    assert keep[:, 0].tolist() == [True, False, True, False]
    # expert 1: weights 0.1, 0.8 -> both fit; experts 2, 3: one each
    assert keep[:, 1].all()
    keep1 = capacity_keep_mask(w, idx, 4, capacity=1)
    assert keep1[:, 0].tolist() == [True, False, False, False] and keep1[:, 1].tolist() == [False, True, True, True]


def test_bias_update_moves_load_toward_uniform():
    torch.manual_seed(0)
    E, S = 8, 4096
    # skewed router: expert e's score shifted by a fixed, expert-dependent offset
    logits = torch.randn(S, E) + torch.linspace(2.0, -2.0, E)
    scores = router_scores(logits, "sigmoid")
    bias = torch.zeros(E)

    def ratio(b):
        _, idx = topk_route(scores, 2, True, b)
        load = torch.bincount(idx.flatten(), minlength=E).double()
        return float(load.max() / load.mean()), load

    r0, _ = ratio(bias)
    for _ in range(300):  # the sigmoid scores differ by up to ~0.7 between experts: 300 * 5e-3 covers it
        _, load = ratio(bias)
        bias = expert_bias_update(bias, load, 5e-3)
    r1, _ = ratio(bias)
    assert r0 > 2.5 and r1 < 1.15, (r0, r1)
    # the update direction: overloaded experts go down, underloaded up
    load = torch.tensor([10.0, 0.0, 5.0])
    assert expert_bias_update(torch.zeros(3), load, 0.5).tolist() == [-0.5, 0.5, 0.0]


# ---------------------------------------------------------------- expert compute
@pytest.mark.parametrize("impl", ["grouped", "loop", "triton"])
def test_grouped_swiglu_equals_per_expert_reference(impl):
    """Every expert-compute path == the per-expert fp32 loop, outputs and all gradients (rel 1e-6;
    ``triton`` runs under TRITON_INTERPRET=1 set by tests/conftest.py, fp32, rel 1e-5)."""
    if impl == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(1)
    S, K, E, D, Fh = 24, 2, 6, 16, 8
    x = torch.randn(S, D, requires_grad=True)
    gu = (torch.randn(E, D, 2 * Fh) * 0.3).requires_grad_()
    dn = (torch.randn(E, Fh, D) * 0.3).requires_grad_()
    idx = torch.randint(0, E - 2, (S, K))  # experts E-2 and E-1 get no token
    w = torch.rand(S, K)
    dy = torch.randn(S, D)

    ref = moe_ffn_reference(x, idx, w, gu, dn)
    g_ref = torch.autograd.grad((ref * dy).sum(), (x, gu, dn))

    flat_e = idx.flatten()
    order = torch.argsort(flat_e, stable=True)
    tok = torch.arange(S).repeat_interleave(K)[order]
    counts = torch.bincount(flat_e, minlength=E)
    y = grouped_swiglu(x[tok], counts, gu, dn, impl)
    out = torch.zeros(S, D).index_add(0, tok, y * w.flatten()[order, None])
    g = torch.autograd.grad((out * dy).sum(), (x, gu, dn))
    tol = 1e-5 if impl == "triton" else 1e-6
    assert rel_err(out, ref) < tol
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < tol
    assert float(g[1][E - 2:].abs().max()) == 0.0  # zero-token experts: zero gradient


def test_grouped_swiglu_errors():
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="impl='loop'"):  # 6 fp32 = 24 bytes: not 16-byte aligned
        grouped_swiglu(x, torch.tensor([4]), torch.randn(1, 6, 12), torch.randn(1, 6, 6), "grouped")
    with pytest.raises(ValueError, match="sums to"):
        grouped_swiglu(x, torch.tensor([3]), torch.randn(1, 6, 12), torch.randn(1, 6, 6), "loop")


# ---------------------------------------------------------------- the layer
def _moe(**kw) -> MoE:
    cfg = MoEConfig(**{"num_experts": 6, "top_k": 2, "ffn_hidden_size": 8, **kw})
    m = MoE(16, cfg, 32)
    m.reset_parameters(0.3, 0.2)
    return m


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"score_func": "sigmoid", "bias_update_rate": 1e-3, "norm_topk_prob": False, "num_shared_experts": 1},
        {"capacity_factor": 1.0, "expert_impl": "loop"},
    ],
)
def test_moe_layer_equals_reference_with_aux_gradients(kw):
    """Layer output/gradients == per-expert reference + explicitly added aux and z losses (rel 1e-5)."""
    torch.manual_seed(2)
    m = _moe(**kw)
    if kw.get("bias_update_rate"):
        m.expert_bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.0, 0.1, -5.0]))  # expert 5 never chosen
    x = torch.randn(3, 10, 16, requires_grad=True)
    dy = torch.randn(3, 10, 16)
    scale = 0.37
    m.aux_loss_scale = scale
    out = m(x)
    grads = torch.autograd.grad((out * dy).sum(), [x, *m.parameters()])

    # reference: the formulas written out again, experts by the per-expert loop
    cfg = m.cfg
    h = x.reshape(-1, 16)
    logits = h @ m.router.weight.T
    scores = router_scores(logits, cfg.score_func)
    w, idx = topk_route(scores, cfg.top_k, cfg.norm_topk_prob, m.expert_bias if cfg.bias_update_rate else None)
    if cfg.capacity_factor:
        cap = math.ceil(cfg.capacity_factor * h.shape[0] * cfg.top_k / cfg.num_experts)
        w = w * capacity_keep_mask(w, idx, cfg.num_experts, cap)
    ref = moe_ffn_reference(h, idx, w, m.experts.gate_up_proj, m.experts.down_proj)
    if m.shared_experts is not None:
        ref = ref + m.shared_experts(h)
    probs = scores if cfg.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
    aux = cfg.aux_loss_coeff * load_balancing_loss(probs, idx, cfg.num_experts) + cfg.z_loss_coeff * router_z_loss(logits)
    ref_grads = torch.autograd.grad((ref.view_as(dy) * dy).sum() + scale * aux, [x, *m.parameters()])
    assert rel_err(out, ref.view_as(out)) < 1e-5
    for (name, _), a, b in zip([("x", None), *m.named_parameters()], grads, ref_grads):
        assert rel_err(a, b) < 1e-5, name

    stats = finish_step(m)
    assert abs(stats["aux_loss"] + stats["z_loss"] - float(aux.detach())) < 1e-6
    assert sum(stats["layers"][0]["tokens_per_expert"]) == 30 * cfg.top_k
    if cfg.capacity_factor:
        kept = float((w > 0).sum())
        assert abs(stats["dropped_frac"] - (1 - kept / 60)) < 1e-9 and stats["dropped_frac"] > 0
    if cfg.bias_update_rate:
        assert stats["layers"][0]["tokens_per_expert"][5] == 0.0
        assert m.expert_bias[5] > -5.0  # the starved expert's bias went up
    assert float(m.routing_stats.pack().abs().sum()) == 0.0  # counters reset


def test_eval_mode_records_nothing():
    m = _moe().eval()
    with torch.no_grad():
        m(torch.randn(2, 4, 16))
    assert float(m.routing_stats.calls) == 0.0 and float(m.routing_stats.load.sum()) == 0.0


# ---------------------------------------------------------------- config and model
def test_moe_config_validation_names_keys():
    base = ["recipe=hybrid_gdn_3to1_moe"]
    cfg = load_config(base)
    assert cfg.model.moe.num_experts == 8
    for bad, match in [
        (["model.moe.score_func=relu"], "softmax, sigmoid"),
        (["model.moe.top_k=9"], "model.moe.top_k"),
        (["model.moe.layers=every_x"], "every_other"),
        (["model.moe.layers=0,9"], "model.n_layers"),
        (["parallel.ep_degree=3"], "must divide model.moe.num_experts=8"),
        (["model.moe.num_experts=0", "parallel.ep_degree=2"], "needs an MoE model"),
        (["model.moe.expert_impl=cutlass"], "auto, grouped, loop, triton"),
        (["model.moe.topk=2"], "keys allowed in section 'model.moe': num_experts, top_k"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(base + bad)
    assert moe_layer_indices("every_other", 6) == [1, 3, 5]
    assert moe_layer_indices("every_3", 6) == [2, 5]
    assert moe_layer_indices("0,2", 4) == [0, 2]


def test_hybrid_model_with_moe_layers_trains_and_counts_active_flops():
    cfg = load_config([
        "recipe=hybrid_gdn_3to1_moe", "model.vocab_size=64", "model.d_model=32", "model.attn.num_heads=2",
        "model.attn.num_kv_heads=1", "model.attn.head_dim=16", "model.gdn.num_heads=2", "model.gdn.head_dim=16",
        "model.moe.layers=every_other", "model.moe.ffn_hidden_size=16", "model.gdn.chunk_size=16",
    ]).model
    torch.manual_seed(0)
    model = HybridLM(cfg)
    kinds = [type(b.ffn).__name__ for b in model.layers]
    assert kinds == ["SwiGLU", "MoE", "SwiGLU", "MoE"]
    ids = torch.randint(0, 64, (2, 24))
    logits = model(ids)
    logits.float().logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
    routed = sum(p.numel() for b in model.layers if isinstance(b.ffn, MoE) for p in b.ffn.experts.parameters())
    n_all = model.num_params(exclude_embedding=True) + 64 * 32  # + tied LM head
    mixing = 3 * 18.0 * 2 * 16 * 16 + 6.0 * 2 * 16 * 24  # GGG + A layers at T = 24
    expected = 6.0 * (n_all - routed * (1 - 2 / 8)) + mixing  # only top_k / E of routed weights are active
    assert abs(model.flops_per_token(24) - expected) < 1e-3
