"""Token routing shared by every routed layer: scores, top-k, capacity, balancing losses, statistics.

The MoE FFN (:mod:`lctrain.layers.moe`) and the routed attention mixers build on these pieces.
Sources of each formula (``S`` tokens, ``E`` experts, ``K = top_k``, router logits ``z [S, E]``):

* Scores: ``softmax`` over experts (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2022)
  or per-expert ``sigmoid`` (DeepSeek-V3, Liu et al. 2024, eq. 15). The top-k weights are
  renormalised to sum to one when ``norm_topk_prob`` ("top-k then renormalise": Mixtral,
  Qwen-MoE, DeepSeek-V3 eq. 13), or used as they are ("softmax then top-k": Switch, GShard).
* Aux-loss-free balancing (DeepSeek-V3 Sec. 2.1.2; Wang et al. 2024): a per-expert bias ``b`` is
  added to the scores *for selection only*; after each optimizer step
  ``b_i += rate * sign(mean_load - load_i)`` with loads counted over the step's global batch.
* Load-balancing loss (Switch Transformer eq. 4-6, top-k form as in Megatron-Core):
  ``E * sum_i f_i * P_i``, ``f_i`` the fraction of the ``S * K`` routed slots that chose ``i``,
  ``P_i`` the mean router probability of ``i``. Equals 1 under uniform routing.
* Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): ``mean_s(logsumexp(z_s)^2)``.
* Capacity (GShard / Switch): each expert takes at most ``ceil(capacity_factor * S * K / E)``
  slots; the lowest-scoring slots are dropped first (Megatron's "probs" drop policy).

Losses reach the gradient through :class:`AuxLossScaler` (the Megatron-Core approach): the layer
output is unchanged and its backward adds ``d(scale * loss)`` to the router, so the losses need
not travel through DDP wrappers or activation checkpointing.

Step statistics: a routed layer accumulates a :class:`RoutingStats` over the micro-batches of an
optimizer step (device tensors only, no host sync); the trainer reduces them over ranks with
``routing_step`` of the training metrics, which then calls the layer's ``after_step`` (e.g. the
bias update) and resets them. A routed layer is any module with a ``routing_stats`` attribute
holding a :class:`RoutingStats` (see :func:`routed_layers`). A forward that activation
checkpointing re-runs in backward counts nothing (:func:`recomputing`), so every statistic counts
each micro-batch once with or without checkpointing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import nn

from lctrain.kernels.moe.dispatch import expert_counts

_state = threading.local()


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark a forward as a recomputation (activation checkpointing re-running it in backward).

    Layers' step statistics (:meth:`RoutingStats.add`, MoH head counts, MoBA attended fractions)
    skip counting inside it: the original forward already counted those tokens. Re-entrant;
    thread-local (autograd may run backward on another thread).
    """
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


def is_recomputing() -> bool:
    """True inside :func:`recomputing`."""
    return getattr(_state, "depth", 0) > 0


def router_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """fp32 router scores [S, E] from logits [S, E]: ``softmax`` over experts or elementwise ``sigmoid``.

    Raises:
        ValueError: unknown ``score_func``.
    """
    if score_func == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits.float())
    raise ValueError(f"score_func={score_func!r}: allowed values are softmax, sigmoid")


