"""Differentiable collectives used by context parallelism (work with gloo and NCCL).

* :func:`all_gather_stack`: ``[...] -> [W, ...]``; backward sums the incoming gradients over the
  group (all-reduce) and keeps this rank's slice, because every rank's loss depends on every
  rank's contribution.
* :func:`all_to_all`: split ``scatter_dim`` into W parts, send part ``j`` to rank ``j``, and
  concatenate what arrives along ``gather_dim`` (rank order); the backward is the same exchange
  with the two dims swapped (Ulysses, Jacobs et al., "DeepSpeed Ulysses", 2023).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGatherStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        W = dist.get_world_size(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(W)]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def all_gather_stack(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather: ``x [...]`` on each of W ranks -> ``[W, ...]`` (rank order)."""
    return _AllGatherStack.apply(x, group)


def _exchange(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    W = dist.get_world_size(group)
    if x.shape[scatter_dim] % W:
        raise ValueError(f"all_to_all: dim {scatter_dim} of {tuple(x.shape)} is not divisible by {W} ranks")
    send = torch.stack(torch.chunk(x, W, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.args = (group, scatter_dim, gather_dim)
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group, scatter_dim, gather_dim = ctx.args
        return _exchange(grad, group, gather_dim, scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable all-to-all (see module docstring); ``x.shape[scatter_dim]`` divisible by W."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)
