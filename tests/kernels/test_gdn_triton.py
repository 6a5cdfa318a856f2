"""Triton gated delta rule (chunked fwd + bwd, fused recurrent) against the fp32 naive reference.

Runs under the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported) and natively on CUDA. Every comparison uses the relative RMS error
``rms(a - b) / rms(b)`` of the output, the final state and the gradients of q, k, v, g, beta and
initial_state (the loss is a fixed random projection of (o, final_state)).

Tolerances (fp32 inputs, IEEE fp32 dots; measured worst case ~1e-6, except dg under strong decay
~1e-4 because the within-chunk cumulative decay is fp32 where the reference accumulates per token):
    TOL = 2e-5          outputs, states and all gradients
    TOL_STRONG_DG = 1e-3   dg with g in [-20, -5] (|gamma| up to 1280: fp32 spacing 1.2e-4)
    TOL_MODEL = 1e-4    relative difference of the training losses (3 steps) triton vs torch path
    TOL_BF16 = 2e-2     bf16 inputs on CUDA vs the fp32 torch chunk path (CUDA only; not run here)
    TOL_HALF = 3e-3     fp16 inputs (fp16 dot operands and intermediates) vs the fp32 reference
                        (measured 5e-4)
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from lctrain.kernels.gated_delta_rule import (
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_triton,
    fused_recurrent_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)

TOL = 2e-5
TOL_STRONG_DG = 1e-3
TOL_MODEL = 1e-4
TOL_HALF = 3e-3
TOL_BF16 = 2e-2


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make_case(B, T, H, K, V, HV=None, decay="normal", N=None, h0=True, seed=0, *, device):
    """fp32 leaves q, k (L2-normalised) [B, T, H, K], v [B, T, HV, V], g, beta [B, T, HV]
    (+ initial_state [N, HV, K, V]) and the loss weights (o's and the final state's shapes), on ``device``."""
    HV = HV or H
    N = N or B
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    q = randn(B, T, H, K)
    k = F.normalize(randn(B, T, H, K), dim=-1)
    v = randn(B, T, HV, V)
    if decay == "zero":
        g = torch.zeros(B, T, HV, device=device)
    elif decay == "normal":
        g = F.logsigmoid(randn(B, T, HV) + 2.0)
    elif decay == "strong":
        g = -(5.0 + 15.0 * torch.rand(B, T, HV, generator=gen, device=device))  # g in [-20, -5]
    else:
        raise AssertionError(decay)
    beta = torch.sigmoid(randn(B, T, HV))
    leaves = [q, k, v, g, beta] + ([randn(N, HV, K, V)] if h0 else [])
    weights = (randn(B, T, HV, V), randn(N, HV, K, V))
    return leaves, weights


def run(fn, leaves, weights, **kw):
    """Output, final state and gradients of every leaf (on the leaves' device)."""
    xs = [x.detach().requires_grad_() for x in leaves]
    h0 = xs[5] if len(xs) > 5 else None
    o, s = fn(*xs[:5], initial_state=h0, output_final_state=True, **kw)
    loss = (o * weights[0]).sum() + (s * weights[1]).sum()
    grads = torch.autograd.grad(loss, xs)
    return o.detach(), s.detach(), list(grads)


NAMES = ["dq", "dk", "dv", "dg", "dbeta", "dh0"]


def check_against_naive(leaves, weights, tol_dg=TOL, **kw):
    o, s, grads = run(chunk_gated_delta_rule_triton, leaves, weights, **kw)
    o_ref, s_ref, grads_ref = run(naive_recurrent_gated_delta_rule, leaves, weights, **kw)
    errs = {"o": rel_rms(o, o_ref), "final_state": rel_rms(s, s_ref)}
    errs.update({n: rel_rms(a, b) for n, a, b in zip(NAMES, grads, grads_ref)})
    for name, err in errs.items():
        assert err < (tol_dg if name == "dg" else TOL), f"{name}: rel RMS {err:.2e} ({errs})"
    return errs


@pytest.mark.parametrize(
    "B,T,H,K,V,decay",
    [
        (2, 63, 2, 32, 32, "normal"),  # one partial chunk, batch of 2
        (1, 100, 2, 64, 32, "normal"),  # head dim 64, chunk + partial chunk
        (1, 100, 1, 32, 64, "zero"),  # no decay at all (pure delta rule)
    ],
)
def test_chunk_matches_naive(B, T, H, K, V, decay, device):
    leaves, weights = make_case(B, T, H, K, V, decay=decay, device=device)
    check_against_naive(leaves, weights)


def test_varlen_strong_decay_grouped_value_heads(device):
    """T=200 packed into 4 documents (one empty, one of 2.5 chunks), HV = 2 * H, strong decay.

    (T=257 and more documents: the slow sweep and test_varlen_many_docs_matches_torch_chunk_path.)
    """
    cu = torch.tensor([0, 30, 30, 190, 200], dtype=torch.int32, device=device)
    leaves, weights = make_case(1, 200, 1, 32, 32, HV=2, decay="strong", N=4, device=device)
    check_against_naive(leaves, weights, tol_dg=TOL_STRONG_DG, cu_seqlens=cu)


def test_no_initial_state_and_qk_l2norm(device):
    """use_qk_l2norm_in_kernel on unnormalised q, k equals the reference on l2-normalised inputs."""
    leaves, weights = make_case(1, 70, 2, 32, 32, h0=False, seed=3, device=device)
    leaves[1] = leaves[1] * 3.0  # keys far from unit norm
    xs = [x.detach().requires_grad_() for x in leaves]
    o, s = chunk_gated_delta_rule_triton(*xs, output_final_state=True, use_qk_l2norm_in_kernel=True)
    loss = (o * weights[0]).sum() + (s * weights[1]).sum()
    grads = torch.autograd.grad(loss, xs)
    ref = [x.detach().clone().requires_grad_() for x in leaves]

    def l2(x):
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)

    o_r, s_r = naive_recurrent_gated_delta_rule(l2(ref[0]), l2(ref[1]), *ref[2:], output_final_state=True)
    loss_r = (o_r * weights[0]).sum() + (s_r * weights[1]).sum()
    grads_r = torch.autograd.grad(loss_r, ref)
    assert rel_rms(o, o_r) < TOL and rel_rms(s, s_r) < TOL
    for name, a, b in zip(NAMES, grads, grads_r):
        assert rel_rms(a, b) < TOL, f"{name}: {rel_rms(a, b):.2e}"


