"""LoRA-Mixer (routed LoRA experts on mixer projections) against independent references.

References are written here, not taken from the layer: the merged LoRA ``W + s B A`` applied as
one Linear, a per-token Python loop over the top-k experts, the soft mixture
``sum_e softmax(z)_e s_e B_e A_e x`` whose router gradient the straight-through estimator must
reproduce, hand-computed balance / entropy values, and PEFT adapter files written by the tests.
Tolerances: fp32 layers, ``1e-5`` relative RMS error where the reference does the same arithmetic
in another order (``1e-4`` through a whole attention / Gated DeltaNet layer).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lctrain.errors import ConfigError
from lctrain.layers.attention import Attention
from lctrain.layers.gated_deltanet import GatedDeltaNet
from lctrain.layers.lora_mixer import (
    LoRAMixerConfig,
    LoRAMixerLinear,
    apply_lora_mixer,
    install_peft_adapter,
    install_peft_adapters,
    load_peft_adapter,
    map_adapter_module_name,
)

TOL = 1e-5
TOL_LAYER = 1e-4


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
    assert b.abs().max() > 0, f"{what}: reference is all zeros, the comparison would be vacuous"
    err = rel_rms(a, b)
    assert err < tol, f"{what}: relative RMS error {err:.2e} >= {tol:.0e}"


def make_layer(d_in=6, d_out=5, E=2, K=1, r=3, alpha=16.0, bias=True, seed=0, **kw) -> LoRAMixerLinear:
    torch.manual_seed(seed)
    kw.setdefault("balance_coeff", 0.0)
    kw.setdefault("entropy_coeff", 0.0)
    layer = LoRAMixerLinear(nn.Linear(d_in, d_out, bias=bias), E, K, r, alpha, **kw)
    with torch.no_grad():
        if layer.lora_A is not None:
            layer.lora_B.normal_()  # non-zero B: the LoRA path contributes
            layer.lora_A.normal_()
        layer.router.weight.normal_()
    return layer


def forced_input(S: int, d_in: int, seed: int = 1) -> torch.Tensor:
    """Inputs with a constant feature 0 (= 3), the lever the tests use to force the router."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, d_in, generator=g)
    x[:, 0] = 3.0
    return x


def force_router(layer: LoRAMixerLinear, expert: int) -> None:
    """Router rows: small noise, +1 on feature 0 for ``expert`` (logit margin ~3: p of the others ~ 5%)."""
    with torch.no_grad():
        w = 0.1 * torch.randn(layer.num_experts, layer.in_features)
        w[:, 0] = 0.0
        w[expert, 0] = 1.0
        layer.router.weight.copy_(w)


def soft_router_grads(layer, x, G, A_all, B_all, scales):
    """Router gradient and router-path input gradient of the soft form ``sum_e p_e s_e B_e A_e x``.

    Only the router sees ``x`` with gradient (the other uses are detached): this is what the
    straight-through estimator must give the router and add to the input gradient.
    """
    R = layer.router.weight.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    xd = x.detach()
    p = torch.softmax(xr @ R.t(), dim=-1)  # [S, E]
    u = torch.stack([s * (xd @ a.t() @ b.t()) for a, b, s in zip(A_all, B_all, scales)], dim=1)  # [S, E, out]
    y_soft = F.linear(xd, layer.base.weight.detach(), None if layer.base.bias is None else layer.base.bias.detach())
    y_soft = y_soft + (p.unsqueeze(-1) * u).sum(1)
    (y_soft * G).sum().backward()
    return R.grad, xr.grad