def topk_route(
    scores: torch.Tensor, top_k: int, norm_topk_prob: bool, expert_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ``top_k`` experts per token; returns ``(topk_weight fp32 [S, K], topk_idx int64 [S, K])``.

    Selection uses ``scores + expert_bias`` (DeepSeek-V3 eq. 16; the bias never enters the weights);
    weights are the unbiased scores of the selected experts, renormalised to sum to one per
    token when ``norm_topk_prob``.
    """
    select = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
    idx = torch.topk(select, top_k, dim=-1, sorted=True).indices
    weight = scores.gather(-1, idx)
    if norm_topk_prob:
        weight = weight / weight.sum(-1, keepdim=True).clamp_min(1e-20)
    return weight, idx


def load_balancing_loss(probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, group=None) -> torch.Tensor:
    """Switch load-balancing loss without its coefficient: ``E * sum_i f_i * P_i`` (fp32 scalar).

    Args:
        probs: [S, E] router probabilities (rows sum to one), differentiable.
        topk_idx: int64 [S, K] selected experts (no gradient).
        num_experts: E.
        group: optional process group whose ranks hold the other shards of the same sequences
            (context parallelism): ``f`` is then counted over all of them (one all-reduce, no
            gradient) while ``P`` stays local, so the mean of the ranks' losses equals the loss of
            the whole micro-batch when the shards are the same size (as Megatron-Core does).

    ``f_i = count_i / (S * K)``, ``P_i = mean_s probs[s, i]`` (Fedus et al. 2022, eq. 4-6).
    """
    S, K = topk_idx.shape
    counts = expert_counts(topk_idx, num_experts).to(probs.dtype)
    total = torch.tensor([float(S * K)], dtype=probs.dtype, device=probs.device)
    if group is not None:
        packed = torch.cat([counts, total])
        dist.all_reduce(packed, group=group)
        counts, total = packed[:-1], packed[-1:]
    f = counts / total.clamp_min(1.0)
    P = probs.mean(0) if S > 0 else probs.sum(0)
    return num_experts * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss without its coefficient: ``mean_s logsumexp(logits_s)^2`` (fp32 scalar)."""
    if logits.shape[0] == 0:
        return logits.float().sum()
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def capacity_keep_mask(topk_weight: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """bool [S, K]: which slots fit in their expert's ``capacity``, highest routing weight first.

    Ties are broken by token order (earlier token wins), so the result is deterministic.
    """
    S, K = topk_idx.shape
    flat_e = topk_idx.flatten()
    flat_w = topk_weight.detach().flatten()
    by_weight = torch.argsort(-flat_w, stable=True)
    order = by_weight[torch.argsort(flat_e[by_weight], stable=True)]  # expert-major, weight-descending
    counts = expert_counts(flat_e, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(order.numel(), device=flat_e.device) - starts[flat_e[order]]
    keep = torch.zeros(S * K, dtype=torch.bool, device=flat_e.device)
    keep[order] = rank_in_expert < capacity
    return keep.view(S, K)


def expert_bias_update(expert_bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3 aux-loss-free update: ``b_i + rate * sign(mean(load) - load_i)`` (new tensor)."""
    load = tokens_per_expert.to(expert_bias.dtype)
    return expert_bias + rate * torch.sign(load.mean() - load)


class AuxLossScaler(torch.autograd.Function):
    """Identity on ``output``; backward also sends gradient ``scale`` into ``aux_loss``."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


@dataclass
class RoutingStats:
    """Routing statistics of one layer accumulated over an optimizer step (fp64 tensors on one device).

    Attributes:
        load: [E] routed slots per expert (or head), counted before capacity dropping.
        aux_loss: sum over forward calls of the weighted balance loss (``coeff * loss``).
        z_loss: sum over forward calls of the weighted z-loss.
        dropped: slots dropped by capacity.
        slots: routed slots (``S * K`` summed over calls).
        calls: forward calls counted (micro-batches).
    """

    load: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped: torch.Tensor
    slots: torch.Tensor
    calls: torch.Tensor

    @classmethod
    def zeros(cls, num_experts: int, device: torch.device | str | None = None) -> RoutingStats:
        z = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        return cls(torch.zeros(num_experts, dtype=torch.float64, device=device), z(), z(), z(), z(), z())

    @property
    def num_experts(self) -> int:
        return self.load.numel()

    @torch.no_grad()
    def add(self, topk_idx: torch.Tensor, aux_loss: torch.Tensor, z_loss: torch.Tensor,
            dropped: torch.Tensor | None = None) -> None:
        """Count one forward call: ``topk_idx`` int [S, K] selections, weighted losses, dropped slots.

        Nothing is counted during a recomputation (:func:`recomputing`).
        """
        if is_recomputing():
            return
        self.load += expert_counts(topk_idx, self.num_experts).to(torch.float64)
        self.aux_loss += aux_loss.detach().double()
        self.z_loss += z_loss.detach().double()
        if dropped is not None:
            self.dropped += dropped.double()
        self.slots += float(topk_idx.numel())
        self.calls += 1.0

    def pack(self) -> torch.Tensor:
        """fp64 [E + 5]: ``load`` then the five scalars in field order (for one all-reduce)."""
        return torch.cat([self.load] + [getattr(self, f.name).reshape(1) for f in fields(self)[1:]])

    @classmethod
    def unpack(cls, flat: torch.Tensor, num_experts: int) -> RoutingStats:
        """Inverse of :meth:`pack`."""
        scalars = flat[num_experts:]
        return cls(flat[:num_experts], *(scalars[i] for i in range(len(fields(cls)) - 1)))

    def to(self, device: torch.device | str) -> RoutingStats:
        """Move every counter to ``device`` in place (a routed layer calls it when its input moved); returns self."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name).to(device))
        return self

    @torch.no_grad()
    def reset(self) -> None:
        for f in fields(self):
            getattr(self, f.name).zero_()


def routed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every routed layer of ``model`` (DDP-wrapped or not), in module order.

    A routed layer has a ``routing_stats`` attribute (a :class:`RoutingStats`) and an
    ``after_step(stats)`` method called with the step's statistics reduced over all ranks.
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "routing_stats", None), RoutingStats)]


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Set the gradient weight of the aux/z losses of every routed layer (once per optimizer step)."""
    for _, m in routed_layers(model):
        m.aux_loss_scale = float(scale)
