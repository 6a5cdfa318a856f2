"""DCP checkpoints: exact resume vs an uninterrupted run, crash safety, pruning, error messages."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import lctrain.checkpoint.store as ckpt
from lctrain.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from lctrain.config import OptimConfig
from lctrain.train.optim import build_optimizer
from lctrain.train.schedule import build_scheduler

VOCAB, DIM, MAX_STEPS = 32, 16, 6
OCFG = OptimConfig(lr=1e-2, warmup_steps=2, schedule="cosine", weight_decay=0.1)


class Net(nn.Module):
    """Tied embedding/head, norm, bias, an A_log parameter and dropout (consumes the torch RNG)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.A_log = nn.Parameter(torch.zeros(DIM))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        h = self.embed(x)
        h = h + self.drop(torch.tanh(self.proj(self.norm(h)))) * torch.exp(self.A_log)
        return self.head(h)


def seed_all(s):
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def train_steps(model, opt, sched, n, losses):
    for _ in range(n):
        x = torch.randint(0, VOCAB, (4, 8))
        # python and numpy RNG feed the loss scale, so a lost RNG state changes the trajectory
        scale = (1.0 + random.random()) * (1.0 + float(np.random.rand()))
        loss = scale * nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())


def build(seed):
    torch.manual_seed(seed)
    model = Net()
    opt = build_optimizer(model, OCFG, "cpu")
    return model, opt, build_scheduler(opt, OCFG, MAX_STEPS)


def opt_state_by_name(model, opt):
    return {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}


def assert_same_opt_state(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].keys() == b[n].keys(), n
        for k in a[n]:
            assert torch.equal(a[n][k], b[n][k]), (n, k)


def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    seed_all(0)
    model, opt, sched = build(0)
    ref_losses = []
    train_steps(model, opt, sched, MAX_STEPS, ref_losses)
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_opt = opt_state_by_name(model, opt)

    seed_all(0)
    model, opt, sched = build(0)
    losses = []
    train_steps(model, opt, sched, 3, losses)
    at_save_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    at_save_opt = opt_state_by_name(model, opt)
    at_save_lr = opt.param_groups[0]["lr"]
    extra = {"step": 3, "scheduler": sched.state_dict(), "losses": losses, "config": {"lr": OCFG.lr}}
    path = save_checkpoint(tmp_path, 3, model, opt, copy.deepcopy(extra), keep_last=2)
    assert path == tmp_path / "step_00000003" and find_latest_checkpoint(tmp_path) == path
    del model, opt, sched

    seed_all(12345)  # scramble every RNG and start from a different init
    model, opt, sched = build(777)
    assert not torch.equal(model.proj.weight, at_save_params["proj.weight"])
    state = load_checkpoint(path, model, opt)
    assert state == json.loads(json.dumps(extra))
    sched.load_state_dict(state["scheduler"])
    for n, p in model.named_parameters():
        assert torch.equal(p, at_save_params[n]), n
    assert model.head.weight is model.embed.weight  # tying survives the load
    assert_same_opt_state(opt_state_by_name(model, opt), at_save_opt)
    assert opt.param_groups[0]["lr"] == at_save_lr

    losses = list(state["losses"])
    train_steps(model, opt, sched, MAX_STEPS - 3, losses)
    assert losses == ref_losses
    for n, p in model.named_parameters():
        assert torch.equal(p, ref_params[n]), n
    assert_same_opt_state(opt_state_by_name(model, opt), ref_opt)


def test_rng_states_restored(tmp_path):
    model, opt, _ = build(0)
    seed_all(5)
    save_checkpoint(tmp_path, 0, model, opt, {}, keep_last=1)
    want = (torch.rand(3), random.random(), np.random.rand())
    seed_all(6)
    load_checkpoint(tmp_path / "step_00000000", model, opt)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_model_only_load(tmp_path):
    model, opt, sched = build(0)
    train_steps(model, opt, sched, 1, [])
    path = save_checkpoint(tmp_path, 1, model, opt, {"step": 1}, keep_last=1)
    other = Net()
    assert load_checkpoint(path, other, None) == {"step": 1}
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), n