def check_forced_expert(layer: LoRAMixerLinear, expert: int, A_e, B_e, s_e: float, A_all, B_all, scales):
    """The layer with every token routed to ``expert`` equals ``W + s_e B_e A_e`` as one Linear (value and grads)."""
    S = 7
    x = forced_input(S, layer.in_features).requires_grad_(True)
    with torch.no_grad():
        logits = x @ layer.router.weight.t()
        assert (logits.argmax(-1) == expert).all(), "test precondition: the router picks the forced expert"
        if layer.num_experts > 1:
            assert torch.softmax(logits, -1)[:, expert].max() < 0.99, "test precondition: soft scores not saturated"
    layer.train()
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    G = torch.randn_like(y)
    (y * G).sum().backward()

    W = layer.base.weight.detach().clone().requires_grad_(True)
    b = layer.base.bias.detach().clone().requires_grad_(True) if layer.base.bias is not None else None
    A = A_e.detach().clone().requires_grad_(True)
    B = B_e.detach().clone().requires_grad_(True)
    xh = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(xh, W + s_e * (B @ A), b)
    (y_ref * G).sum().backward()
    assert_close(y, y_ref, TOL, "output vs merged W + s B A")
    assert_close(layer.base.weight.grad, W.grad, TOL, "grad W")
    if b is not None:
        assert_close(layer.base.bias.grad, b.grad, TOL, "grad bias")
    R_grad, x_router_grad = soft_router_grads(layer, x, G, A_all, B_all, scales)
    if layer.num_experts > 1:
        assert_close(layer.router.weight.grad, R_grad, TOL, "router grad (straight-through) vs soft form")
    else:
        assert layer.router.weight.grad.abs().max() == 0 and R_grad.abs().max() < 1e-6  # p == 1: no gradient
    assert_close(x.grad, xh.grad + x_router_grad, TOL, "input grad (hard path + router path)")
    return A.grad, B.grad


