"""Ring attention on a 16K-token shard with documents never allocates a ``Tq x Tk`` tensor.

Two gloo ranks, 32K tokens in 5 documents whose boundaries cut the zigzag chunks; a dispatch mode
records the element count of every tensor an op returns during forward and backward. The block
plan comes from the host record of the boundaries (no dense mask); the blocks run PyTorch's fused
CPU flash kernels, which tile the score matrix internally.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import free_port

pytestmark = pytest.mark.distributed

T = 32768


class LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), str(func))
        return out


def _worker(rank: int, world: int, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from lctrain.kernels.varlen import attach_host_bounds
        from lctrain.parallel.context import (
            build_context_parallel,
            context_parallel_attention,
            shard_sequence,
        )

        cp = build_context_parallel([list(range(world))], "ring")
        bounds = [0, 3000, 9001, 20000, 20001, T]
        cu = attach_host_bounds(torch.tensor(bounds, dtype=torch.int32), bounds)
        g = torch.Generator().manual_seed(0)
        q, k, v = (shard_sequence(torch.randn(1, T, 1, 16, generator=g), world, rank).requires_grad_(True)
                   for _ in range(3))
        with LargestAllocation() as mode:
            out = context_parallel_attention(q, k, v, cu, cp, kernels="torch")
            out.float().square().sum().backward()
        res = {"largest": mode.largest[0], "op": mode.largest[1], "tq_tk": (T // world) ** 2,
               "finite": bool(torch.isfinite(q.grad).all())}
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


def test_ring_attention_16k_shard_allocates_no_block_matrix(tmp_path):
    out = tmp_path / "largest.json"
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    for res in json.loads(out.read_text()):
        assert res["finite"]
        # the largest tensor is an activation-sized buffer ([Tq, H, D] fp32 or the stacked K/V), far
        # below one [Tq, Tk] score or mask matrix (16K x 16K = 268 M elements)
        assert res["largest"] <= 4 * (T // 2) * 16, res
        assert res["largest"] * 100 < res["tq_tk"], res
