"""MoH mixture-of-head attention (lctrain.layers.moh) against references written here.

The oracle below recomputes the layer in float64 from its weights only: projections by einsum,
its own rotate-half RoPE, per-head per-document causal ``F.scaled_dot_product_attention``, the MoH
gates (routed softmax + top-k renormalised times K, shared softmax times h_s, 2 * softmax mixing)
or the query-norm parameter-free gates, then the per-token weighted sum over heads of
``o_h W_o^h``, and the balance loss ``E * sum_i mean(g_i) * frac(selected_i)``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lctrain.errors import ConfigError
from lctrain.layers.attention import Attention
from lctrain.layers.moh import MoHAttention, MoHConfig, build_moh, moh_balance_loss, moh_flops_per_token
from lctrain.layers.registry import get_mixer

D, H, HKV, DH = 16, 4, 2, 8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make(seed: int = 0, **kw) -> MoHAttention:
    torch.manual_seed(seed)
    args = {"num_heads": H, "num_kv_heads": HKV, "head_dim": DH, "kernels": "torch"}
    args.update(kw)
    layer = MoHAttention(D, **args)
    with torch.no_grad():  # routers with visible spread so the routing is far from ties
        for name in ("router", "shared_router", "mix_router"):
            mod = getattr(layer, name)
            if mod is not None:
                mod.weight.normal_(0.0, 0.7)
    return layer


def doc_bounds(B: int, T: int, cu: torch.Tensor | None) -> list[tuple[int, int]]:
    return [(0, T)] if cu is None else [(int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1)]


def rope_ref(t: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE on [B, T, h, Dh] float64 at integer positions [B, T]."""
    half = t.shape[-1] // 2
    inv = theta ** (-torch.arange(0, 2 * half, 2, dtype=torch.float64) / (2 * half))
    ang = pos.double()[..., None] * inv
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    t1, t2 = t[..., :half], t[..., half:]
    return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)


def oracle(x, P, *, hs, K, router="learned", theta=10000.0, cu=None, num_heads=H, num_kv=HKV, head_dim=DH):
    """float64 reference: returns (y [B,T,D], aux (uncoefficiented balance loss or None), mask [S,E], weights [S,H])."""
    B, T, _ = x.shape
    Hq, Dh, E = num_heads, head_dim, num_heads - hs
    q = torch.einsum("btd,ed->bte", x, P["q_proj"]).reshape(B, T, Hq, Dh)
    k = torch.einsum("btd,ed->bte", x, P["k_proj"]).reshape(B, T, num_kv, Dh)
    v = torch.einsum("btd,ed->bte", x, P["v_proj"]).reshape(B, T, num_kv, Dh)
    pos = torch.zeros(B, T, dtype=torch.int64)
    for s, e in doc_bounds(B, T, cu):
        pos[:, s:e] = torch.arange(e - s)
    qr, kr = rope_ref(q, pos, theta), rope_ref(k, pos, theta)
    o = torch.zeros(B, T, Hq, Dh, dtype=torch.float64)
    for h in range(Hq):
        kv = h // (Hq // num_kv)
        for s, e in doc_bounds(B, T, cu):
            o[:, s:e, h] = F.scaled_dot_product_attention(
                qr[:, s:e, h][:, None], kr[:, s:e, kv][:, None], v[:, s:e, kv][:, None], is_causal=True
            )[:, 0]
    if "g_proj" in P:
        o = o * torch.sigmoid(torch.einsum("btd,ed->bte", x, P["g_proj"])).reshape(B, T, Hq, Dh)
    xs = x.reshape(B * T, -1)
    aux = None
    if router == "learned":
        g = torch.softmax(xs @ P["router"].T, dim=-1)
        mask = torch.zeros_like(g).scatter(1, g.topk(K, dim=-1).indices, 1.0)
        r = K * (g * mask) / (g * mask).sum(-1, keepdim=True)
        if hs == 0:
            w = r
        else:
            s = hs * torch.softmax(xs @ P["shared_router"].T, -1) if hs > 1 else torch.ones(B * T, 1, dtype=x.dtype)
            a = 2 * torch.softmax(xs @ P["mix_router"].T, -1)
            w = torch.cat([a[:, :1] * s, a[:, 1:] * r], dim=1)
        aux = E * (g.mean(0) * mask.mean(0)).sum()
    else:
        n = q.reshape(B * T, Hq, Dh)[:, hs:].norm(dim=-1)
        z = (n - n.mean(-1, keepdim=True)) / n.std(-1, correction=0, keepdim=True)
        mask = torch.zeros_like(z).scatter(1, z.topk(K, dim=-1).indices, 1.0)
        w = torch.cat([torch.ones(B * T, hs, dtype=x.dtype), mask], dim=1)
    wo = P["o_proj"].reshape(-1, Hq, Dh)
    y = torch.einsum("shd,sh,ehd->se", o.reshape(B * T, Hq, Dh), w, wo)
    return y.reshape(B, T, -1), aux, mask.bool(), w


