"""Triton FlashAttention-2 (with lse) against the fp32 reference ``naive_attention``.

Runs under the Triton interpreter on CPU (``TRITON_INTERPRET=1`` from tests/conftest.py) in fp32,
so the kernels must agree with the reference to rounding: relative RMS error <= 1e-5 on out,
lse, dq, dk, dv (observed ~5e-7). One fp16 case uses 1e-2 (fp16 inputs, fp32 accumulation).
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from lctrain.kernels.flash_attn import (
    flash_attn_bwd,
    flash_attn_func,
    flash_attn_fwd,
    flash_attn_varlen_func,
    interface,
    naive_attention,
)

TOL = 1e-5


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "non-finite entries differ"
    a, b = a[finite], b[finite]
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _inputs(shape_q, shape_kv, device, dtype=torch.float32, seed=0):
    """q [shape_q], k and v [shape_kv], standard normal on ``device`` (leaves with gradients)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(shape_q, generator=g, device=device).to(dtype).requires_grad_()
    k = torch.randn(shape_kv, generator=g, device=device).to(dtype).requires_grad_()
    v = torch.randn(shape_kv, generator=g, device=device).to(dtype).requires_grad_()
    return q, k, v


def _cu(lengths, device):
    """int32 cu_seqlens [N + 1] of ``lengths`` on ``device``."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _check(outs, refs, tol, names):
    for name, a, b in zip(names, outs, refs):
        err = rel_rms(a, b)
        assert err <= tol, f"{name}: relative RMS error {err:.3g} > {tol}"


@pytest.mark.parametrize(
    "T,D,Hq,Hkv,causal",
    [(63, 32, 2, 1, True), (100, 64, 2, 2, False), (257, 32, 2, 1, True), (257, 64, 2, 1, False)],
)
def test_dense_matches_reference(T, D, Hq, Hkv, causal, device):
    q, k, v = _inputs((2 if T < 200 else 1, T, Hq, D), (2 if T < 200 else 1, T, Hkv, D), device, seed=T + D)
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = naive_attention(q, k, v, causal=causal)
    # the loss also uses lse, so its upstream gradient (folded into D_i) is checked too
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), (q, k, v))
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (q.shape[0], Hq, T)
    assert lse.dtype == torch.float32
    _check((out, lse, *grads), (ref_out, ref_lse, *ref_grads), TOL, ("out", "lse", "dq", "dk", "dv"))


@pytest.mark.parametrize("causal,window", [(True, (16, -1)), (False, (8, 20))])
def test_sliding_window(monkeypatch, causal, window, device):
    # 32-wide blocks so the window skips whole key/query blocks and cuts through others
    monkeypatch.setitem(interface.BLOCK_OVERRIDE, "BLOCK_M", 32)
    monkeypatch.setitem(interface.BLOCK_OVERRIDE, "BLOCK_N", 32)
    q, k, v = _inputs((1, 100, 2, 32), (1, 100, 1, 32), device, seed=3)
    out, lse = flash_attn_func(q, k, v, causal=causal, window_size=window, return_lse=True)
    ref_out, ref_lse = naive_attention(q, k, v, causal=causal, window_size=window)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    _check((out, lse, *grads), (ref_out, ref_lse, *ref_grads), TOL, ("out", "lse", "dq", "dk", "dv"))


def test_varlen_documents(device):
    lengths = [37, 1, 90, 64, 20]
    cu = _cu(lengths, device)
    total = int(cu[-1])
    q, k, v = _inputs((total, 2, 32), (total, 1, 32), device, seed=5)
    out, lse = flash_attn_varlen_func(
        q, k, v, cu, cu, max(lengths), max(lengths), causal=True, return_lse=True
    )
    ref_out, ref_lse = naive_attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert lse.shape == (2, total)
    # independent oracle for packing: each document on its own through the dense path
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o_doc = naive_attention(q[None, s:e], k[None, s:e], v[None, s:e], causal=True)[0][0]
        assert rel_rms(out[s:e], o_doc) <= TOL
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    _check((out, lse, *grads), (ref_out, ref_lse, *ref_grads), TOL, ("out", "lse", "dq", "dk", "dv"))


@pytest.mark.parametrize("causal", [False, True])
def test_raw_fwd_bwd_unequal_lengths(causal, device):
    # ring attention's block pairs: query and key blocks of different lengths per sequence;
    # causal is bottom-right aligned (needs seqlen_q <= seqlen_k to leave no empty row)
    cu_q = _cu([20, 50, 30], device)
    cu_k = _cu([50, 30, 90], device)
    q, k, v = _inputs((100, 2, 64), (170, 1, 64), device, seed=7)
    out, lse = flash_attn_fwd(q, k, v, 0.3, causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref_out, ref_lse = naive_attention(q, k, v, 0.3, causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    dout = torch.randn_like(out)
    grads = flash_attn_bwd(
        dout, q, k, v, out.detach(), lse.detach(), 0.3, causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
    )
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    _check((out, lse, *grads), (ref_out, ref_lse, *ref_grads), TOL, ("out", "lse", "dq", "dk", "dv"))


def test_empty_rows_are_zero_with_minus_inf_lse(device):
    # Tq > Tk with causal: the first Tq - Tk queries see no key
    q, k, v = _inputs((1, 40, 2, 32), (1, 24, 2, 32), device, seed=9)
    out, lse = flash_attn_fwd(q, k, v, causal=True)
    ref_out, ref_lse = naive_attention(q, k, v, causal=True)
    assert torch.all(out[:, :16] == 0) and torch.all(lse[:, :, :16] == float("-inf"))
    _check((out, lse), (ref_out, ref_lse), TOL, ("out", "lse"))
    dq, dk, dv = flash_attn_bwd(torch.randn_like(out), q, k, v, out, lse, causal=True)
    assert torch.isfinite(dq).all() and torch.all(dq[:, :16] == 0)
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def _merge(o1, lse1, o2, lse2):
    """The LSE merge formula of DESIGN.md (fp32), per row; lse [B, H, T] -> broadcast to out."""
    lse = lse1 - torch.nn.functional.logsigmoid(lse1 - lse2)
    w = torch.sigmoid(lse2 - lse1).transpose(1, 2)[..., None]
    return o1 - w * (o1 - o2), lse


def test_bwd_with_merged_lse_gives_partial_gradients(device):
    """Ring attention step: queries of the second half vs keys of the first half (full) and of
    the second half (causal diagonal). Merging the two (out, lse) pairs gives full causal
    attention; two flash_attn_bwd calls with the merged out/lse give gradients whose sum (dq)
    and concatenation (dk, dv) equal autograd through the full reference."""
    T = 64
    q_all, k, v = _inputs((1, 2 * T, 2, 32), (1, 2 * T, 1, 32), device, seed=11)
    q = q_all[:, T:].detach().requires_grad_()
    o1, lse1 = flash_attn_fwd(q, k[:, :T], v[:, :T], causal=False)
    o2, lse2 = flash_attn_fwd(q, k[:, T:], v[:, T:], causal=True)
    out, lse = _merge(o1, lse1, o2, lse2)
    ref_out, ref_lse = naive_attention(q, k, v, causal=True)  # Tq = T, Tk = 2T, bottom-right
    _check((out, lse), (ref_out, ref_lse), TOL, ("merged out", "merged lse"))
    dout = torch.randn_like(out)
    dq1, dk1, dv1 = flash_attn_bwd(dout, q, k[:, :T], v[:, :T], out, lse, causal=False)
    dq2, dk2, dv2 = flash_attn_bwd(dout, q, k[:, T:], v[:, T:], out, lse, causal=True)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_out, (q, k, v), dout)
    _check(
        (dq1 + dq2, torch.cat([dk1, dk2], 1), torch.cat([dv1, dv2], 1)),
        (ref_dq, ref_dk, ref_dv),
        TOL,
        ("dq", "dk", "dv"),
    )
    # the block's own lse would give the wrong (unnormalised-by-merge) gradient: the check can fail
    dq_wrong, _, _ = flash_attn_bwd(dout, q, k[:, :T], v[:, :T], o1, lse1, causal=False)
    assert rel_rms(dq_wrong + dq2, ref_dq) > 1e-2


def test_fp16_inputs(device):
    q, k, v = _inputs((1, 100, 2, 64), (1, 100, 2, 64), device, dtype=torch.float16, seed=13)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert out.dtype == torch.float16
    ref_out, ref_lse = naive_attention(q, k, v, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout.float())
    assert all(g.dtype == torch.float16 for g in grads)
    _check((out, lse, *grads), (ref_out, ref_lse, *ref_grads), 1e-2, ("out", "lse", "dq", "dk", "dv"))


def test_torch_compile_fullgraph(device):
    q, k, v = _inputs((1, 63, 2, 32), (1, 63, 1, 32), device, seed=17)

    def f(q, k, v):
        out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
        return (out * out).sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_out, ref_lse = naive_attention(q, k, v, causal=True)
    ref_loss = (ref_out * ref_out).sum() + ref_lse.sum()
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    _check((loss, *grads), (ref_loss, *ref_grads), TOL, ("loss", "dq", "dk", "dv"))


def test_validation_errors(device):
    q = torch.randn(1, 8, 3, 16, device=device)
    k = torch.randn(1, 8, 2, 16, device=device)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        flash_attn_func(q, k, k)
    with pytest.raises(ValueError, match="together"):
        flash_attn_fwd(q[0], k[0], k[0], cu_seqlens_q=_cu([8], device))
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        flash_attn_func(q[0], k[0], k[0])
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        flash_attn_func(q.double(), q.double(), q.double())


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Compile every FlashAttention kernel for H100 (sm90, bf16 and fp32) with the CUDA launch configs and
    check shared memory fits; catches what the interpreter lets through (minutes on 2 cores)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(repo))
    res = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("sm90_compile.py")), "flash"],
        check=False,
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("shared=") == 12, res.stdout