def test_fused_recurrent_and_decoding_match(device):
    """fused_recurrent == naive (varlen, grouped heads, h0); prefill + token-by-token decode == chunked."""
    cu = torch.tensor([0, 40, 97], dtype=torch.int32, device=device)
    leaves, _ = make_case(1, 97, 1, 32, 32, HV=2, N=2, seed=5, device=device)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(
        *leaves[:5], initial_state=leaves[5], output_final_state=True, cu_seqlens=cu
    )
    o, s = fused_recurrent_gated_delta_rule(*leaves[:5], initial_state=leaves[5], cu_seqlens=cu)
    assert rel_rms(o, o_ref) < TOL and rel_rms(s, s_ref) < TOL

    # one sequence: chunked prefill of 70 tokens, then decode 5 tokens one at a time
    leaves, _ = make_case(1, 75, 2, 32, 32, seed=6, device=device)
    q, k, v, g, beta, h0 = leaves
    with torch.no_grad():
        o_full, s_full = chunk_gated_delta_rule_triton(
            q, k, v, g, beta, initial_state=h0, output_final_state=True
        )
        o_pre, state = chunk_gated_delta_rule_triton(
            q[:, :70],
            k[:, :70],
            v[:, :70],
            g[:, :70],
            beta[:, :70],
            initial_state=h0,
            output_final_state=True,
        )
    outs = [o_pre]
    for t in range(70, 75):
        sl = slice(t, t + 1)
        o_t, state = fused_recurrent_gated_delta_rule(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=state
        )
        outs.append(o_t)
    assert rel_rms(torch.cat(outs, 1), o_full) < TOL
    assert rel_rms(state, s_full) < TOL


def test_half_precision_inputs(device):
    """fp16 q, k, v (fp16 dot operands, fp16 intermediates, fp32 accumulation) vs fp32 naive.

    (bf16 takes the same code with bf16 operands on GPU; the CPU interpreter's bf16 dot is wrong.)
    """
    leaves, weights = make_case(1, 100, 2, 32, 32, seed=9, device=device)
    half = [x.half() if i < 3 else x for i, x in enumerate(leaves)]  # q, k, v fp16; g, beta, h0 fp32
    o, s, grads = run(chunk_gated_delta_rule_triton, half, weights)
    o_ref, s_ref, grads_ref = run(naive_recurrent_gated_delta_rule, leaves, weights)
    assert o.dtype == torch.float16 and grads[0].dtype == torch.float16
    errs = {"o": rel_rms(o, o_ref), "final_state": rel_rms(s, s_ref)}
    errs.update({n: rel_rms(a, b) for n, a, b in zip(NAMES, grads, grads_ref)})
    assert max(errs.values()) < TOL_HALF, errs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot is wrong under the CPU interpreter")