def layer_and_oracle_grads(layer, x, cu=None, **okw):
    """Run the layer (train mode, fp32) and the float64 oracle on the same weights; returns both sides."""
    dy = torch.randn(x.shape[0], x.shape[1], D, generator=torch.Generator().manual_seed(7))
    layer.train()
    xl = x.clone().requires_grad_(True)
    y = layer(xl, None, cu)
    (y * dy).sum().backward()
    P = {n.removesuffix(".weight"): p.detach().double().requires_grad_(True) for n, p in layer.named_parameters()}
    xo = x.double().requires_grad_(True)
    yo, aux, _, _ = oracle(xo, P, cu=cu, **okw)
    loss = (yo * dy.double()).sum()
    if aux is not None:
        loss = loss + layer.aux_loss_coeff * aux
    loss.backward()
    return (y, xl.grad, {n.removesuffix(".weight"): p.grad for n, p in layer.named_parameters()}), (yo, xo.grad, P)


def assert_matches_oracle(layer, x, cu=None, tol=2e-5, **okw):
    (y, gx, grads), (yo, gxo, P) = layer_and_oracle_grads(layer, x, cu, **okw)
    assert rel(y, yo) < tol
    assert rel(gx, gxo) < tol
    assert set(grads) == set(P)
    for n, p in P.items():
        assert grads[n] is not None and p.grad is not None, n
        assert rel(grads[n], p.grad) < tol, (n, rel(grads[n], p.grad))


def test_all_heads_with_uniform_gates_equals_attention():
    """(1) top_k = every routed head and zero router weights: g, s, a uniform, every weight exactly 1."""
    for path in ("reference", "selected"):
        for hs in (0, 1, 2):
            moh = make(num_shared_heads=hs, top_k=H - hs, path=path)
            with torch.no_grad():
                for name in ("router", "shared_router", "mix_router"):
                    if getattr(moh, name) is not None:
                        getattr(moh, name).weight.zero_()
            attn = Attention(D, H, HKV, DH, kernels="torch")
            missing, unexpected = attn.load_state_dict(moh.state_dict(), strict=False)
            assert missing == [] and all(k.split(".")[0].endswith("router") for k in unexpected)
            x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(1))
            outs, grads = [], []
            for m in (moh.train(), attn):
                xi = x.clone().requires_grad_(True)
                y = m(xi)
                (y * torch.cos(y.detach())).sum().backward()  # a fixed non-trivial output gradient
                outs.append(y)
                grads.append({"x": xi.grad, **{n: p.grad for n, p in m.named_parameters() if "router" not in n}})
            assert rel(outs[0], outs[1]) < 1e-6
            assert grads[0].keys() == grads[1].keys()
            for n in grads[1]:
                assert rel(grads[0][n], grads[1][n]) < 1e-5, (path, hs, n)


