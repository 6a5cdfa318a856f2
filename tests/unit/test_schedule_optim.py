"""LR schedules against hand-computed values; AdamW parameter groups and one hand-computed step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lctrain.config import OptimConfig
from lctrain.train.optim import build_optimizer, is_decayed
from lctrain.train.schedule import build_scheduler, lr_lambda


def cfg(**kw) -> OptimConfig:
    return OptimConfig(**kw)


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.1),  # first step: 1/10 of the peak, never 0
        (4, 0.5),
        (9, 1.0),  # last warmup step reaches the peak
        (10, 1.0),  # cosine progress 0
        (35, 0.868198051533946),  # progress 0.25: 0.1 + 0.45 * (1 + cos(pi/4))
        (60, 0.55),  # midpoint: 0.1 + 0.45 * (1 + 0)
        (110, 0.1),  # end: min_lr_ratio
        (500, 0.1),  # past the end stays at the floor
    ],
)
def test_cosine_values(step, expected):
    c = cfg(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_lambda(step, c, 110) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.1),
        (9, 1.0),
        (50, 1.0),  # stable phase
        (79, 1.0),
        (80, 1.0),  # decay starts at 100 - 0.2 * 100 = 80
        (90, 0.55),  # halfway through the decay: 1 - 0.9 * 0.5
        (95, 0.325),  # 1 - 0.9 * 0.75
        (100, 0.1),
        (130, 0.1),
    ],
)
def test_wsd_values(step, expected):
    c = cfg(schedule="wsd", warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    assert lr_lambda(step, c, 100) == pytest.approx(expected, abs=1e-12)


def test_wsd_decay_never_starts_inside_warmup():
    # decay_fraction 1.0 would start decaying at 0; warmup wins, decay spans [20, 40]
    c = cfg(schedule="wsd", warmup_steps=20, min_lr_ratio=0.0, decay_fraction=1.0)
    assert lr_lambda(19, c, 40) == pytest.approx(1.0)
    assert lr_lambda(30, c, 40) == pytest.approx(0.5)
    assert lr_lambda(40, c, 40) == pytest.approx(0.0)


@pytest.mark.parametrize("step, expected", [(0, 0.25), (2, 0.75), (3, 1.0), (50, 1.0), (1000, 1.0)])
def test_constant_values(step, expected):
    c = cfg(schedule="constant", warmup_steps=4, min_lr_ratio=0.1)
    assert lr_lambda(step, c, 100) == pytest.approx(expected)


def test_no_warmup_starts_at_peak():
    c = cfg(schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_lambda(0, c, 100) == pytest.approx(1.0)
    assert lr_lambda(50, c, 100) == pytest.approx(0.5)
    assert lr_lambda(100, c, 100) == pytest.approx(0.0)


def test_schedule_errors():
    with pytest.raises(ValueError, match="cosine, wsd, constant"):
        lr_lambda(0, cfg(schedule="linear"), 10)
    with pytest.raises(ValueError, match="max_steps"):
        lr_lambda(0, cfg(), 0)
    with pytest.raises(ValueError, match="step=-1"):
        lr_lambda(-1, cfg(), 10)
    with pytest.raises(ValueError, match="decay_fraction"):
        lr_lambda(0, cfg(schedule="wsd", decay_fraction=0.0), 10)


def test_scheduler_drives_optimizer_and_state_round_trips_through_json():
    c = cfg(schedule="cosine", warmup_steps=3, min_lr_ratio=0.1, lr=2.0)
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=c.lr)
    sched = build_scheduler(opt, c, 13)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # hand values: warmup 2/3, 4/3, 2; cosine over 10 steps at progress 0, 0.1, 0.2
    want = [2 / 3, 4 / 3, 2.0, 2.0, 2 * (0.1 + 0.45 * (1 + math.cos(0.1 * math.pi))),
            2 * (0.1 + 0.45 * (1 + math.cos(0.2 * math.pi)))]
    assert seen == pytest.approx(want, abs=1e-12)

    state = json.loads(json.dumps(sched.state_dict()))  # must be JSON-serialisable
    p2 = nn.Parameter(torch.zeros(2))
    opt2 = torch.optim.AdamW([p2], lr=c.lr)
    sched2 = build_scheduler(opt2, c, 13)
    sched2.load_state_dict(state)
    for _ in range(4):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], abs=1e-15)


# ---------------------------------------------------------------- optimizer groups

class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(2, 3))  # 2-D on purpose: the name alone excludes it
        self.dt_bias = nn.Parameter(torch.zeros(3))
        self.conv = nn.Conv1d(3, 3, 4, groups=3)  # 3-D weight, 1-D bias
        self.gate = nn.Parameter(torch.zeros(3, 3))
        self.gate._no_weight_decay = True
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 3)
        self.norm = nn.LayerNorm(3)
        self.mixer = Mixer()
        self.proj = nn.Linear(3, 3)
        self.head = nn.Linear(3, 11, bias=False)
        self.head.weight = self.embed.weight  # tied


DECAYED = {"embed.weight", "mixer.conv.weight", "proj.weight"}
NOT_DECAYED = {"norm.weight", "norm.bias", "mixer.A_log", "mixer.dt_bias", "mixer.conv.bias", "mixer.gate",
               "proj.bias"}


def test_param_groups_follow_the_rule():
    model = Tiny()
    opt = build_optimizer(model, cfg(weight_decay=0.1), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    by_wd = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in opt.param_groups}
    assert set(by_wd) == {0.1, 0.0}
    assert set(by_wd[0.1]) == DECAYED
    assert set(by_wd[0.0]) == NOT_DECAYED
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))  # every parameter exactly once (tied weight too)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(all_ids) == trainable
    assert id(model.mixer.frozen) not in all_ids
    assert is_decayed("x.weight", nn.Parameter(torch.zeros(2, 2)))
    assert not is_decayed("x.bias", nn.Parameter(torch.zeros(2)))


def test_hyperparameters_and_implementation_choice():
    c = cfg(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-7, weight_decay=0.05)
    opt = build_optimizer(Tiny(), c, "cpu")
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"]) == (1e-3, (0.8, 0.9), 1e-7)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert build_optimizer(Tiny(), cfg(fused="true"), "cpu").defaults["fused"] is True
    assert build_optimizer(Tiny(), cfg(fused="auto"), "cuda").defaults["fused"] is True
    assert not build_optimizer(Tiny(), cfg(fused="false"), "cuda").defaults["fused"]
    with pytest.raises(ValueError, match="auto, true, false"):
        build_optimizer(Tiny(), cfg(fused="yes"), "cpu")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, cfg(), "cpu")


@pytest.mark.parametrize("fused", ["false", "true"])
def test_first_step_matches_decoupled_weight_decay_formula(fused):
    # One AdamW step with bias correction: m_hat = g, v_hat = g^2, so
    # p1 = p0 * (1 - lr * wd) - lr * g / (|g| + eps) for decayed params, without the factor otherwise.
    torch.manual_seed(0)
    model = Tiny()
    c = cfg(lr=0.01, weight_decay=0.5, eps=1e-8, fused=fused)
    opt = build_optimizer(model, c, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
            grads[n] = p.grad.clone()
    opt.step()
    for n, p in model.named_parameters():
        if n not in grads:
            assert torch.equal(p, before[n])
            continue
        g = grads[n]
        decay = (1 - c.lr * c.weight_decay) if n in DECAYED else 1.0
        want = before[n] * decay - c.lr * g / (g.abs() + c.eps)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7, msg=n)
