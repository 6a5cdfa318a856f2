"""Chunked linear cross entropy against the fp32 reference (whole logits + F.cross_entropy):
loss and both gradients, ignored rows, chunk sizes that do not divide N, bf16; the model's chunked
loss path against its logits path (training loss and every parameter gradient)."""

from __future__ import annotations

import pytest
import torch

from lctrain.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_naive


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(N=37, D=16, V=50, dtype=torch.float64, seed=0, *, device):
    """hidden [N, D], weight [V, D] in ``dtype`` and labels [N] (every 5th ignored), on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64, device=device).to(dtype)
    w = (torch.randn(V, D, generator=g, dtype=torch.float64, device=device) * 0.5).to(dtype)
    y = torch.randint(0, V, (N,), generator=g, device=device)
    y[::5] = -100  # ignored rows
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_matches_reference_loss_and_grads(chunk, device):
    h, w, y = _inputs(device=device)
    grads = []
    for fn in (lambda h, w: linear_cross_entropy(h, w, y, chunk_size=chunk), lambda h, w: linear_cross_entropy_naive(h, w, y)):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fn(hh, ww)
        (loss * 1.7).backward()
        grads.append((loss, hh.grad, ww.grad))
    (l1, dh1, dw1), (l0, dh0, dw0) = grads
    l1, l0 = l1.item(), l0.item()
    assert abs(l1 - l0) <= 1e-10 * abs(l0)
    assert _rel(dh1, dh0) < 1e-10 and _rel(dw1, dw0) < 1e-10
    assert dh1[::5].abs().max() == 0  # ignored rows get no gradient


def test_gradcheck_fp64(device):
    h, w, y = _inputs(N=9, D=4, V=7, device=device)
    h, w = h.requires_grad_(True), w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, y, chunk_size=4), (h, w))


def test_fp32_loss_dtype_and_accuracy(device):
    h, w, y = _inputs(dtype=torch.float32, device=device)
    loss = linear_cross_entropy(h, w, y, chunk_size=8)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - linear_cross_entropy_naive(h.double(), w.double(), y).item()) < 1e-5 * loss.item()


def test_bf16_close_to_fp32_reference(device):
    h, w, y = _inputs(N=64, D=32, V=96, dtype=torch.bfloat16, seed=1, device=device)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = linear_cross_entropy(hh, ww, y, chunk_size=16)
    loss.backward()
    ref_h, ref_w = h.float().requires_grad_(True), w.float().requires_grad_(True)
    ref = linear_cross_entropy_naive(ref_h, ref_w, y)
    ref.backward()
    assert hh.grad.dtype == torch.bfloat16 and ww.grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) < 1e-2 * abs(ref.item())
    assert _rel(hh.grad, ref_h.grad) < 2e-2 and _rel(ww.grad, ref_w.grad) < 2e-2


def test_errors(device):
    h, w, y = _inputs(dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels must be \[N=37\]"):
        linear_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="same dtype"):
        linear_cross_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match=r"hidden must be \[N, D\]"):
        linear_cross_entropy(h[None], w, y)


def test_model_chunked_loss_equals_logits_loss(device):
    from lctrain.config import ModelConfig
    from lctrain.layers.attention import AttentionConfig
    from lctrain.layers.gated_deltanet import GatedDeltaNetConfig
    from lctrain.models import HybridLM

    results = []
    for chunk in (0, 7):
        torch.manual_seed(0)
        for tie in (True, False):
            cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, layer_pattern="GA", tie_embeddings=tie,
                              loss_chunk_size=chunk, attn=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=16),
                              gdn=GatedDeltaNetConfig(num_heads=2, head_dim=16))
            model = HybridLM(cfg).to(device)
            gen = torch.Generator(device=device).manual_seed(1)
            ids = torch.randint(0, 96, (1, 30), generator=gen, device=device)
            labels = ids.roll(-1, 1)
            labels[0, -1] = -100
            cu = torch.tensor([0, 11, 30], dtype=torch.int32, device=device)
            loss = model(ids, cu_seqlens=cu, labels=labels)
            loss.backward()
            results.append((chunk, tie, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    ref = {(c, t): (loss, g) for c, t, loss, g in results if c == 0}
    for chunk, tie, loss, grads in results:
        if chunk == 0:
            continue
        ref_loss, ref_grads = ref[(0, tie)]
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():
            assert _rel(g, ref_grads[n]) < 1e-5, (tie, n)
    with pytest.raises(ValueError, match=r"labels must be \[B, T\]"):
        model(ids, labels=labels[:, :5])


def test_training_with_chunked_loss_has_the_same_losses(tmp_path, small_corpus):
    """4 training steps of the tiny hybrid: per-step losses with model.loss_chunk_size=48 (not
    dividing the 2 x 64-token micro-batches) equal those of the logits path."""
    from lctrain.config import load_config
    from lctrain.train.trainer import Trainer
    from tests.conftest import tiny_overrides

    losses = {}
    for chunk in (0, 48):
        out = tmp_path / f"c{chunk}"
        summary = Trainer(load_config(tiny_overrides(out, small_corpus, tmp_path / "cache", **{
            "model.loss_chunk_size": chunk, "train.checkpoint_every": 0}))).fit()
        losses[chunk] = summary["losses"]
    assert len(losses[0]) == 4
    for a, b in zip(losses[0], losses[48], strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (losses[0], losses[48])


def test_chunked_loss_refused_with_zero3(tmp_path, small_corpus):
    from lctrain.config import load_config
    from lctrain.errors import ConfigError
    from tests.conftest import tiny_overrides

    with pytest.raises(ConfigError, match="model.loss_chunk_size"):
        load_config(tiny_overrides(tmp_path, small_corpus, tmp_path / "cache", **{
            "model.loss_chunk_size": 64, "parallel.dp_impl": "deepspeed", "parallel.zero_stage": 3}))
    with pytest.raises(ConfigError, match="model.loss_chunk_size"):
        load_config(tiny_overrides(tmp_path, small_corpus, tmp_path / "cache", **{"model.loss_chunk_size": -1}))