@pytest.mark.parametrize("hs,K,gate", [(1, 2, True), (2, 1, True), (0, 2, False), (1, 1, False)])
def test_learned_router_matches_dense_oracle(hs, K, gate):
    """(2) outputs and the gradients of x and every parameter, router weights and balance loss included."""
    layer = make(num_shared_heads=hs, top_k=K, output_gate=gate, aux_loss_coeff=0.3, path="reference")
    x = torch.randn(2, 10, D, generator=torch.Generator().manual_seed(2))
    assert_matches_oracle(layer, x, hs=hs, K=K)


def test_exactly_top_k_routed_heads_per_token():
    """(3) the mask has K routed heads per token, the ones with the largest softmax(W_r x); weights follow it."""
    layer = make(num_heads=8, num_kv_heads=2, num_shared_heads=2, top_k=3)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(3))
    q = layer.q_proj(x).view(40, 8, DH)
    routing = layer.route(x, q)
    assert routing.mask.shape == (40, 6) and bool((routing.mask.sum(-1) == 3).all())
    g = torch.softmax(x.double() @ layer.router.weight.double().T, -1)
    third = g.sort(-1, descending=True).values[:, 2:3]
    assert torch.equal(routing.mask, g >= third)
    routed_w = routing.weights[:, 2:]
    assert bool((routed_w[~routing.mask] == 0).all()) and bool((routed_w[routing.mask] > 0).all())
    assert bool((routing.weights[:, :2] > 0).all())  # shared heads always on
    assert torch.equal((routing.weights != 0).sum(-1), torch.full((40,), 5))
    # the routed weights of a token sum to a2 * K, the shared ones to a1 * h_s, a1 + a2 = 2
    a = 2 * torch.softmax(x.double() @ layer.mix_router.weight.double().T, -1)
    assert rel(routed_w.sum(-1), a[:, 1] * 3) < 1e-6 and rel(routing.weights[:, :2].sum(-1), a[:, 0] * 2) < 1e-6


@pytest.mark.parametrize("router,hs,K,gate,packed,heads", [
    ("learned", 1, 2, True, False, 4), ("learned", 2, 2, False, True, 6), ("learned", 0, 3, True, True, 4),
    ("param_free", 1, 2, True, True, 4),
])
def test_selected_heads_path_equals_reference(router, hs, K, gate, packed, heads):
    """(4) the selected-heads output projection (and gate) gives the reference path's outputs and gradients."""
    B, T = (1, 14) if packed else (2, 7)
    cu = torch.tensor([0, 4, 9, 14], dtype=torch.int32) if packed else None
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(4))
    dy = torch.randn(B, T, D, generator=torch.Generator().manual_seed(5))
    results = []
    for path in ("reference", "selected"):
        layer = make(seed=11, router=router, num_heads=heads, num_shared_heads=hs, top_k=K, output_gate=gate,
                     path=path).train()
        xi = x.clone().requires_grad_(True)
        y = layer(xi, None, cu)
        (y * dy).sum().backward()
        assert layer.last_path_selected == (path == "selected")
        results.append((y, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (y0, gx0, g0), (y1, gx1, g1) = results
    assert rel(y1, y0) < 1e-6 and rel(gx1, gx0) < 1e-6
    assert g0.keys() == g1.keys()
    for n in g0:
        assert rel(g1[n], g0[n]) < 1e-6, n


def test_param_free_router_loads_dense_checkpoint_and_matches_oracles():
    """(5) no new parameters; strict load of an Attention state dict; dense when K = E; masked oracle otherwise."""
    torch.manual_seed(0)
    attn = Attention(D, H, HKV, DH, kernels="torch")
    full = MoHAttention(D, H, HKV, DH, num_shared_heads=1, top_k=3, router="param_free", kernels="torch")
    full.load_state_dict(attn.state_dict(), strict=True)
    assert [n for n, _ in full.named_parameters()] == [n for n, _ in attn.named_parameters()]
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(6))
    ys, grads = [], []
    for m in (full.train(), attn):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y ** 2).sum().backward()
        ys.append(y)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert rel(ys[0], ys[1]) < 1e-6
    for a, b in zip(grads[0], grads[1], strict=True):
        assert rel(a, b) < 1e-5
    for hs, K in ((1, 2), (2, 1), (0, 1)):
        sparse = MoHAttention(D, H, HKV, DH, num_shared_heads=hs, top_k=K, router="param_free", kernels="torch")
        sparse.load_state_dict(attn.state_dict(), strict=True)
        assert_matches_oracle(sparse, x, hs=hs, K=K, router="param_free")
    # the routing logits are the routed heads' query norms standardised with the population std
    xs = x.reshape(-1, D)
    q = full.q_proj(xs).view(-1, H, DH)
    norms = q.detach().double()[:, 1:].norm(dim=-1)
    z = (norms - norms.mean(-1, keepdim=True)) / norms.std(-1, correction=0, keepdim=True)
    routing = full.route(xs, q)
    assert routing.probs is None and rel(routing.logits, z) < 1e-6
    # the oracle really drops heads: its output differs from dense attention
    P = {n.removesuffix(".weight"): p.detach().double() for n, p in attn.named_parameters()}
    y_sparse, _, mask, _ = oracle(x.double(), P, hs=1, K=1, router="param_free")
    assert int(mask.sum()) == 18 and rel(y_sparse, ys[1]) > 1e-2