def write_adapter(path: Path, modules: dict, r: int, alpha: float, use_rslora: bool = False, **overrides) -> Path:
    """A PEFT LoRA adapter directory as PEFT's save_pretrained lays it out (safetensors + json)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}), "use_rslora": use_rslora,
        "use_dora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none",
        "modules_to_save": None, "base_model_name_or_path": "toy",
    }
    config.update(overrides)
    (path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for name, (a, b) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


class _Block(nn.Module):
    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer


def toy_stack(cfg: LoRAMixerConfig, n_blocks: int = 2, d: int = 16) -> nn.Module:
    """``root.layers[i].mixer`` (HybridLM's naming) of Attention mixers wrapped by LoRA-Mixer."""
    root = nn.Module()
    root.layers = nn.ModuleList(
        _Block(apply_lora_mixer(Attention(d, 2, 1, 8, output_gate=True, kernels="torch"), cfg)) for _ in range(n_blocks)
    )
    return root


# ------------------------------------------------------------------- (1) one forced expert = merged LoRA
@pytest.mark.parametrize("E", [1, 2, 3])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forced_expert_equals_merged_lora(E, use_rslora):
    r, alpha = 3, 16.0
    layer = make_layer(E=E, K=1, r=r, alpha=alpha, use_rslora=use_rslora)
    expert = E - 1
    force_router(layer, expert)
    s = alpha / math.sqrt(r) if use_rslora else alpha / r
    A_all, B_all = layer.lora_A.detach(), layer.lora_B.detach()
    gA, gB = check_forced_expert(layer, expert, A_all[expert], B_all[expert], s, A_all, B_all, [s] * E)
    assert_close(layer.lora_A.grad[expert], gA, TOL, "grad A of the routed expert")
    assert_close(layer.lora_B.grad[expert], gB, TOL, "grad B of the routed expert")
    others = [e for e in range(E) if e != expert]
    for e in others:  # unselected experts: exactly zero gradient (hard forward)
        assert layer.lora_A.grad[e].abs().max() == 0 and layer.lora_B.grad[e].abs().max() == 0


# ------------------------------------------------------------------- (2) PEFT adapter as a frozen expert
def _adapter_tensors(n_blocks, r_a, d=16, projs=("q_proj", "v_proj"), out=None, seed=3):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in range(n_blocks):
        for p in projs:
            o = out[p] if out else 16
            # small deltas: a saturated attention softmax would make the q/k gradients vanish
            mods[f"model.layers.{i}.self_attn.{p}"] = (0.3 * torch.randn(r_a, d, generator=g),
                                                       0.3 * torch.randn(o, r_a, generator=g))
    return mods


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("r_a", [4, 2])  # 2 < layer r = 4: zero-padded
def test_peft_adapter_single_frozen_expert_equals_merged_attention(tmp_path, use_rslora, r_a):
    alpha = 6.0
    out = {"q_proj": 16, "v_proj": 8}  # Attention(16, heads 2, kv 1, head_dim 8)
    mods = _adapter_tensors(2, r_a, out=out)
    path = write_adapter(tmp_path / "ad", mods, r_a, alpha, use_rslora)
    cfg = LoRAMixerConfig(num_experts=1, top_k=1, r=4, adapters=str(path), balance_coeff=0.0)
    torch.manual_seed(0)
    root = toy_stack(cfg)
    reference = [copy.deepcopy(blk.mixer) for blk in root.layers]  # before install: B of nothing yet
    installed = install_peft_adapters(root, cfg.adapters)
    assert installed[0] == {f"layers.{i}.mixer.{p}": f"model.layers.{i}.self_attn.{p}" for i in range(2)
                            for p in ("q_proj", "v_proj")}
    s = alpha / math.sqrt(r_a) if use_rslora else alpha / r_a  # PEFT's scaling
    # merged reference: plain Attention whose q/v weights are W + s B A (k, o unchanged)
    plain = []
    for i, ref in enumerate(reference):
        att = Attention(16, 2, 1, 8, output_gate=True, kernels="torch")
        sd = {}
        for name, mod in ref.named_children():
            if isinstance(mod, LoRAMixerLinear):
                w = mod.base.weight.detach().clone()
                key = f"model.layers.{i}.self_attn.{name}"
                if key in mods:
                    a, b = mods[key]
                    w = w + s * (b @ a)
                sd[f"{name}.weight"] = w
        sd["g_proj.weight"] = ref.g_proj.weight.detach().clone()
        att.load_state_dict(sd, strict=False)
        plain.append(att)
    x = torch.randn(2, 5, 16, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    h, hr = x, xr
    for blk, att in zip(root.layers, plain):
        blk.mixer.train()
        h = blk.mixer(h)
        hr = att(hr)
    assert_close(h, hr, TOL_LAYER, "two attention blocks with the adapter vs merged weights")
    G = torch.randn_like(h)
    (h * G).sum().backward()
    (hr * G).sum().backward()
    assert_close(x.grad, xr.grad, TOL_LAYER, "input grad")
    for blk, att in zip(root.layers, plain):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert_close(getattr(blk.mixer, name).base.weight.grad, getattr(att, name).weight.grad, TOL_LAYER,
                         f"grad of base {name}")
        names = dict(blk.mixer.named_parameters())
        assert not any("frozen" in n for n in names), "frozen experts must not be parameters"
        assert "q_proj.lora_A" not in names  # num_experts=1 = the adapter: no trainable expert
        assert "q_proj.frozen_A" in blk.mixer.state_dict() and "q_proj.expert_scale" in blk.mixer.state_dict()


def test_peft_adapter_with_trainable_expert_routes_and_st_gradient(tmp_path):
    """Adapter in slot 0 plus 2 trainable experts; router forced to the adapter: merged form + soft router grad."""
    r_a, alpha = 3, 5.0
    mods = _adapter_tensors(2, r_a, out={"q_proj": 16, "v_proj": 8})
    path = write_adapter(tmp_path / "ad", mods, r_a, alpha, use_rslora=True)
    cfg = LoRAMixerConfig(num_experts=3, top_k=1, r=4, lora_alpha=8.0, adapters=str(path), balance_coeff=0.0)
    torch.manual_seed(0)
    root = toy_stack(cfg)
    install_peft_adapter(root, path, 0)
    layer = root.layers[1].mixer.q_proj
    with torch.no_grad():
        layer.lora_B.normal_()
    force_router(layer, 0)
    a, b = mods["model.layers.1.self_attn.q_proj"]
    s_ad, s_tr = alpha / math.sqrt(r_a), 8.0 / 4
    # all experts as the test sees them: adapter zero-padded to rank 4, then the trainable ones
    A_all = [F.pad(a, (0, 0, 0, 1)), *layer.lora_A.detach()]
    B_all = [F.pad(b, (0, 1)), *layer.lora_B.detach()]
    check_forced_expert(layer, 0, a, b, s_ad, A_all, B_all, [s_ad, s_tr, s_tr])
    assert layer.lora_A.grad.abs().max() == 0 and layer.lora_B.grad.abs().max() == 0  # trainable experts unrouted
    # forcing a trainable expert instead: its A/B get the merged-form gradient, the adapter stays as written
    force_router(layer, 2)
    gA, gB = check_forced_expert(layer, 2, layer.lora_A.detach()[1], layer.lora_B.detach()[1], s_tr,
                                 A_all, B_all, [s_ad, s_tr, s_tr])
    assert_close(layer.lora_A.grad[1], gA, TOL, "grad A of trainable expert 2")
    assert_close(layer.lora_B.grad[1], gB, TOL, "grad B of trainable expert 2")
    assert torch.equal(layer.frozen_A[0, :r_a], a) and torch.equal(layer.frozen_B[0, :, :r_a], b)
    assert layer.frozen_A[0, r_a:].abs().max() == 0
    # k_proj is not in the adapter: its frozen slot is a zero expert; o_proj maps fine too
    assert root.layers[0].mixer.k_proj.frozen_B.abs().max() == 0


def test_default_name_map_and_custom_map():
    assert map_adapter_module_name("model.layers.3.self_attn.k_proj") == "layers.3.mixer.k_proj"
    assert map_adapter_module_name("layers.12.self_attn.o_proj") == "layers.12.mixer.o_proj"
    assert map_adapter_module_name("model.layers.3.mlp.gate_proj") is None
    custom = {r"model\.layers\.(\d+)\.linear_attn\.(\w+)": r"layers.\1.mixer.\2"}
    assert map_adapter_module_name("model.layers.0.linear_attn.q_proj", custom) == "layers.0.mixer.q_proj"
    assert map_adapter_module_name("model.layers.0.self_attn.q_proj", custom) is None


# ------------------------------------------------------------------- (3) top-k = per-token loop reference
@pytest.mark.parametrize("K", [1, 2, 3])
def test_topk_equals_per_token_loop(K):
    E, S, d_in, d_out, r, alpha = 4, 9, 6, 5, 3, 4.0
    layer = make_layer(d_in, d_out, E=E, K=K, r=r, alpha=alpha, seed=5)
    s = alpha / r
    g = torch.Generator().manual_seed(7)
    x = torch.randn(S, d_in, generator=g, requires_grad=True)
    layer.train()
    y = layer(x)
    G = torch.randn(S, d_out, generator=g)
    (y * G).sum().backward()

    W = layer.base.weight.detach().double().clone().requires_grad_(True)
    bias = layer.base.bias.detach().double().clone().requires_grad_(True)
    A = layer.lora_A.detach().double().clone().requires_grad_(True)
    B = layer.lora_B.detach().double().clone().requires_grad_(True)
    R = layer.router.weight.detach().double()
    xh = x.detach().double().clone().requires_grad_(True)
    rows, chosen = [], []
    for t in range(S):
        z = [float(R[e] @ xh[t].detach()) for e in range(E)]
        m = max(z)
        ez = [math.exp(v - m) for v in z]
        p = [v / sum(ez) for v in ez]
        top = sorted(range(E), key=lambda e: -p[e])[:K]
        chosen.append(set(top))
        norm = sum(p[e] for e in top)
        row = W @ xh[t] + bias
        for e in top:
            row = row + (p[e] / norm) * s * (B[e] @ (A[e] @ xh[t]))
        rows.append(row)
    y_ref = torch.stack(rows)
    (y_ref * G.double()).sum().backward()
    assert_close(y, y_ref, TOL, f"top-{K} output vs per-token loop")
    assert_close(layer.lora_A.grad, A.grad, TOL, "grad A")
    assert_close(layer.lora_B.grad, B.grad, TOL, "grad B")
    assert_close(layer.base.weight.grad, W.grad, TOL, "grad W")
    assert_close(layer.base.bias.grad, bias.grad, TOL, "grad bias")
    R_grad, x_router = soft_router_grads(layer, x, G, layer.lora_A.detach(), layer.lora_B.detach(), [s] * E)
    assert_close(layer.router.weight.grad, R_grad, TOL, "router grad vs soft form")
    assert_close(x.grad, xh.grad.float() + x_router, TOL, "input grad")

    # hard forward: exactly K experts contribute to each token, and they are the loop's top-K
    base_y = F.linear(x.detach(), layer.base.weight.detach(), layer.base.bias.detach())
    contributes = torch.zeros(S, E, dtype=torch.bool)
    for e in range(E):
        probe = copy.deepcopy(layer)
        with torch.no_grad():
            keep = probe.lora_B[e].clone()
            probe.lora_B.zero_()
            probe.lora_B[e] = keep
            contributes[:, e] = (probe(x.detach()) - base_y).abs().amax(-1) > 0
    assert (contributes.sum(-1) == K).all(), contributes
    for t in range(S):
        assert set(torch.nonzero(contributes[t]).flatten().tolist()) == chosen[t]


# ------------------------------------------------------------------- (4) init and frozen base
def test_zero_init_equals_base_and_train_base_flag():
    torch.manual_seed(0)
    base = nn.Linear(8, 6, bias=True)
    ref = copy.deepcopy(base)
    layer = LoRAMixerLinear(base, num_experts=4, top_k=2, r=4, lora_alpha=8.0)
    assert layer.base is base and layer.weight is base.weight and layer.bias is base.bias
    assert layer.lora_B.abs().max() == 0
    bound = 1 / math.sqrt(8)  # kaiming_uniform(a=sqrt(5)) with fan_in 8
    assert 0 < layer.lora_A.abs().max() <= bound
    x = torch.randn(3, 5, 8)
    for mode in (True, False):
        layer.train(mode)
        assert torch.equal(layer(x), ref(x)), "B = 0: the layer is its base"
    gauss = LoRAMixerLinear(nn.Linear(200, 6), num_experts=2, r=4, init_A="gaussian")
    assert abs(gauss.lora_A.std().item() - 1 / 4) < 0.02  # N(0, 1/r) -> std 0.25

    assert layer.base.weight.requires_grad and layer.base.bias.requires_grad
    frozen = LoRAMixerLinear(copy.deepcopy(ref), num_experts=2, top_k=1, r=2, train_base=False)
    with torch.no_grad():
        frozen.lora_B.normal_()
    assert not frozen.base.weight.requires_grad and not frozen.base.bias.requires_grad
    frozen.train()
    frozen(torch.randn(4, 8)).square().sum().backward()
    assert frozen.base.weight.grad is None and frozen.base.bias.grad is None
    assert frozen.lora_A.grad is not None and frozen.lora_A.grad.abs().max() > 0
    assert frozen.router.weight.grad is not None
    with pytest.raises(TypeError):
        LoRAMixerLinear(nn.Conv1d(2, 2, 1), num_experts=1)
    with pytest.raises(ValueError, match="top_k"):
        LoRAMixerLinear(nn.Linear(2, 2), num_experts=2, top_k=3)


# ------------------------------------------------------------------- (5) balance / entropy terms, stats
def test_balance_entropy_terms_and_routing_stats():
    E, K = 3, 2
    logits = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.5, 0.2, 2.0], [1.0, 0.0, 0.5]]
    top2 = [{0, 1}, {1, 2}, {2, 0}, {0, 2}]  # read off by hand
    counts = [3, 2, 3]
    S = len(logits)
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    f = [c / (S * K) for c in counts]
    P = [sum(probs[t][i] for t in range(S)) / S for i in range(E)]
    balance = E * sum(fi * Pi for fi, Pi in zip(f, P))
    entropy = sum(-sum(p * math.log(p) for p in row) for row in probs) / S

    cb, ce = 0.3, 0.2
    layer = make_layer(d_in=E, d_out=4, E=E, K=K, r=2, balance_coeff=cb, entropy_coeff=ce)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E))  # logits = x
    x = torch.tensor(logits)
    layer.train()
    layer(x)
    st = layer.routing_stats
    assert st.load.tolist() == [float(c) for c in counts]
    assert abs(st.aux_loss.item() - cb * balance) < 1e-6
    assert abs(st.z_loss.item() - ce * entropy) < 1e-6
    assert st.slots.item() == S * K and st.calls.item() == 1
    layer(x)
    assert st.load.tolist() == [2.0 * c for c in counts] and st.calls.item() == 2
    layer.eval()
    layer(x)
    layer.train()
    with torch.no_grad():
        layer(x)
    assert st.calls.item() == 2, "no statistics in eval mode or without grad"
    for t in range(S):
        assert set(torch.topk(torch.tensor(probs[t]), K).indices.tolist()) == top2[t]  # hand reading checked
    layer.after_step(st)  # protocol hook: a no-op

    # gradient injection: router grad = soft-form task grad + aux_loss_scale * d(cb*bal + ce*ent)/dR
    g = torch.Generator().manual_seed(2)
    xin = torch.randn(6, E, generator=g)
    G = torch.randn(6, 4, generator=g)

    def router_grad(layer_, scale, G_):
        layer_.router.weight.grad = None
        layer_.aux_loss_scale = scale
        (layer_(xin) * G_).sum().backward()
        return layer_.router.weight.grad.clone()

    with torch.no_grad():
        layer.router.weight.normal_()
    no_terms = copy.deepcopy(layer)
    no_terms.balance_coeff = no_terms.entropy_coeff = 0.0
    scale = 0.5
    Rr = layer.router.weight.detach().clone().requires_grad_(True)
    p = torch.softmax(xin @ Rr.t(), -1)
    idx = torch.topk(p.detach(), K, -1).indices
    f_t = torch.bincount(idx.flatten(), minlength=E).float() / idx.numel()
    bal_t = E * (f_t * p.mean(0)).sum()
    ent_t = -(p * p.log()).sum(-1).mean()
    (scale * (cb * bal_t + ce * ent_t)).backward()
    aux_ref = Rr.grad
    zero = torch.zeros_like(G)
    assert_close(router_grad(layer, scale, zero), aux_ref, TOL, "injected aux gradient alone (zero task gradient)")
    assert router_grad(no_terms, scale, zero).abs().max() == 0, "coefficients 0: nothing injected"
    task_ref, _ = soft_router_grads(layer, xin, G, layer.lora_A.detach(), layer.lora_B.detach(), [layer.scaling] * E)
    assert_close(router_grad(layer, scale, G), task_ref + aux_ref, TOL, "router grad: task (soft form) + aux")
    assert torch.equal(layer(xin), no_terms(xin)), "aux terms leave the output unchanged"
    assert router_grad(layer, 0.0, zero).abs().max() == 0, "aux_loss_scale 0: no aux gradient"


