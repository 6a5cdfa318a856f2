"""bf16 numerics: each op's torch path in bf16 against its fp32 reference, and a bf16 autocast
training step of a small HybridLM against the same step in fp32.

The op tests feed bf16 q, k, v (fp32 gates, as the layers make them) to the torch paths and
compare with the fp32 reference (``naive.py``) on the same bf16-rounded values upcast, so the
error measured is the bf16 computation's alone. Bounds (relative RMS error):

* outputs <= 4e-3: the torch paths compute in fp32 and round the result to bf16 once (unit
  roundoff 2^-9 = 2e-3; measured 1.6e-3 for Gated DeltaNet, Lightning, MoBA, attention);
* gradients <= 1e-2 (measured 1.5e-3 to 4.6e-3; SDPA's bf16 backward is the largest);
* final recurrent states and MoBA's lse <= 1e-5: they are fp32 (measured 2e-7). A state carried
  in bf16 would be off by ~1e-3, so this is the check that the recurrent state stays fp32.

The model test (``GLMA`` layers: Gated DeltaNet, Lightning, MoBA, softmax attention, MoE FFNs)
runs two AdamW steps under ``torch.autocast(bfloat16)`` and in fp32 from the same weights, on
the ``device`` fixture's device (CPU: the torch paths; CUDA: the Triton kernels of the plan).
Bounds: losses 2e-2 relative, the step-1 gradient of every parameter 0.15 relative RMS and all
gradients together 5e-2 (measured on CPU: losses 1e-4, per parameter at most 6.3e-2 (an MoE
expert's down-projection), all together 8.6e-3).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lctrain.config import ModelConfig
from lctrain.kernels.flash_attn import naive_attention
from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule, naive_recurrent_gated_delta_rule
from lctrain.kernels.lightning_attn import chunk_lightning_attn, naive_recurrent_lightning_attn
from lctrain.kernels.moba import moba_attn_func, moba_attn_naive
from lctrain.kernels.softmax_attn import softmax_attention
from lctrain.layers.attention import AttentionConfig
from lctrain.layers.gated_deltanet import GatedDeltaNetConfig
from lctrain.layers.lightning import LightningConfig
from lctrain.layers.moba import MoBAConfig
from lctrain.layers.moe import MoEConfig
from lctrain.models import HybridLM

TOL_OUT = 4e-3
TOL_GRAD = 1e-2
TOL_FP32 = 1e-5
TOL_LOSS = 2e-2
TOL_PARAM_GRAD = 0.15
TOL_ALL_GRADS = 5e-2


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _bf16_inputs(device, T=256, H=2, Hkv=2, D=64, seed=0):
    """bf16 q [1, T, H, D], k (L2-normalised) and v [1, T, Hkv, D] on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, T, H, D, generator=g, device=device)
    k = F.normalize(torch.randn(1, T, Hkv, D, generator=g, device=device), dim=-1)
    v = torch.randn(1, T, Hkv, D, generator=g, device=device)
    return [x.bfloat16() for x in (q, k, v)], g