def test_balance_loss_hand_values_and_routing_stats():
    """(6) E * sum(me * ce): a hand-computed case, = K under uniform routing; statistics counted in training."""
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    idx = torch.tensor([[0, 1], [0, 1]])
    # me = (0.65, 0.25, 0.10), ce = (1, 1, 0): 3 * (0.65 + 0.25) = 2.7
    assert float(moh_balance_loss(probs, idx, top_k=2)) == pytest.approx(2.7, rel=1e-6)
    uniform = torch.full((6, 4), 0.25)
    idx = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2]])
    assert float(moh_balance_loss(uniform, idx, top_k=2)) == pytest.approx(2.0, rel=1e-6)
    # inside the layer: zero router weights give uniform g, so the loss is K whatever heads are picked
    layer = make(num_heads=6, num_kv_heads=2, num_shared_heads=1, top_k=3, aux_loss_coeff=0.05)
    with torch.no_grad():
        layer.router.weight.zero_()
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(8))
    layer.train()
    layer(x.requires_grad_(True))
    st = layer.routing_stats
    assert float(st.aux_loss) == pytest.approx(0.05 * 3, rel=1e-6)
    assert float(st.calls) == 1 and float(st.slots) == 10 * 3 and float(st.load.sum()) == 30
    # a second call with a trained-looking router: loads equal the heads its mask selects, losses add up
    layer2 = make(seed=3, num_heads=6, num_kv_heads=2, num_shared_heads=1, top_k=3, aux_loss_coeff=0.05).train()
    x2 = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(9))
    total_load, total_aux = torch.zeros(5, dtype=torch.float64), 0.0
    for _ in range(2):
        layer2(x2.clone().requires_grad_(True))
        q = layer2.q_proj(x2).view(10, 6, DH)
        routing = layer2.route(x2.reshape(10, D), q)
        total_load += routing.mask.sum(0).double()
        g = torch.softmax(x2.reshape(10, D).double() @ layer2.router.weight.double().T, -1)
        total_aux += 0.05 * 5 * float((g.mean(0) * routing.mask.double().mean(0)).sum().detach())
    assert torch.equal(layer2.routing_stats.load, total_load)
    assert float(layer2.routing_stats.aux_loss) == pytest.approx(total_aux, rel=1e-5)
    # no statistics in eval mode or without gradients; the active-head counters still run
    layer2.routing_stats.reset()
    layer2.eval()
    layer2(x2)
    with torch.no_grad():
        layer2.train()(x2)
    assert float(layer2.routing_stats.calls) == 0
    assert float(layer2.tokens_counted) == 4 * 10
    assert layer2.active_head_fraction() == pytest.approx((1 + 3) / 6)
    assert torch.equal(layer2.head_counts[0], torch.tensor(40.0, dtype=torch.float64))  # the shared head
    layer2.reset_head_counts()
    assert float(layer2.tokens_counted) == 0 and layer2.active_head_fraction() == pytest.approx(4 / 6)


