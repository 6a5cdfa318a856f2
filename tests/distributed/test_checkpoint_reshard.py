"""DCP resharding: 2 DDP or FSDP2 ranks save -> 1 process loads; 1 process saves -> 2 DDP ranks load.

References are the tensors the saving side held, written with ``torch.save`` next to the
checkpoint and compared with ``torch.equal``.
"""

from __future__ import annotations

import random
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from lctrain.config import OptimConfig
from lctrain.checkpoint import load_checkpoint, save_checkpoint
from lctrain.train.optim import build_optimizer

pytestmark = pytest.mark.distributed

OCFG = OptimConfig(lr=1e-2, weight_decay=0.1)
VOCAB, DIM = 16, 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.embed(x) + torch.tanh(self.proj(self.norm(self.embed(x)))))


def train(model, opt, steps):
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (2, 6))
        loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t.clone()


def snapshot(module, opt):
    """Full (unsharded) parameters and AdamW states by name."""
    params = {n: _full(p.detach()) for n, p in module.named_parameters()}
    state = {n: {k: _full(v) for k, v in opt.state[p].items()} for n, p in module.named_parameters()}
    return params, state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, root):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DDP(Net())
        opt = build_optimizer(model, OCFG, "cpu")
        torch.manual_seed(100 + rank)  # different data (and RNG state) on each rank
        random.seed(100 + rank)
        np.random.seed(100 + rank)
        train(model, opt, 3)
        save_checkpoint(root / "two", 3, model, opt, {"step": 3, "world": world}, keep_last=1)
        params, state = snapshot(model.module, opt)
        after = (torch.rand(4), random.random(), float(np.random.rand()))
        torch.save({"params": params, "state": state, "after": after}, root / f"ref_rank{rank}.pt")

        # FSDP2: parameters and optimizer states are DTensor shards (dim 0 split over the ranks)
        torch.manual_seed(0)
        sharded = Net()
        fully_shard(sharded)
        assert isinstance(sharded.proj.weight, DTensor)
        sharded_opt = build_optimizer(sharded, OCFG, "cpu")
        train(sharded, sharded_opt, 2)
        save_checkpoint(root / "fsdp", 2, sharded, sharded_opt, {"step": 2}, keep_last=1)
        params, state = snapshot(sharded, sharded_opt)
        torch.save({"params": params, "state": state}, root / f"fsdp_ref_rank{rank}.pt")

        # 1 -> 2: load the checkpoint the parent wrote alone; rank 1 falls back to rank 0's RNG
        torch.manual_seed(999)
        fresh = DDP(Net())
        fresh_opt = build_optimizer(fresh, OCFG, "cpu")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            extra = load_checkpoint(root / "one" / "step_00000002", fresh, fresh_opt)
        fell_back = any("restores rank 0's RNG state" in str(w.message) for w in caught)
        params, state = snapshot(fresh.module, fresh_opt)
        drawn = (torch.rand(4), random.random(), float(np.random.rand()))
        torch.save({"params": params, "state": state, "extra": extra, "drawn": drawn, "fell_back": fell_back},
                   root / f"loaded_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def assert_loads_into_one_process(path, ref, extra):
    torch.manual_seed(42)
    plain = Net()
    plain_opt = build_optimizer(plain, OCFG, "cpu")
    assert load_checkpoint(path, plain, plain_opt) == extra
    params, state = snapshot(plain, plain_opt)
    assert params.keys() == ref["params"].keys()
    for n in params:
        assert torch.equal(params[n], ref["params"][n]), n
        assert state[n].keys() == ref["state"][n].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k in state[n]:
            assert torch.equal(state[n][k], ref["state"][n][k]), (n, k)


def test_reshard_two_ranks_to_one_and_back(tmp_path):
    # the parent's single-process checkpoint for the 1 -> 2 direction
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    model = Net()
    opt = build_optimizer(model, OCFG, "cpu")
    train(model, opt, 2)
    save_checkpoint(tmp_path / "one", 2, model, opt, {"step": 2}, keep_last=1)
    one_params, one_state = snapshot(model, opt)
    one_after = (torch.rand(4), random.random(), float(np.random.rand()))

    mp.spawn(worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)

    # 2 -> 1: a plain model + optimizer in this process
    ref = torch.load(tmp_path / "ref_rank0.pt", weights_only=False)
    ref1 = torch.load(tmp_path / "ref_rank1.pt", weights_only=False)
    assert not torch.equal(ref["after"][0], ref1["after"][0])  # ranks' RNG really differ
    assert_loads_into_one_process(tmp_path / "two" / "step_00000003", ref, {"step": 3, "world": 2})
    drawn = (torch.rand(4), random.random(), float(np.random.rand()))
    assert torch.equal(drawn[0], ref["after"][0]) and drawn[1:] == ref["after"][1:]

    # FSDP2 shards -> 1 process
    fsdp_ref = torch.load(tmp_path / "fsdp_ref_rank0.pt", weights_only=False)
    assert not torch.equal(fsdp_ref["params"]["proj.weight"], ref["params"]["proj.weight"])
    assert_loads_into_one_process(tmp_path / "fsdp" / "step_00000002", fsdp_ref, {"step": 2})

    # 1 -> 2: both ranks hold the parent's state and continue rank 0's RNG stream
    for rank in range(2):
        got = torch.load(tmp_path / f"loaded_rank{rank}.pt", weights_only=False)
        assert got["extra"] == {"step": 2}
        assert got["fell_back"] == (rank == 1)
        for n in one_params:
            assert torch.equal(got["params"][n], one_params[n]), (rank, n)
            for k in one_state[n]:
                assert torch.equal(got["state"][n][k], one_state[n][k]), (rank, n, k)
        assert torch.equal(got["drawn"][0], one_after[0]) and got["drawn"][1:] == one_after[1:]