# ------------------------------------------------------------------- (6) apply_lora_mixer on real mixers
def _train_steps(mixer: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int = 8) -> list[float]:
    opt = torch.optim.AdamW([p for p in mixer.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (mixer(x) - target).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    return losses


@pytest.mark.parametrize("kind", ["attention", "gdn"])
def test_apply_lora_mixer_wraps_targets_keeps_init_and_trains(kind):
    torch.manual_seed(0)
    if kind == "attention":
        mixer = Attention(16, 2, 1, 8, output_gate=True, kernels="torch")
        untouched = ["g_proj"]
    else:
        mixer = GatedDeltaNet(16, 2, 8, conv_size=4, chunk_size=4, kernels="torch")
        untouched = ["g_proj", "a_proj", "b_proj"]
    ref = copy.deepcopy(mixer)
    originals = {n: getattr(mixer, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    cfg = LoRAMixerConfig(num_experts=3, top_k=2, r=4, layers="A,G", balance_coeff=0.01, entropy_coeff=0.01)
    assert apply_lora_mixer(mixer, cfg) is mixer
    for n, orig in originals.items():
        wrapped = getattr(mixer, n)
        assert isinstance(wrapped, LoRAMixerLinear) and wrapped.base is orig
    assert mixer.o_proj.weight is originals["o_proj"].weight  # what HybridLM's init writes to
    for n in untouched:
        assert type(getattr(mixer, n)) is nn.Linear
    wrapped_count = sum(isinstance(m, LoRAMixerLinear) for m in mixer.modules())
    assert wrapped_count == 4
    keys = set(mixer.state_dict())
    for n in originals:
        assert {f"{n}.base.weight", f"{n}.lora_A", f"{n}.lora_B", f"{n}.router.weight", f"{n}.expert_scale"} <= keys
        assert f"{n}.weight" not in keys and f"{n}.frozen_A" not in keys
    x = torch.randn(2, 8, 16)
    mixer.train()
    ref.train()
    assert_close(mixer(x), ref(x), 1e-6, "wrapped mixer at init vs the original")
    target = torch.randn(2, 8, 16) * 0.1
    losses = _train_steps(mixer, x, target)
    assert losses[-1] < 0.9 * losses[0], losses
    for n in originals:
        m = getattr(mixer, n)
        for what, p in (("router", m.router.weight), ("A", m.lora_A), ("B", m.lora_B)):
            assert p.grad is not None and p.grad.abs().max() > 0, f"{n}: no {what} gradient"
        assert m.routing_stats.calls.item() == 1 + 8  # the init comparison and the 8 steps (train mode)


def test_apply_lora_mixer_refusals_and_off():
    att = Attention(16, 2, 1, 8, output_gate=False, kernels="torch")
    assert apply_lora_mixer(att, LoRAMixerConfig(num_experts=0)) is att and type(att.q_proj) is nn.Linear
    with pytest.raises(ConfigError, match=r"no submodule 'g_proj'.*q_proj"):
        apply_lora_mixer(att, LoRAMixerConfig(num_experts=2, target_modules="q_proj,g_proj"))
    assert type(att.q_proj) is nn.Linear, "nothing is wrapped when a target fails"
    with pytest.raises(ConfigError, match="not an nn.Linear"):
        apply_lora_mixer(att, LoRAMixerConfig(num_experts=2, target_modules="rope"))
    apply_lora_mixer(att, LoRAMixerConfig(num_experts=2, target_modules="q_proj"))
    with pytest.raises(ConfigError, match="already a LoRAMixerLinear"):
        apply_lora_mixer(att, LoRAMixerConfig(num_experts=2, target_modules="q_proj"))


def test_config_validate():
    LoRAMixerConfig().validate()
    LoRAMixerConfig(num_experts=4, top_k=2, layers="A,G", adapters="a,b").validate()
    bad = [
        ({"num_experts": -1}, "model.lora_mixer.num_experts"),
        ({"num_experts": 2, "top_k": 3}, "model.lora_mixer.top_k"),
        ({"num_experts": 2, "r": 0}, "model.lora_mixer.r"),
        ({"num_experts": 2, "lora_alpha": 0.0}, "model.lora_mixer.lora_alpha"),
        ({"num_experts": 2, "target_modules": ""}, "model.lora_mixer.target_modules"),
        ({"num_experts": 2, "target_modules": "q_proj,q_proj"}, "model.lora_mixer.target_modules"),
        ({"num_experts": 2, "layers": "A,Z"}, "model.lora_mixer.layers"),
        ({"num_experts": 2, "balance_coeff": -1.0}, "model.lora_mixer.balance_coeff"),
        ({"num_experts": 2, "entropy_coeff": float("nan")}, "model.lora_mixer.entropy_coeff"),
        ({"num_experts": 1, "adapters": "a,b"}, "model.lora_mixer.adapters"),
        ({"num_experts": 0, "adapters": "a"}, "model.lora_mixer.adapters"),
    ]
    for kw, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            LoRAMixerConfig(**kw).validate()
    cfg = LoRAMixerConfig(num_experts=2, layers="A, G")
    assert cfg.applies_to("G") and not cfg.applies_to("L") and not LoRAMixerConfig().applies_to("A")


def test_hybrid_lm_wrapping_init_and_default_peft_mapping(tmp_path):
    """The integration the lead will do, done from outside: wrap each block's mixer, re-init, install an adapter."""
    from lctrain.config import AttentionConfig, GatedDeltaNetConfig, ModelConfig
    from lctrain.models import HybridLM

    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=64, d_model=16, n_layers=2, layer_pattern="GA", kernels="torch",
                                 attn=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=8),
                                 gdn=GatedDeltaNetConfig(num_heads=2, head_dim=8, conv_size=4, chunk_size=4)))
    ids = torch.randint(0, 64, (1, 6))
    before = model(ids)
    cfg = LoRAMixerConfig(num_experts=2, r=4, layers="A,G", adapters="x")
    for block in model.layers:
        if cfg.applies_to(block.kind):
            apply_lora_mixer(block.mixer, cfg)
    assert torch.equal(model(ids), before)
    model.reset_parameters()  # HybridLM writes mixer.o_proj.weight: must reach the base weight, keep B = 0
    std = 0.02 / math.sqrt(2 * 2)
    for block in model.layers:
        o = block.mixer.o_proj
        assert isinstance(o, LoRAMixerLinear) and o.lora_B.abs().max() == 0
        assert abs(o.base.weight.std().item() - std) < 0.5 * std
    mods = {"model.layers.1.self_attn.o_proj": (torch.randn(4, 16), torch.randn(16, 4))}
    got = install_peft_adapter(model, write_adapter(tmp_path / "ad", mods, 4, 8.0), 0)
    assert got == {"layers.1.mixer.o_proj": "model.layers.1.self_attn.o_proj"}
    assert torch.equal(model.layers[1].mixer.o_proj.frozen_A[0], mods["model.layers.1.self_attn.o_proj"][0])
    assert model.layers[1].mixer.o_proj.expert_scale[0].item() == 2.0


def test_recipe_builds_lora_mixer_model_and_loads_adapters_from_config(tmp_path):
    """What a user writes: the recipe wraps A and G projections; model.lora_mixer.adapters installs files."""
    from lctrain.config import load_config
    from lctrain.models import HybridLM

    base = ["recipe=hybrid_gdn_3to1_lora_mixer", "model.vocab_size=64", "model.d_model=16", "model.n_layers=4",
            "model.attn.num_heads=2", "model.attn.num_kv_heads=1", "model.attn.head_dim=8",
            "model.gdn.num_heads=2", "model.gdn.head_dim=8", "model.lora_mixer.r=4"]
    model = HybridLM(load_config(base).model)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRAMixerLinear)}
    assert wrapped == {f"layers.{i}.mixer.{p}" for i in range(4) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    mods = {"model.layers.3.self_attn.q_proj": (torch.randn(4, 16), torch.randn(16, 4))}
    ad = write_adapter(tmp_path / "ad", mods, 4, 8.0)
    cfg = load_config(base + [f"model.lora_mixer.adapters={ad}", "model.lora_mixer.num_experts=5"]).model
    with_adapter = HybridLM(cfg)
    q = with_adapter.layers[3].mixer.q_proj
    assert torch.equal(q.frozen_A[0], mods["model.layers.3.self_attn.q_proj"][0]) and q.lora_A.shape[0] == 4
    ids = torch.randint(0, 64, (1, 12))
    with_adapter(ids).sum().backward()  # trains with the frozen expert in place
    assert q.lora_A.grad is not None and not q.frozen_A.requires_grad


# ------------------------------------------------------------------- (7) PEFT refusals
@pytest.mark.parametrize("override, match", [
    ({"use_dora": True}, "use_dora"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern"),
    ({"bias": "lora_only"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type"),
])
def test_peft_config_refusals(tmp_path, override, match):
    mods = {"model.layers.0.self_attn.q_proj": (torch.randn(2, 16), torch.randn(16, 2))}
    path = write_adapter(tmp_path / "ad", mods, 2, 4.0, **override)
    with pytest.raises(ConfigError, match=match):
        load_peft_adapter(path)


def test_peft_file_and_module_refusals(tmp_path):
    cfg = LoRAMixerConfig(num_experts=2, r=4, adapters="x")
    root = toy_stack(cfg)
    good = {"model.layers.0.self_attn.q_proj": (torch.randn(2, 16), torch.randn(16, 2))}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_peft_adapter(tmp_path / "missing")
    p = write_adapter(tmp_path / "no_weights", good, 2, 4.0)
    (p / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        install_peft_adapter(root, p, 0)
    p = write_adapter(tmp_path / "no_config", good, 2, 4.0)
    (p / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(p)
    unknown = dict(good, **{"model.layers.0.mlp.gate_proj": (torch.randn(2, 16), torch.randn(32, 2))})
    with pytest.raises(ConfigError, match="unknown module 'model.layers.0.mlp.gate_proj'"):
        install_peft_adapter(root, write_adapter(tmp_path / "unknown", unknown, 2, 4.0), 0)
    absent = {"model.layers.5.self_attn.q_proj": (torch.randn(2, 16), torch.randn(16, 2))}
    with pytest.raises(ConfigError, match="not a LoRA-Mixer projection"):
        install_peft_adapter(root, write_adapter(tmp_path / "absent", absent, 2, 4.0), 0)
    big = {"model.layers.0.self_attn.q_proj": (torch.randn(8, 16), torch.randn(16, 8))}
    with pytest.raises(ConfigError, match=r"rank r=8 > model\.lora_mixer\.r=4"):
        install_peft_adapter(root, write_adapter(tmp_path / "big", big, 8, 4.0), 0)
    wrong = {"model.layers.0.self_attn.k_proj": (torch.randn(2, 16), torch.randn(16, 2))}  # k_proj is 16 -> 8
    with pytest.raises(ConfigError, match="16 -> 16 but layers.0.mixer.k_proj is 16 -> 8"):
        install_peft_adapter(root, write_adapter(tmp_path / "wrong", wrong, 2, 4.0), 0)
    with pytest.raises(ConfigError, match="frozen slot 1"):
        install_peft_adapter(root, write_adapter(tmp_path / "ok", good, 2, 4.0), 1)
    mismatch = {"model.layers.0.self_attn.q_proj": (torch.randn(3, 16), torch.randn(16, 3))}
    with pytest.raises(ConfigError, match="r=2 from adapter_config.json"):
        load_peft_adapter(write_adapter(tmp_path / "mismatch", mismatch, 2, 4.0))
    half = tmp_path / "half"
    write_adapter(half, good, 2, 4.0)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 16)},
              str(half / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="needs both lora_A and lora_B"):
        load_peft_adapter(half)
    assert root.layers[0].mixer.q_proj.frozen_A.abs().max() == 0, "failed installs leave the slot untouched"