def test_balance_loss_gradient_reaches_router_with_scale():
    """aux_loss_scale weights the balance-loss gradient (AuxLossScaler): grad(scale=2) - grad(scale=0) = 2 * d aux."""
    # float64 layer (its router still computes in fp32): the check subtracts two router gradients,
    # and fp32 rounding of the attention path alone gave 1.1e-5 relative on an AVX-512 machine (3e-6 now)
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    grads = {}
    for scale in (0.0, 2.0):
        layer = make(seed=5, aux_loss_coeff=0.1).double().train()
        layer.aux_loss_scale = scale
        layer(x).sum().backward()
        grads[scale] = layer.router.weight.grad.clone()
    w = layer.router.weight.detach().double().requires_grad_(True)
    g = torch.softmax(x.reshape(-1, D).double() @ w.T, -1)
    mask = torch.zeros_like(g).scatter(1, g.topk(2, -1).indices, 1.0)
    aux = 0.1 * 3 * (g.mean(0) * mask.mean(0)).sum()
    (d_aux,) = torch.autograd.grad(aux, w)
    assert rel(grads[2.0] - grads[0.0], 2.0 * d_aux) < 1e-5


def test_packed_documents_and_gqa():
    """(7) B=1 with cu_seqlens and 8 query heads over 2 KV heads: the oracle attends per document."""
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    layer = make(num_heads=8, num_kv_heads=2, num_shared_heads=2, top_k=3, path="reference")
    x = torch.randn(1, 16, D, generator=torch.Generator().manual_seed(12))
    assert_matches_oracle(layer, x, cu=cu, hs=2, K=3, num_heads=8, num_kv=2)
    # nothing leaks across a boundary: changing document 2 leaves documents 1 and 3 unchanged
    layer.eval()
    with torch.no_grad():
        y = layer(x, None, cu)
        x2 = x.clone()
        x2[:, 5:12] += 1.0
        y2 = layer(x2, None, cu)
    assert torch.equal(y[:, :5], y2[:, :5]) and torch.equal(y[:, 12:], y2[:, 12:])
    assert not torch.allclose(y[:, 5:12], y2[:, 5:12])


def test_flops_accounting():
    """moh_flops_per_token is full attention; the layer's projection FLOPs match a FLOP counter on both paths."""
    cfg = MoHConfig()
    assert moh_flops_per_token(cfg, 100) == 6.0 * 4 * 64 * 100
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(13))
    counted = {}
    for path in ("reference", "selected"):
        layer = make(num_heads=H, num_kv_heads=HKV, num_shared_heads=1, top_k=2, path=path).train()
        xi = x.clone().requires_grad_(True)
        with FlopCounterMode(display=False) as fc:
            layer(xi).sum().backward()
        mm = sum(v for op, v in fc.get_flop_counts()["Global"].items() if "mm" in str(op) and "bmm" not in str(op))
        counted[path] = mm / 16  # per token
        # hand count, D=16 H=4 Hkv=2 Dh=8, h_s=1 K=2: q 512 + kv 512 + (o + gate) 2*n*128 + routers 16*3 + 16*2
        n = 4 if path == "reference" else 3
        assert layer.projection_flops_per_token() == 6.0 * (512 + 512 + 2 * n * 128 + 48 + 32)
        assert counted[path] == pytest.approx(layer.projection_flops_per_token())
    assert counted["reference"] - counted["selected"] == pytest.approx(6.0 * 2 * 1 * DH * D)
    free = MoHAttention(D, H, HKV, DH, router="param_free", output_gate=False, kernels="torch")
    assert free.projection_flops_per_token(selected=True) == 6.0 * (512 + 512 + 3 * 128)


