"""Adding a mixer takes one registry entry: a test-only mixer trains inside HybridLM with its letter."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lctrain.config import ConfigError, ModelConfig, load_config
from lctrain.errors import ConfigError as LeafConfigError
from lctrain.layers.registry import MIXERS, MixerSpec, get_mixer, register_mixer, unregister_mixer
from lctrain.models import HybridLM


@dataclass
class ShiftConfig:
    """Section of the test mixer: mixes each token with the previous one (within its document)."""

    width: int = 16

    def validate(self, prefix: str = "model.shift") -> None:
        if self.width < 1:
            raise LeafConfigError(f"invalid {prefix}.width={self.width}: must be >= 1")


class ShiftMixer(nn.Module):
    """``y_t = o_proj(silu(in_proj(x_t)) + silu(in_proj(x_{t-1})))``, previous token zero at a document start."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.in_proj = nn.Linear(d_model, width, bias=False)
        self.o_proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x, position_ids=None, cu_seqlens=None):
        h = F.silu(self.in_proj(x))
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
        if position_ids is not None:
            prev = prev * (position_ids > 0).unsqueeze(-1).to(h.dtype)
        return self.o_proj(h + prev)


def _build(cfg: ShiftConfig, d_model: int, **_) -> ShiftMixer:
    return ShiftMixer(d_model, cfg.width)


@pytest.fixture
def shift_letter():
    register_mixer(MixerSpec("X", "shift mixer (test)", "shift", ShiftConfig, _build, lambda cfg, T: 7.0))
    try:
        yield "X"
    finally:
        unregister_mixer("X")
    assert "X" not in MIXERS


def test_registered_test_mixer_trains_in_hybrid_lm(shift_letter):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, layer_pattern="GX")
    model = HybridLM(cfg)
    assert [type(b.mixer).__name__ for b in model.layers] == ["GatedDeltaNet", "ShiftMixer"]
    assert model.layers[1].mixer.in_proj.out_features == 16  # the section's defaults (no field in ModelConfig)
    # its o_proj got the residual-branch init like every registered mixer's
    assert model.layers[1].mixer.o_proj.weight.std() < 0.02
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        for n, p in model.layers[1].mixer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3, losses
    # FLOPs: the registry function is what the model adds for the mixer
    base = HybridLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, layer_pattern="GX"))
    spec = get_mixer("X")
    assert spec.flops_per_token(ShiftConfig(), 31) == 7.0
    n = base.num_params(exclude_embedding=True) + 64 * 32
    gdn = 18.0 * cfg.gdn.num_heads * cfg.gdn.head_dim * cfg.gdn.head_dim
    assert base.flops_per_token(31) == pytest.approx(6 * n + gdn + 7.0)


def test_config_accepts_registered_letters_only(shift_letter):
    cfg = load_config(["recipe=hybrid_gdn_3to1", "model.layer_pattern=GX", "model.n_layers=2"])
    assert cfg.model.layer_pattern == "GX"
    unregister_mixer("X")
    with pytest.raises(ConfigError, match="model.layer_pattern.*G \\(Gated DeltaNet\\)"):
        load_config(["recipe=hybrid_gdn_3to1", "model.layer_pattern=GX", "model.n_layers=2"])
    register_mixer(MixerSpec("X", "shift mixer (test)", "shift", ShiftConfig, _build, lambda cfg, T: 0.0))


def test_register_rejects_duplicates_and_bad_letters():
    with pytest.raises(ValueError, match="already registered"):
        register_mixer(MixerSpec("G", "again", "gdn", ShiftConfig, _build, lambda c, t: 0.0))
    with pytest.raises(ValueError, match="one character"):
        register_mixer(MixerSpec("GG", "two", "gg", ShiftConfig, _build, lambda c, t: 0.0))
    with pytest.raises(ValueError, match="unknown mixer letter 'Q'.*A \\(softmax attention\\)"):
        get_mixer("Q")


def test_section_validation_runs_next_to_the_layer(shift_letter):
    for bad, match in [
        ("model.gdn.num_heads=0", "model.gdn.num_heads"),
        ("model.attn.head_dim=15", "model.attn.head_dim.*even"),
        ("model.lightning.chunk_size=0", "model.lightning.chunk_size"),
    ]:
        pattern = "GAL"
        with pytest.raises(ConfigError, match=match):
            load_config(["recipe=hybrid_gdn_3to1", f"model.layer_pattern={pattern}", "model.n_layers=3", bad])
    # a section whose letter is not in the pattern is not validated (its values are unused)
    load_config(["recipe=gdn", "model.attn.num_kv_heads=3"])