def test_bf16_inputs_on_cuda(device):
    """bf16 q, k, v on GPU (bf16 tensor-core operands, bf16 intermediates) vs the fp32 reference."""
    leaves, weights = make_case(1, 1000, 4, 128, 128, N=3, seed=10, device=device)
    cu = torch.tensor([0, 100, 611, 1000], dtype=torch.int32, device=device)
    bf = [x.bfloat16() if i < 3 else x for i, x in enumerate(leaves)]
    o, s, grads = run(chunk_gated_delta_rule_triton, bf, weights, cu_seqlens=cu)
    o_ref, s_ref, grads_ref = run(chunk_gated_delta_rule, leaves, weights, cu_seqlens=cu)
    errs = {"o": rel_rms(o, o_ref), "final_state": rel_rms(s, s_ref)}
    errs.update({n: rel_rms(a, b) for n, a, b in zip(NAMES, grads, grads_ref)})
    assert max(errs.values()) < TOL_BF16, errs


def test_custom_op_compiles_fullgraph(device):
    """torch.compile(fullgraph=True) through the lctrain:: custom ops: same output and grads."""

    def fn(q, k, v, g, beta, h0):
        o, s = chunk_gated_delta_rule_triton(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        return (o * 1.5).sum() + s.pow(2).sum()

    leaves, _ = make_case(1, 64, 1, 32, 32, seed=7, device=device)
    eager = [x.detach().clone().requires_grad_() for x in leaves]
    comp = [x.detach().clone().requires_grad_() for x in leaves]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    l_e, l_c = fn(*eager), compiled(*comp)
    g_e = torch.autograd.grad(l_e, eager)
    g_c = torch.autograd.grad(l_c, comp)
    assert abs(l_e.item() - l_c.item()) <= 1e-6 * abs(l_e.item())
    for name, a, b in zip(NAMES, g_c, g_e):
        assert rel_rms(a, b) < 1e-6, name
    assert hasattr(torch.ops.lctrain, "chunk_gated_delta_rule_fwd")
    assert hasattr(torch.ops.lctrain, "chunk_gated_delta_rule_bwd")


def test_errors(device):
    leaves, _ = make_case(1, 16, 2, 32, 32, h0=False, device=device)
    q, k, v, g, beta = leaves
    with pytest.raises(ValueError, match="multiple of H"):
        chunk_gated_delta_rule_triton(
            q,
            k,
            v[:, :, :1].expand(1, 16, 3, 32),
            g[..., :1].expand(1, 16, 3),
            beta[..., :1].expand(1, 16, 3),
        )
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_delta_rule_triton(q, k, v, g, beta, initial_state=torch.zeros(2, 2, 32, 32, device=device))
    with pytest.raises(ValueError, match="batch size 1"):
        chunk_gated_delta_rule_triton(
            *(x.expand(2, *x.shape[1:]) for x in leaves), cu_seqlens=torch.tensor([0, 16], device=device)
        )


def test_gdn_model_triton_matches_torch_training(tmp_path, small_corpus, monkeypatch):
    """A GDN-only model trains 3 steps with model.kernels=triton and =torch: same losses."""
    from lctrain.config import load_config
    from lctrain.kernels.gated_delta_rule import triton_chunk
    from lctrain.train.trainer import Trainer
    from tests.conftest import tiny_overrides

    calls = {"fwd": 0, "bwd": 0}
    fwd_impl, bwd_impl = triton_chunk._fwd_impl, triton_chunk._bwd_impl

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(triton_chunk, "_fwd_impl", count("fwd", fwd_impl))
    monkeypatch.setattr(triton_chunk, "_bwd_impl", count("bwd", bwd_impl))
    losses = {}
    for kernels in ("torch", "triton"):
        args = tiny_overrides(
            tmp_path / kernels,
            small_corpus,
            tmp_path / "cache",
            **{
                "model.kernels": kernels,
                "model.n_layers": 1,
                "train.max_steps": 3,
                "train.global_batch_size": 2,
                "train.micro_batch_size": 2,
                "train.dtype": "fp32",
            },
        )
        args[0] = "recipe=gdn"
        trainer = Trainer(load_config(args))
        losses[kernels] = [trainer.train_step()[0] for _ in range(3)]
        if kernels == "torch":
            assert calls == {"fwd": 0, "bwd": 0}
    assert calls["fwd"] == calls["bwd"] == 3  # 3 steps x 1 GDN layer, all through the Triton op
    for a, b in zip(losses["triton"], losses["torch"]):
        assert abs(a - b) <= TOL_MODEL * abs(b), losses
    assert losses["torch"][2] < losses["torch"][0]  # it trains


def test_layer_kernel_selection(device):
    """kernels='torch' -> torch path; 'triton' -> Triton op; 'auto' -> Triton only for CUDA inputs."""
    from lctrain.layers.gated_deltanet import GatedDeltaNet

    x = torch.zeros(1, 4, 32, device=device)
    assert GatedDeltaNet(32, 2, 16, kernels="triton").delta_rule_op.kernel(x) is chunk_gated_delta_rule_triton
    assert GatedDeltaNet(32, 2, 16, kernels="torch").delta_rule_op.kernel(x).func is chunk_gated_delta_rule
    auto = GatedDeltaNet(32, 2, 16, kernels="auto").delta_rule_op.kernel(x)
    if x.is_cuda:
        assert auto is chunk_gated_delta_rule_triton
    else:
        assert auto.func is chunk_gated_delta_rule


def test_import_and_torch_path_without_triton():
    """With triton unimportable: lctrain imports, auto picks the torch path, the Triton op says why."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lctrain\n"
        "from lctrain.kernels.gated_delta_rule import chunk_gated_delta_rule_triton, triton_available\n"
        "from lctrain.layers.gated_deltanet import GatedDeltaNet\n"
        "assert not triton_available('cpu')\n"
        "layer = GatedDeltaNet(32, 2, 16, kernels='auto')\n"
        "assert layer(torch.randn(1, 8, 32)).shape == (1, 8, 32)\n"
        "x = torch.randn(1, 8, 2, 16)\n"
        "try:\n"
        "    chunk_gated_delta_rule_triton(x, x, x, x[..., 0], x[..., 0])\n"
        "except RuntimeError as e:\n"
        "    assert 'needs triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,dim", [("bf16", 128), ("fp32", 64), ("fp16", 32)])
def test_kernels_compile_for_sm90(dtype, dim):
    """Every kernel compiles for H100 (sm90) with the wrapper's launch options and fits its smem."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("gdn_sm90_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, str(script), dtype, str(dim)], check=False, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_varlen_257_against_naive(device):
    cu = torch.tensor([0, 30, 30, 190, 257], dtype=torch.int32, device=device)
    leaves, weights = make_case(1, 257, 1, 32, 32, HV=2, decay="normal", N=4, seed=12, device=device)
    check_against_naive(leaves, weights, cu_seqlens=cu)


@pytest.mark.slow
@pytest.mark.parametrize("T", [63, 100, 257])
@pytest.mark.parametrize("K", [32, 64])
@pytest.mark.parametrize("decay", ["zero", "normal", "strong"])
def test_sweep_against_naive(T, K, decay, device):
    leaves, weights = make_case(1, T, 2, K, K, HV=4, decay=decay, seed=T + K, device=device)
    check_against_naive(leaves, weights, tol_dg=TOL_STRONG_DG if decay == "strong" else TOL)


@pytest.mark.slow
def test_varlen_many_docs_matches_torch_chunk_path(device):
    """Triton vs the torch chunk path on 6 packed documents with grouped heads (both fp32)."""
    cu = torch.tensor([0, 1, 65, 130, 200, 200, 333], dtype=torch.int32, device=device)
    leaves, weights = make_case(1, 333, 2, 32, 32, HV=4, N=6, seed=11, device=device)
    o, s, grads = run(chunk_gated_delta_rule_triton, leaves, weights, cu_seqlens=cu)
    o_r, s_r, grads_r = run(chunk_gated_delta_rule, leaves, weights, cu_seqlens=cu)
    assert rel_rms(o, o_r) < TOL and rel_rms(s, s_r) < TOL
    for name, a, b in zip(NAMES, grads, grads_r):
        assert rel_rms(a, b) < TOL, name