def test_trains_inside_hybrid_lm():
    """(8) a GH model: AdamW steps lower the loss, the routers get gradients, routing statistics are visible."""
    from lctrain.config import ModelConfig
    from lctrain.layers.routing import routed_layers
    from lctrain.models import HybridLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, layer_pattern="GH")
    model = HybridLM(cfg)
    mixer = model.layers[1].mixer
    assert isinstance(mixer, MoHAttention) and mixer.o_proj.weight.std() < 0.02
    assert [n for n, _ in routed_layers(model)] == ["layers.1.mixer"]
    ids = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        for name in ("router", "mix_router", "q_proj", "o_proj"):
            grad = getattr(mixer, name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, name
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3, losses
    assert float(mixer.routing_stats.calls) == 6 and float(mixer.routing_stats.slots) == 6 * 4 * 23 * 2
    base = HybridLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, layer_pattern="GH"))
    gdn = 18.0 * cfg.gdn.num_heads * cfg.gdn.head_dim * cfg.gdn.head_dim
    n = base.num_params(exclude_embedding=True) + 64 * 32
    assert base.flops_per_token(23) == pytest.approx(6 * n + gdn + 6.0 * 4 * 64 * 23)


@pytest.mark.parametrize("kw,match", [
    ({"num_shared_heads": 4}, r"model\.moh\.num_shared_heads=4.*\[0, model\.moh\.num_heads - 1"),
    ({"num_shared_heads": -1}, r"model\.moh\.num_shared_heads"),
    ({"top_k": 0}, r"model\.moh\.top_k=0.*\[1, "),
    ({"num_shared_heads": 2, "top_k": 3}, r"model\.moh\.top_k=3.*= 2\]"),
    ({"num_kv_heads": 3}, r"model\.moh\.num_kv_heads=3.*divide"),
    ({"head_dim": 15}, r"model\.moh\.head_dim=15.*even"),
    ({"router": "hash"}, r"model\.moh\.router='hash'.*learned, param_free"),
    ({"path": "sparse"}, r"model\.moh\.path='sparse'.*auto, reference, selected"),
    ({"aux_loss_coeff": -0.1}, r"model\.moh\.aux_loss_coeff"),
    ({"num_heads": 0}, r"model\.moh\.num_heads"),
])
def test_bad_configs_name_the_key(kw, match):
    """(9) validate() raises ConfigError naming the key and the allowed values; the layer refuses them too."""
    cfg = MoHConfig(**kw)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()
    with pytest.raises(ConfigError, match=r"MoHAttention\."):
        build_moh(cfg, D, kernels="torch")


def test_context_parallel_checks_delegate_to_attention():
    cfg = MoHConfig(num_heads=6, num_kv_heads=2, num_shared_heads=2, top_k=2)
    cfg.validate()
    cfg.check_context_parallel(cp_degree=2, cp_impl="ulysses", ulysses_degree=2, seq_len=64)
    with pytest.raises(ConfigError, match=r"model\.moh\.num_heads=6 must be divisible by the Ulysses degree 4"):
        cfg.check_context_parallel(cp_degree=4, cp_impl="ulysses", ulysses_degree=4, seq_len=64)
    with pytest.raises(ConfigError, match=r"model\.moh\.num_kv_heads=2 must divide or be divisible"):
        MoHConfig(num_heads=6, num_kv_heads=2).check_context_parallel(cp_degree=3, cp_impl="ulysses",
                                                                      ulysses_degree=3, seq_len=64)
    cfg.check_context_parallel(cp_degree=4, cp_impl="ring", ulysses_degree=1, seq_len=64)
    assert math.isclose(MoHConfig().num_routed_heads, 3)