def _grads(outs, leaves, seed, device):
    """Gradients of a fixed random projection of every output (upstream in fp32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g, device=device)).sum() for o in outs)
    return torch.autograd.grad(loss, leaves)


def _run(fn, xs, device):
    leaves = [x.detach().requires_grad_() for x in xs]
    outs = fn(*leaves)
    return outs, _grads(outs, leaves, 1, device)


def _check_bf16_against_fp32(fn, ref_fn, xs, device, state_names=()):
    """``fn`` on bf16 ``xs`` vs ``ref_fn`` on their fp32 upcasts; outputs after the first
    ``len(outs) - len(state_names)`` are fp32 states checked at TOL_FP32."""
    outs, grads = _run(fn, xs, device)
    ref_outs, ref_grads = _run(ref_fn, [x.float() for x in xs], device)
    n_low = len(outs) - len(state_names)
    assert outs[0].dtype == torch.bfloat16
    for name, a, b in zip(("out", *state_names), outs, ref_outs):
        tol = TOL_OUT if name == "out" else TOL_FP32
        if name != "out":
            assert a.dtype == torch.float32, f"{name} is {a.dtype}, not fp32"
        assert rel_rms(a, b) <= tol, f"{name}: {rel_rms(a, b):.3g} > {tol}"
    assert n_low == 1
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a.dtype == xs[i].dtype
        assert rel_rms(a, b) <= TOL_GRAD, f"grad {i}: {rel_rms(a, b):.3g} > {TOL_GRAD}"


def test_gated_delta_rule_torch_path_bf16(device):
    (q, k, v), g = _bf16_inputs(device)
    gate = F.logsigmoid(torch.randn(1, 256, 2, generator=g, device=device) + 4.0)  # slow decay: long memory
    beta = torch.sigmoid(torch.randn(1, 256, 2, generator=g, device=device))
    cu = torch.tensor([0, 100, 256], dtype=torch.int32, device=device)

    def fn(q, k, v, gate, beta):
        return chunk_gated_delta_rule(q, k, v, gate, beta, output_final_state=True, cu_seqlens=cu)

    def ref(q, k, v, gate, beta):
        return naive_recurrent_gated_delta_rule(q, k, v, gate, beta, output_final_state=True, cu_seqlens=cu)

    _check_bf16_against_fp32(fn, ref, [q, k, v, gate, beta], device, state_names=("final_state",))


def test_lightning_torch_path_bf16(device):
    (q, k, v), _ = _bf16_inputs(device, seed=1)
    slope = torch.tensor([0.05, 0.5], device=device)

    def fn(q, k, v):
        return chunk_lightning_attn(q, k, v, slope, output_final_state=True)

    def ref(q, k, v):
        return naive_recurrent_lightning_attn(q, k, v, slope, output_final_state=True)

    _check_bf16_against_fp32(fn, ref, [q, k, v], device, state_names=("final_state",))


def test_moba_torch_path_bf16(device):
    (q, k, v), _ = _bf16_inputs(device, Hkv=1, seed=2)

    def fn(q, k, v):
        return moba_attn_func(q, k, v, 64, 2, kernels="torch", return_lse=True)

    def ref(q, k, v):
        return moba_attn_naive(q, k, v, 64, 2)

    _check_bf16_against_fp32(fn, ref, [q, k, v], device, state_names=("lse",))


def test_softmax_attention_torch_path_bf16(device):
    (q, k, v), _ = _bf16_inputs(device, Hkv=1, seed=3)
    cu = torch.tensor([0, 100, 256], dtype=torch.int32, device=device)

    def fn(q, k, v):
        return (softmax_attention(q, k, v, cu_seqlens=cu, kernels="torch"),)

    def ref(q, k, v):
        return (naive_attention(q[0], k[0], v[0], causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)[0][None],)

    _check_bf16_against_fp32(fn, ref, [q, k, v], device)


def _tiny_model(device) -> HybridLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=256, d_model=64, n_layers=4, layer_pattern="GLMA", init_std=0.02,
        attn=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=32),
        gdn=GatedDeltaNetConfig(num_heads=2, head_dim=32),
        lightning=LightningConfig(num_heads=2, head_dim=32),
        moba=MoBAConfig(num_heads=2, num_kv_heads=1, head_dim=32, block_size=32, top_k=2),
        moe=MoEConfig(num_experts=4, top_k=2),
    )  # fmt: skip
    return HybridLM(cfg).to(device)


def _two_steps(model, ids, cu, bf16: bool):
    """Losses of two AdamW steps and the gradients of the first (fp32 parameters throughout)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, grads = [], None
    for step in range(2):
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, cu_seqlens=cu)
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    return losses, grads


def test_model_bf16_autocast_step_matches_fp32(device):
    g = torch.Generator(device=device).manual_seed(5)
    ids = torch.randint(0, 256, (1, 160), generator=g, device=device)
    cu = torch.tensor([0, 70, 160], dtype=torch.int32, device=device)
    model = _tiny_model(device)
    ref_model = _tiny_model(device)
    ref_model.load_state_dict(model.state_dict())
    losses, grads = _two_steps(model, ids, cu, bf16=True)
    ref_losses, ref_grads = _two_steps(ref_model, ids, cu, bf16=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: fp32 parameters
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= TOL_LOSS * abs(b), (losses, ref_losses)
    assert grads.keys() == ref_grads.keys() and len(grads) > 20
    errs = {n: rel_rms(grads[n], ref_grads[n]) for n in grads}
    bad = {n: e for n, e in errs.items() if e > TOL_PARAM_GRAD}
    assert not bad, bad
    flat = torch.cat([grads[n].flatten() for n in grads])
    ref_flat = torch.cat([ref_grads[n].flatten() for n in grads])
    assert rel_rms(flat, ref_flat) <= TOL_ALL_GRADS