def test_load_with_stale_gradients_restores_optimizer_state(tmp_path):
    model, opt, sched = build(0)
    train_steps(model, opt, sched, 2, [])
    want = opt_state_by_name(model, opt)
    path = save_checkpoint(tmp_path, 2, model, opt, {}, keep_last=1)
    other, other_opt, _ = build(1)
    other(torch.zeros(1, 3, dtype=torch.long)).sum().backward()  # gradients set, optimizer state empty
    load_checkpoint(path, other, other_opt)
    assert_same_opt_state(opt_state_by_name(other, other_opt), want)
    assert all(p.grad is None for p in other.parameters())


class SimulatedKill(BaseException):
    """Stands for the process dying mid-save (like SIGKILL: no cleanup code runs)."""


def test_crash_before_marker_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = build(0)
    good = save_checkpoint(tmp_path, 2, model, opt, {"step": 2}, keep_last=3)
    good_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, opt, sched, 2, [])

    def crash(*args, **kwargs):
        raise SimulatedKill("simulated crash after dcp.save")

    monkeypatch.setattr(ckpt, "_write_rng_state", crash)
    with pytest.raises(SimulatedKill, match="simulated crash"):
        save_checkpoint(tmp_path, 4, model, opt, {"step": 4}, keep_last=3)
    monkeypatch.undo()

    torn = tmp_path / "step_00000004.tmp"
    assert (torn / ".metadata").exists()  # DCP finished, the marker never came
    assert not (tmp_path / "step_00000004").exists()
    assert find_latest_checkpoint(tmp_path) == good
    with pytest.raises(ValueError, match="missing COMPLETE"):
        load_checkpoint(torn, model, opt)
    fresh, fresh_opt, _ = build(9)
    assert load_checkpoint(find_latest_checkpoint(tmp_path), fresh, fresh_opt) == {"step": 2}
    for n, p in fresh.named_parameters():
        assert torch.equal(p, good_params[n]), n

    # a retry of the same step succeeds and clears the torn directory
    again = save_checkpoint(tmp_path, 4, model, opt, {"step": 4}, keep_last=3)
    assert find_latest_checkpoint(tmp_path) == again and not torn.exists()


def test_crash_at_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, _ = build(0)
    good = save_checkpoint(tmp_path, 1, model, opt, {"step": 1}, keep_last=3)

    def crash(tmp, final):
        assert tmp.name == "step_00000002.tmp" and final.name == "step_00000002"
        raise SimulatedKill("simulated crash at rename")

    monkeypatch.setattr(ckpt, "_publish", crash)  # the step that renames tmp -> final
    with pytest.raises(SimulatedKill, match="simulated crash"):
        save_checkpoint(tmp_path, 2, model, opt, {"step": 2}, keep_last=3)
    monkeypatch.undo()
    assert (tmp_path / "step_00000002.tmp" / "COMPLETE").exists()
    assert find_latest_checkpoint(tmp_path) == good
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]


def test_keep_last_prunes_oldest_and_replaces_same_step(tmp_path):
    model, opt, _ = build(0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, opt, {"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]

    with torch.no_grad():
        model.proj.weight.add_(1.0)
    want = model.proj.weight.detach().clone()
    save_checkpoint(tmp_path, 5, model, opt, {"step": 5, "again": True}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]
    other, other_opt, _ = build(3)
    assert load_checkpoint(tmp_path / "step_00000005", other, other_opt)["again"] is True
    assert torch.equal(other.proj.weight, want)


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    model, opt, _ = build(0)
    save_checkpoint(tmp_path, 10, model, opt, {}, keep_last=1)  # left over from an older run
    save_checkpoint(tmp_path, 3, model, opt, {}, keep_last=1)
    assert (tmp_path / "step_00000003" / "COMPLETE").exists()


def test_not_a_checkpoint_errors(tmp_path):
    model, opt, _ = build(0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", model, opt)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_checkpoint(tmp_path / "file", model, opt)
    with pytest.raises(ValueError, match="missing COMPLETE, .metadata, trainer_state.json"):
        load_checkpoint(tmp_path, model, opt)
    fake = tmp_path / "step_00000001"
    fake.mkdir()
    (fake / "COMPLETE").write_text("{}")
    (fake / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid checkpoint: missing .metadata"):
        load_checkpoint(fake, model, opt)
    assert find_latest_checkpoint(tmp_path / "nope") is None


def test_bad_arguments_write_nothing(tmp_path):
    model, opt, _ = build(0)
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path, 1, model, opt, {"t": torch.zeros(2)}, keep_last=1)
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=0)
    assert list(tmp_path.iterdir()) == []
