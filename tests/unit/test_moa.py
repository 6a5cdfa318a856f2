"""Mixture of attention experts (lctrain.layers.moa): top-k MoA and BAM soft mixing.

References are written here and share no code with the layer: an fp64 per-expert loop (its own
RoPE, ``F.scaled_dot_product_attention`` per expert, explicit gates) over the layer's own
parameter tensors, so autograd gives reference gradients for the same leaves; the dense
:class:`lctrain.layers.attention.Attention` for the identities (identical experts, N = 1);
hand formulas for the router losses. Errors are relative (``|a - b| / |b|``) and stated per
assertion: fp32 layer against an fp64 reference, 1e-5.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lctrain.errors import ConfigError
from lctrain.layers.attention import Attention
from lctrain.layers.moa import MoAConfig, MoAttention, build_moa, moa_flops_per_token
from lctrain.layers.registry import get_mixer

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rope_ref(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of ``x [B,T,H,Dh]`` at ``pos [B,T]``: pair (x1[i], x2[i]) by angle pos * theta^(-2i/Dh)."""
    Dh = x.shape[-1]
    half = Dh // 2
    inv = theta ** (-(2.0 * torch.arange(half, dtype=torch.float64)) / Dh)
    ang = pos.double()[..., None, None] * inv  # [B,T,1,half]
    c, s = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def select_ref(p: torch.Tensor, k: int) -> list[list[int]]:
    """Top-k experts per token by a Python sort on (-p, index): ties to the lower expert index."""
    return [sorted(range(p.shape[1]), key=lambda e: (-float(p[s, e]), e))[:k] for s in range(p.shape[0])]


def reference(m: MoAttention, x: torch.Tensor, pos: torch.Tensor | None = None, with_losses: bool = False):
    """fp64 per-expert loop on ``m``'s parameters: ``y = sum_e gate_e * W_o^e attn_e(x)``.

    Returns ``y`` or ``(y, aux, z, selected)`` with the unweighted balance and z losses.
    """
    c = m.cfg
    N, Hq, Hkv, Dh = c.num_experts, c.heads_per_expert, c.num_kv_heads_per_expert, c.head_dim
    shared = c.routing == "topk" or c.shared_kv
    B, T, D = x.shape
    if pos is None:
        pos = torch.arange(T).expand(B, T)
    xd = x.double()
    logits = xd.reshape(-1, D) @ m.router.weight.double().t()  # [S, N]
    p = torch.softmax(logits, -1)
    if c.routing == "topk":
        sel = select_ref(p.detach(), c.top_k)
        mask = torch.zeros(B * T, N, dtype=torch.float64)
        for s, experts in enumerate(sel):
            mask[s, experts] = 1.0
        gate = p * mask
    else:
        sel = [[int(p[s].argmax())] for s in range(B * T)]
        gate = p
    gate = gate.view(B, T, N)
    Wq, Wk, Wv, Wo = (getattr(m, n).weight.double() for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    Wg = m.g_proj.weight.double() if m.g_proj is not None else None
    nq, nkv = Hq * Dh, Hkv * Dh
    y = torch.zeros(B, T, D, dtype=torch.float64)
    for e in range(N):
        q = (xd @ Wq[e * nq:(e + 1) * nq].t()).view(B, T, Hq, Dh)
        kv_rows = slice(0, nkv) if shared else slice(e * nkv, (e + 1) * nkv)
        k = (xd @ Wk[kv_rows].t()).view(B, T, Hkv, Dh)
        v = (xd @ Wv[kv_rows].t()).view(B, T, Hkv, Dh)
        q, k = rope_ref(q, pos, c.rope_theta), rope_ref(k, pos, c.rope_theta)
        k, v = k.repeat_interleave(Hq // Hkv, dim=2), v.repeat_interleave(Hq // Hkv, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        o = o.transpose(1, 2)
        if Wg is not None:
            o = o * torch.sigmoid(xd @ Wg[e * nq:(e + 1) * nq].t()).view(B, T, Hq, Dh)
        y = y + gate[..., e:e + 1] * (o.reshape(B, T, nq) @ Wo[:, e * nq:(e + 1) * nq].t())
    if not with_losses:
        return y
    S, K = B * T, len(sel[0])
    counts = torch.zeros(N, dtype=torch.float64)
    for experts in sel:
        for e in experts:
            counts[e] += 1
    f = counts / (S * K)
    P = p.mean(0)
    aux = N * (f * P).sum()  # Switch eq. 4-6, top-k form
    z = (torch.logsumexp(logits, -1) ** 2).mean()  # ST-MoE eq. 5
    return y, aux, z, sel


def grads(fn, x: torch.Tensor, params: list[torch.Tensor], cot: torch.Tensor):
    """Output of ``fn(x)`` and the gradients of ``<fn(x), cot>`` (+ any loss ``fn`` adds) w.r.t. x and params."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    loss = out[1] if isinstance(out, tuple) else (out * cot).sum()
    y = out[0] if isinstance(out, tuple) else out
    g = torch.autograd.grad(loss, [x, *params])
    return y.detach(), g


def randomise(m: MoAttention, seed: int, router_std: float = 0.5) -> MoAttention:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            std = router_std if name.startswith("router") else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


def make(seed: int = 0, D: int = 16, **kw) -> MoAttention:
    kw.setdefault("head_dim", 8)
    torch.manual_seed(seed)
    return randomise(MoAttention(D, MoAConfig(**kw), kernels="torch"), seed)


def xin(B, T, D, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


TOPK_SHAPES = [
    {"num_experts": 4, "top_k": 2, "heads_per_expert": 1, "num_kv_heads_per_expert": 1},  # the MoA paper's layout
    {"num_experts": 3, "top_k": 1, "heads_per_expert": 4, "num_kv_heads_per_expert": 2, "output_gate": True},
]


# ---------------------------------------------------------------- (2) top-k MoA against the per-expert loop
@pytest.mark.parametrize("shape", TOPK_SHAPES)
def test_topk_matches_per_expert_loop_outputs_and_all_gradients(shape):
    m = make(0, routing="topk", **shape).eval()
    x = xin(2, 9, 16)
    cot = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2))
    params = list(m.parameters())
    y, g = grads(lambda t: m(t), x, params, cot)
    y_ref, g_ref = grads(lambda t: reference(m, t), x, params, cot)
    assert rel_err(y, y_ref) < TOL
    names = ["x"] + [n for n, _ in m.named_parameters()]
    assert "router.weight" in names
    for name, a, b in zip(names, g, g_ref, strict=True):
        assert b.abs().sum() > 0, name  # every gradient is exercised (all experts selected by someone)
        assert rel_err(a, b) < TOL, name


@pytest.mark.parametrize("routing", ["topk", "soft"])
def test_training_losses_reach_the_router_through_the_scaler(routing):
    # train mode: the layer's backward adds aux_loss_scale * (c_aux * aux + c_z * z) (hand formulas) to the loss
    m = make(3, routing=routing, num_experts=4, top_k=2, aux_loss_coeff=0.3, z_loss_coeff=0.2).train()
    m.aux_loss_scale = 0.5
    x = xin(2, 7, 16, seed=4)
    cot = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(5))
    params = list(m.parameters())

    def ref(t):
        y, aux, z, _ = reference(m, t, with_losses=True)
        return y, (y * cot).sum() + 0.5 * (0.3 * aux + 0.2 * z)

    y, g = grads(lambda t: m(t), x, params, cot)
    y_ref, g_ref = grads(ref, x, params, cot)
    assert rel_err(y, y_ref) < TOL
    for name, a, b in zip(["x"] + [n for n, _ in m.named_parameters()], g, g_ref, strict=True):
        assert rel_err(a, b) < TOL, name
    # the losses are what changes the router gradient: without them it differs
    m.aux_loss_scale = 0.0
    _, g0 = grads(lambda t: m(t), x, params, cot)
    router = [n for n, _ in m.named_parameters()].index("router.weight") + 1
    assert rel_err(g0[router], g_ref[router]) > 1e-3


# ---------------------------------------------------------------- (1) identical experts = the dense layer
@pytest.mark.parametrize("shared_kv", [False, True])
@pytest.mark.parametrize("gate", [False, True])
def test_soft_identical_experts_equal_the_dense_attention(shared_kv, gate):
    torch.manual_seed(0)
    D = 16
    dense = Attention(D, num_heads=4, num_kv_heads=2, head_dim=8, output_gate=gate, kernels="torch")
    m = randomise(MoAttention(D, MoAConfig(num_experts=3, routing="soft", shared_kv=shared_kv, heads_per_expert=4,
                                           num_kv_heads_per_expert=2, head_dim=8, output_gate=gate),
                              kernels="torch"), 7, router_std=1.0).eval()
    for e in range(3):
        m.load_dense_expert(e, dense.state_dict())
    x = xin(2, 9, D, seed=3)
    p = torch.softmax(x.reshape(-1, D) @ m.router.weight.t(), -1)
    assert float(p.detach().max() - p.detach().min()) > 0.3  # the gate is far from uniform: only sum_e p_e = 1 makes this hold
    cot = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(4))
    y, (gx,) = grads(lambda t: m(t), x, [], cot)
    y_ref, (gx_ref,) = grads(lambda t: dense(t), x, [], cot)
    assert rel_err(y, y_ref) < TOL
    # x's gradient: the router path contributes sum_e dp_e * y_dense = 0 (the experts are identical)
    assert rel_err(gx, gx_ref) < TOL
    # and against the per-expert loop, all parameter gradients (the router's is ~0 here)
    params = list(m.parameters())
    _, g = grads(lambda t: m(t), x, params, cot)
    _, g_ref = grads(lambda t: reference(m, t), x, params, cot)
    for name, a, b in zip(["x"] + [n for n, _ in m.named_parameters()], g, g_ref, strict=True):
        if name == "router.weight":
            assert float(a.abs().max()) < 1e-5 * float(g_ref[0].abs().max()) + 1e-6
        else:
            assert rel_err(a, b) < TOL, name


@pytest.mark.parametrize("shape", [{"shared_kv": False, "num_kv_heads_per_expert": 2},
                                   {"shared_kv": True, "num_kv_heads_per_expert": 2},
                                   {"shared_kv": True, "num_kv_heads_per_expert": 1}])
def test_soft_matches_per_expert_loop_all_gradients(shape):
    m = make(5, routing="soft", num_experts=3, heads_per_expert=4, **shape).eval()
    x = xin(2, 9, 16, seed=6)
    cot = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(7))
    params = list(m.parameters())
    y, g = grads(lambda t: m(t), x, params, cot)
    y_ref, g_ref = grads(lambda t: reference(m, t), x, params, cot)
    assert rel_err(y, y_ref) < TOL
    for name, a, b in zip(["x"] + [n for n, _ in m.named_parameters()], g, g_ref, strict=True):
        assert b.abs().sum() > 0, name
        assert rel_err(a, b) < TOL, name


# ---------------------------------------------------------------- (3) one shared-KV expert = MQA
@pytest.mark.parametrize("routing", ["soft", "topk"])
def test_single_shared_kv_expert_is_multi_query_attention(routing):
    torch.manual_seed(0)
    D = 16
    mqa = Attention(D, num_heads=2, num_kv_heads=1, head_dim=8, output_gate=False, kernels="torch")
    m = MoAttention(D, MoAConfig(num_experts=1, top_k=1, routing=routing, shared_kv=True, heads_per_expert=2,
                                 num_kv_heads_per_expert=1, head_dim=8), kernels="torch").eval()
    with torch.no_grad():
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(m, n).weight.copy_(getattr(mqa, n).weight)
        m.router.weight.normal_()
    x = xin(2, 9, D, seed=8)
    cot = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(9))
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    y, g = grads(lambda t: m(t), x, [getattr(m, n).weight for n in names] + [m.router.weight], cot)
    y_ref, g_ref = grads(lambda t: mqa(t), x, [getattr(mqa, n).weight for n in names], cot)
    assert rel_err(y, y_ref) < TOL
    for name, a, b in zip(("x", *names), g, g_ref):
        assert rel_err(a, b) < TOL, name
    assert float(g[-1].abs().max()) == 0.0  # softmax over one expert is constant 1


# ---------------------------------------------------------------- (4) router init, ties, losses, statistics
def test_zero_init_router_uniform_probs_deterministic_ties_losses_and_stats():
    N, K, D = 4, 2, 16
    m = MoAttention(D, MoAConfig(num_experts=N, top_k=K, head_dim=8), kernels="torch")
    assert torch.count_nonzero(m.router.weight) == 0
    x = xin(2, 5, D, seed=10)
    S = 10
    logits, probs, gate, sel = m.route(x)
    assert logits.dtype == probs.dtype == torch.float32
    assert torch.equal(probs, torch.full((S, N), 0.25))
    assert sel.tolist() == [[0, 1]] * S  # all tied: the lower expert indices, every time
    assert m.route(x)[3].tolist() == sel.tolist()
    assert torch.equal(gate, torch.tensor([[0.25, 0.25, 0.0, 0.0]] * S))  # not renormalised to 1/2
    # the output is the loop reference with experts 0, 1 at weight 1/4 each
    m.train()
    y = m(x)
    with torch.no_grad():
        assert rel_err(y, reference(m, x)) < TOL
    st = m.routing_stats
    assert st.load.tolist() == [S, S, 0, 0]
    assert float(st.slots) == S * K and float(st.calls) == 1
    # hand values: f = [1/2, 1/2, 0, 0], P = 1/4 each -> N * sum f P = 1; z = (log N)^2
    assert float(st.aux_loss) == pytest.approx(0.01 * 1.0, rel=1e-6)
    assert float(st.z_loss) == pytest.approx(0.001 * math.log(4) ** 2, rel=1e-6)
    m(x)
    assert st.load.tolist() == [2 * S, 2 * S, 0, 0] and float(st.calls) == 2
    with torch.no_grad():  # no statistics without grad (evaluation under no_grad)
        m(x)
    m.eval()
    m(x)
    assert float(st.calls) == 2
    st.reset()
    m.after_step(st)  # the routed-layer hook exists and changes nothing
    assert torch.count_nonzero(m.router.weight) == 0


@pytest.mark.parametrize("routing", ["topk", "soft"])
def test_losses_and_stats_match_hand_formulas_with_a_trained_router(routing):
    m = make(11, routing=routing, num_experts=4, top_k=2).train()
    x = xin(3, 5, 16, seed=12)
    m(x)
    with torch.no_grad():
        _, aux, z, sel = reference(m, x, with_losses=True)
    counts = [sum(e in s for s in sel) for e in range(4)]
    st = m.routing_stats
    assert st.load.tolist() == counts
    assert float(st.slots) == 15 * (2 if routing == "topk" else 1)
    assert float(st.aux_loss) == pytest.approx(0.01 * float(aux), rel=1e-5)
    assert float(st.z_loss) == pytest.approx(0.001 * float(z), rel=1e-5)
    if routing == "soft":  # zero router: argmax on ties is expert 0; f = [1,0,0,0], P = 1/4 -> aux = 1
        s = MoAttention(16, MoAConfig(routing="soft", head_dim=8), kernels="torch").train()
        s(x)
        assert s.routing_stats.load.tolist() == [15, 0, 0, 0]
        assert float(s.routing_stats.aux_loss) == pytest.approx(0.01, rel=1e-6)


# ---------------------------------------------------------------- (5) packed documents
@pytest.mark.parametrize("cfg", [{"routing": "topk", "num_experts": 4, "top_k": 2},
                                 {"routing": "soft", "num_experts": 3, "heads_per_expert": 2, "num_kv_heads_per_expert": 1},
                                 {"routing": "soft", "shared_kv": True, "num_experts": 2, "heads_per_expert": 4,
                                      "num_kv_heads_per_expert": 2}])
def test_packed_documents_equal_separate_documents(cfg):
    m = make(13, **cfg).eval()
    bounds = [0, 3, 8, 13]  # odd lengths 3, 5, 5
    cu = torch.tensor(bounds, dtype=torch.int32)
    x = xin(1, 13, 16, seed=14)
    cot = torch.randn(1, 13, 16, generator=torch.Generator().manual_seed(15))
    params = list(m.parameters())

    def per_doc(t):  # reference loop on each document alone (positions restart at 0)
        return torch.cat([reference(m, t[:, s:e]) for s, e in itertools.pairwise(bounds)], dim=1)

    y, g = grads(lambda t: m(t, None, cu), x, params, cot)
    y_ref, g_ref = grads(per_doc, x, params, cot)
    assert rel_err(y, y_ref) < TOL
    for name, a, b in zip(["x"] + [n for n, _ in m.named_parameters()], g, g_ref, strict=True):
        assert rel_err(a, b) < TOL, name
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    assert rel_err(m(x, pos, cu), y_ref) < TOL
    # without cu_seqlens the documents would see each other
    assert rel_err(m(x), y_ref) > 1e-2


# ---------------------------------------------------------------- (6) BAM: dense layers into experts
@pytest.mark.parametrize("shared_kv", [False, True])
def test_load_dense_expert_copies_exactly_and_one_hot_gate_gives_the_dense_layer(shared_kv):
    torch.manual_seed(0)
    D, N = 16, 3
    denses = [Attention(D, num_heads=2, num_kv_heads=1, head_dim=8, output_gate=True, kernels="torch")
              for _ in range(N)]
    if shared_kv:  # the dense layers share k/v (one shared K/V projection can hold only one)
        for d in denses[1:]:
            d.load_state_dict({**d.state_dict(), "k_proj.weight": denses[0].k_proj.weight,
                               "v_proj.weight": denses[0].v_proj.weight})
    m = MoAttention(D, MoAConfig(num_experts=N, routing="soft", shared_kv=shared_kv, heads_per_expert=2,
                                 num_kv_heads_per_expert=1, head_dim=8, output_gate=True), kernels="torch").eval()
    for e, d in enumerate(denses):
        m.load_dense_expert(e, d.state_dict())
    # the documented slices hold each dense layer's weights bit for bit
    nq = 2 * 8
    for e, d in enumerate(denses):
        assert torch.equal(m.q_proj.weight[e * nq:(e + 1) * nq], d.q_proj.weight)
        assert torch.equal(m.g_proj.weight[e * nq:(e + 1) * nq], d.g_proj.weight)
        assert torch.equal(m.o_proj.weight[:, e * nq:(e + 1) * nq], d.o_proj.weight)
        kv = slice(0, 8) if shared_kv else slice(e * 8, (e + 1) * 8)
        assert torch.equal(m.k_proj.weight[kv], d.k_proj.weight)
        assert torch.equal(m.v_proj.weight[kv], d.v_proj.weight)
        for key, w in m.expert_weights(e).items():
            assert torch.equal(w, d.state_dict()[key]), key
    assert m.k_proj.weight.shape[0] == (8 if shared_kv else N * 8)
    # one-hot gate on expert e: x[..., 0] = 1 and router row e = 200 * e_0 -> p_e = 1 (others exp(-200) = 0)
    x = xin(2, 7, D, seed=16)
    x[..., 0] = 1.0
    for e, d in enumerate(denses):
        with torch.no_grad():
            m.router.weight.zero_()
            m.router.weight[e, 0] = 200.0
            assert rel_err(m(x), d(x)) < 1e-6, e
            assert rel_err(m(x), denses[(e + 1) % N](x)) > 1e-2
    # load_kv=False leaves the shared projections alone; mismatches are refused with names
    if shared_kv:
        other = Attention(D, num_heads=2, num_kv_heads=1, head_dim=8, output_gate=True, kernels="torch")
        before = m.k_proj.weight.clone()
        m.load_dense_expert(1, other.state_dict(), load_kv=False)
        assert torch.equal(m.k_proj.weight, before)
        assert torch.equal(m.q_proj.weight[nq:2 * nq], other.q_proj.weight)
    ungated = Attention(D, num_heads=2, num_kv_heads=1, head_dim=8, output_gate=False, kernels="torch")
    with pytest.raises(ValueError, match="missing \\['g_proj.weight'\\]"):
        m.load_dense_expert(0, ungated.state_dict())
    wide = Attention(D, num_heads=4, num_kv_heads=1, head_dim=8, output_gate=True, kernels="torch")
    with pytest.raises(ValueError, match="q_proj.weight has shape \\(32, 16\\)"):
        m.load_dense_expert(0, wide)
    with pytest.raises(IndexError, match="num_experts=3"):
        m.load_dense_expert(3, denses[0].state_dict())


# ---------------------------------------------------------------- the op seam
@pytest.mark.parametrize("cfg,kv_heads", [({"routing": "topk", "num_experts": 4, "heads_per_expert": 1}, 1),
                                          ({"routing": "soft", "num_experts": 3, "heads_per_expert": 2,
                                                "num_kv_heads_per_expert": 2}, 6)])
def test_attention_runs_once_through_the_swappable_op(cfg, kv_heads):
    m = make(17, **cfg).eval()
    calls = []
    inner = m.attn_op

    def spy(q, k, v, cu_seqlens=None, scale=None):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return inner(q, k, v, cu_seqlens, scale)

    m.attn_op = spy
    m(xin(2, 5, 16))
    hq = cfg["num_experts"] * cfg["heads_per_expert"]
    assert calls == [((2, 5, hq, 8), (2, 5, kv_heads, 8), (2, 5, kv_heads, 8))]


# ---------------------------------------------------------------- (7) inside HybridLM
@pytest.mark.parametrize("routing", ["topk", "soft"])
def test_trains_inside_hybrid_lm(routing):
    from lctrain.config import ModelConfig
    from lctrain.models import HybridLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, layer_pattern="GE")
    if routing == "soft":
        cfg.moa = MoAConfig(routing="soft", shared_kv=False, heads_per_expert=2, num_kv_heads_per_expert=1)
    else:
        assert cfg.moa == MoAConfig()  # the section's defaults
    model = HybridLM(cfg)
    mixer = model.layers[1].mixer
    assert get_mixer("E").build is build_moa  # the registered entry
    assert isinstance(mixer, MoAttention) and mixer.routing == routing
    assert torch.count_nonzero(mixer.router.weight) == 0  # the zero init survives the model's init
    assert mixer.o_proj.weight.std() < 0.02  # residual-branch init like every registered mixer
    ids = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert mixer.router.weight.grad is not None and mixer.router.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3, losses
    assert torch.count_nonzero(mixer.router.weight) > 0
    assert float(mixer.routing_stats.calls) == 8
    # FLOPs: 6 * (N * Hq) * Dh * T by hand (all experts' heads are computed)
    hq = 4 * (2 if routing == "soft" else 1)
    assert get_mixer("E").flops_per_token(mixer.cfg, 23) == 6.0 * hq * 64 * 23


# ---------------------------------------------------------------- (8) bad configs and CP layouts
@pytest.mark.parametrize("kw,match", [
    ({"routing": "sparse"}, r"model\.moa\.routing='sparse'.*topk, soft"),
    ({"num_experts": 0}, r"model\.moa\.num_experts"),
    ({"top_k": 5}, r"model\.moa\.top_k=5.*\[1, model\.moa\.num_experts=4\]"),
    ({"top_k": 0}, r"model\.moa\.top_k"),
    ({"heads_per_expert": 3, "num_kv_heads_per_expert": 2}, r"model\.moa\.num_kv_heads_per_expert=2.*divide"),
    ({"head_dim": 15}, r"model\.moa\.head_dim=15.*even"),
    ({"head_dim": 0}, r"model\.moa\.head_dim"),
    ({"rope_theta": 0.0}, r"model\.moa\.rope_theta"),
    ({"aux_loss_coeff": -0.1}, r"model\.moa\.aux_loss_coeff"),
    ({"z_loss_coeff": -1.0}, r"model\.moa\.z_loss_coeff"),
])
def test_bad_configs_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        MoAConfig(**kw).validate()
    with pytest.raises(ConfigError, match=match):
        build_moa(MoAConfig(**kw), 16, kernels="torch")


def test_soft_mode_ignores_top_k_and_topk_mode_ignores_shared_kv():
    MoAConfig(routing="soft", num_experts=2, top_k=9).validate()
    m = MoAttention(16, MoAConfig(routing="topk", shared_kv=False, head_dim=8), kernels="torch")
    assert m.k_proj.weight.shape == (8, 16)  # one shared K/V head regardless


def test_ulysses_rule_names_ring():
    topk = MoAConfig()  # N=4 experts x 1 head, one shared K/V head
    for U in (1, 2, 4):
        topk.check_context_parallel(cp_degree=U, cp_impl="ulysses", ulysses_degree=U, seq_len=64)
    for U in (3, 8):
        with pytest.raises(ConfigError, match=r"model\.moa.*4 \* 1 = 4.*parallel\.cp_impl=ring"):
            topk.check_context_parallel(cp_degree=U, cp_impl="ulysses", ulysses_degree=U, seq_len=96)
    full = MoAConfig(routing="soft", num_experts=3, heads_per_expert=2, num_kv_heads_per_expert=1)  # 6 q, 3 kv
    full.check_context_parallel(cp_degree=6, cp_impl="ulysses", ulysses_degree=6, seq_len=96)
    full.check_context_parallel(cp_degree=3, cp_impl="ulysses", ulysses_degree=3, seq_len=96)
    with pytest.raises(ConfigError, match=r"3 K/V heads.*Ulysses degree 2.*parallel\.cp_impl=ring"):
        full.check_context_parallel(cp_degree=2, cp_impl="ulysses", ulysses_degree=2, seq_len=96)
    shared = MoAConfig(routing="soft", shared_kv=True, num_experts=3, heads_per_expert=2, num_kv_heads_per_expert=1)
    shared.check_context_parallel(cp_degree=2, cp_impl="ulysses", ulysses_degree=2, seq_len=96)  # 1 kv: replicated


def test_config_layout_check_reaches_the_section():
    from lctrain.config import ModelConfig, check_mixers_context_parallel

    m = ModelConfig(vocab_size=64, d_model=32, n_layers=2, layer_pattern="GE")
    check_mixers_context_parallel(m, 8, "ring", 1, 64)
    with pytest.raises(ConfigError, match=r"model\.moa.*parallel\.cp_impl=ring"):
        check_mixers_context_parallel(m, 8, "ulysses", 1, 64)
