"""Mixture-of-experts FFN: top-k router, SwiGLU experts, shared experts, balancing losses.

Router formulas (scores, top-k, capacity, Switch aux loss, ST-MoE z-loss, DeepSeek-V3 bias
balancing) live in :mod:`lctrain.layers.routing`, shared with the routed attention layers.
Shared experts (DeepSeekMoE, Dai et al. 2024): an always-on SwiGLU added to the routed output,
optionally scaled per token by a learned sigmoid gate ``sigmoid(x w_g)`` with ``w_g: D -> 1``
(``shared_expert_gate``, as in Qwen1.5-MoE / Qwen2-MoE / Qwen3-Next).

Seams applied from outside (the layer imports no parallel code):

* ``dispatcher``: how routed slots reach their experts. :class:`LocalDispatcher` (all experts
  here) by default; expert parallelism (``shard_experts`` of the parallel package) keeps
  this rank's slice of ``experts`` and swaps in an all-to-all dispatcher.
* ``balance_group``: under context parallelism each rank routes its own sequence shard, and
  ``f_i`` of the load-balancing loss is counted over this process group (set by
  ``apply_context_parallel`` of the parallel package), so the losses equal those of the
  unsharded micro-batch. Capacity is computed per rank from its local tokens (as Megatron-Core
  does before dispatch), so with ``capacity_factor > 0`` which slots drop depends on the layout.

The trainer sets ``aux_loss_scale`` per step (:func:`lctrain.layers.routing.set_aux_loss_scale`)
and reduces ``routing_stats`` after each optimizer step
(``routing_step`` of the training metrics), which calls :meth:`MoE.after_step`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lctrain.errors import ConfigError
from lctrain.kernels.moe import grouped_swiglu
from lctrain.kernels.moe.dispatch import local_dispatch_combine
from lctrain.layers.ffn import SwiGLU
from lctrain.layers.routing import (
    AuxLossScaler,
    RoutingStats,
    capacity_keep_mask,
    expert_bias_update,
    load_balancing_loss,
    router_scores,
    router_z_loss,
    topk_route,
)

SCORE_FUNCS = ("softmax", "sigmoid")
EXPERT_IMPLS = ("auto", "grouped", "loop", "triton")


@dataclass
class MoEConfig:
    """Section ``model.moe``: mixture-of-experts FFNs (:class:`MoE`); ``num_experts = 0`` keeps every FFN dense.

    ``score_func``: ``softmax`` (over all experts) or ``sigmoid`` (per expert, DeepSeek-V3).
    ``norm_topk_prob``: renormalise the ``top_k`` selected scores to sum to 1 (Mixtral/Qwen-MoE
    "top-k then renormalise"); false keeps the raw scores ("softmax then top-k", Switch/GShard).
    ``ffn_hidden_size``: per-expert SwiGLU width (0: ``model.ffn_hidden_size`` default / ``top_k``,
    rounded up to a multiple of 64). ``num_shared_experts`` always-on experts of the same width,
    computed as one SwiGLU of ``num_shared_experts * ffn_hidden_size`` (``shared_expert_hidden_size``
    > 0 sets that width directly); ``shared_expert_gate`` multiplies the shared output by a per-token
    ``sigmoid(x w_g)`` (``w_g`` [1, D]).
    ``aux_loss_coeff``: Switch load-balancing loss; ``z_loss_coeff``: ST-MoE router z-loss;
    ``bias_update_rate``: DeepSeek-V3 aux-loss-free balancing (0 = off). ``capacity_factor``: 0 =
    dropless, else each expert takes ``ceil(capacity_factor * tokens * top_k / num_experts)`` slots.
    ``layers``: which blocks get an MoE FFN: ``all``, ``every_other`` (blocks 1, 3, ...),
    ``every_<n>`` (blocks n-1, 2n-1, ...) or a comma list of block indices (``"0,2"``).
    ``expert_impl``: ``auto`` (torch ``_grouped_mm`` where supported, else Triton on CUDA, else
    ``loop``), ``grouped``, ``loop`` (sorted-segment loop) or ``triton`` (lctrain.kernels.moe).
    """

    num_experts: int = 0
    top_k: int = 2
    score_func: str = "softmax"
    norm_topk_prob: bool = True
    ffn_hidden_size: int = 0
    num_shared_experts: int = 0
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.001
    bias_update_rate: float = 0.0
    capacity_factor: float = 0.0
    layers: str = "all"
    expert_impl: str = "auto"
    shared_expert_gate: bool = False
    shared_expert_hidden_size: int = 0

    def validate(self, n_layers: int, prefix: str = "model.moe") -> None:
        """Raise :class:`~lctrain.errors.ConfigError` naming the bad key and what is allowed."""
        if self.score_func not in SCORE_FUNCS:
            raise ConfigError(f"invalid {prefix}.score_func={self.score_func!r}: allowed values are {', '.join(SCORE_FUNCS)}")
        if self.expert_impl not in EXPERT_IMPLS:
            raise ConfigError(
                f"invalid {prefix}.expert_impl={self.expert_impl!r}: allowed values are {', '.join(EXPERT_IMPLS)}"
            )
        if self.num_experts < 0:
            raise ConfigError(f"invalid {prefix}.num_experts={self.num_experts!r}: must be >= 0 (0 = dense FFN everywhere)")
        if self.num_experts == 0:
            return
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"invalid {prefix}.top_k={self.top_k!r}: must be in [1, {prefix}.num_experts={self.num_experts}]")
        for key in ("ffn_hidden_size", "num_shared_experts", "shared_expert_hidden_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"invalid {prefix}.{key}={getattr(self, key)!r}: must be >= 0 (0 = default / none)")
        for key in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
            if getattr(self, key) < 0:
                raise ConfigError(f"invalid {prefix}.{key}={getattr(self, key)!r}: must be >= 0 (0 disables it)")
        for key in ("shared_expert_gate", "shared_expert_hidden_size"):
            if getattr(self, key) and self.num_shared_experts < 1:
                raise ConfigError(
                    f"invalid {prefix}.{key}={getattr(self, key)!r}: needs a shared expert "
                    f"({prefix}.num_shared_experts >= 1, now {self.num_shared_experts})"
                )
        if self.capacity_factor < 0:
            raise ConfigError(f"invalid {prefix}.capacity_factor={self.capacity_factor!r}: must be 0 (dropless) or > 0")
        try:
            moe_layer_indices(self.layers, n_layers)
        except ValueError as err:
            raise ConfigError(str(err)) from err


def moe_layer_indices(layers: str, n_layers: int) -> list[int]:
    """Block indices that get an MoE FFN for ``model.moe.layers`` (see :class:`MoEConfig`).

    Raises:
        ValueError: an unknown form or an index outside ``[0, n_layers)``; the message names the forms.
    """
    spec = str(layers).strip().replace(" ", "")
    allowed = "allowed: all, every_other, every_<n> (n >= 1), or a comma list of block indices like \"0,2\""
    if spec == "all":
        return list(range(n_layers))
    if spec == "every_other":
        spec = "every_2"
    if spec.startswith("every_"):
        n = spec[len("every_"):]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"invalid model.moe.layers={layers!r}: {allowed}")
        return [i for i in range(n_layers) if i % int(n) == int(n) - 1]
    parts = [x for x in spec.split(",") if x]
    if not parts or not all(x.isdigit() for x in parts):
        raise ValueError(f"invalid model.moe.layers={layers!r}: {allowed}")
    idx = sorted({int(x) for x in parts})
    if idx[-1] >= n_layers:
        raise ValueError(f"invalid model.moe.layers={layers!r}: block index {idx[-1]} >= model.n_layers={n_layers}")
    return idx


def default_expert_hidden_size(d_model: int, dense_hidden_size: int, top_k: int, ffn_hidden_size: int = 0) -> int:
    """Per-expert width: ``ffn_hidden_size`` if > 0, else ``dense_hidden_size / top_k`` rounded up to 64."""
    if ffn_hidden_size > 0:
        return ffn_hidden_size
    return 64 * math.ceil(dense_hidden_size / top_k / 64)


class LocalDispatcher:
    """Route slots to experts that are all on this device (:func:`lctrain.kernels.moe.dispatch.local_dispatch_combine`).

    ``__call__(x [S, D], slot_token int64 [N], slot_expert int64 [N], slot_weight [N], num_experts,
    expert_fn) -> [S, D]`` in ``x.dtype``: ``y_s = sum over slots of s of weight * expert(x_s)``.
    """

    def __call__(self, x, slot_token, slot_expert, slot_weight, num_experts, expert_fn) -> torch.Tensor:
        return local_dispatch_combine(x, slot_token, slot_expert, slot_weight, num_experts, expert_fn)


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as stacked weights.

    Parameters: ``gate_up_proj [E, D, 2F]`` (gate columns then up), ``down_proj [E, F, D]``.
    Under expert parallelism ``E`` is the number of local experts.
    """

    def __init__(self, num_experts: int, d_model: int, hidden_size: int, impl: str = "auto"):
        super().__init__()
        self.num_experts, self.d_model, self.hidden_size, self.impl = num_experts, d_model, hidden_size, impl
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, d_model))

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x [N, D]`` sorted by expert, ``tokens_per_expert int [E]`` -> ``[N, D]``."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(x.device.type):  # _grouped_mm is not on autocast's cast lists
            dtype = torch.get_autocast_dtype(x.device.type)
            x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
        return grouped_swiglu(x, tokens_per_expert, gate_up, down, self.impl)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, hidden_size={self.hidden_size}"


class MoE(nn.Module):
    """Routed SwiGLU experts (+ optional shared experts) replacing a block's dense FFN.

    Args:
        d_model: D.
        cfg: :class:`MoEConfig` (``num_experts >= 1``).
        dense_hidden_size: the dense FFN width (for the default expert width).

    Submodules / state: ``router`` (Linear D -> E, no bias, computed in fp32), ``experts``
    (:class:`GroupedExperts`), ``shared_experts`` (SwiGLU of width ``num_shared_experts * F`` or
    ``shared_expert_hidden_size``, or None), ``shared_expert_gate`` (Linear D -> 1, no bias, or
    None), buffer ``expert_bias`` [E] fp32 (persistent: checkpointed), ``routing_stats``
    (:class:`~lctrain.layers.routing.RoutingStats`, not checkpointed), ``dispatcher`` and
    ``balance_group`` (the seams of the module docstring).

    ``forward(x [..., D]) -> [..., D]`` (same dtype). In training mode with gradients enabled the
    aux and z losses are attached via :class:`AuxLossScaler` with ``aux_loss_scale`` and the
    routing loads / losses are accumulated in ``routing_stats``.

    Raises:
        ValueError: ``num_experts < 1`` or ``top_k`` outside ``[1, num_experts]``.
    """

    def __init__(self, d_model: int, cfg: MoEConfig, dense_hidden_size: int):
        super().__init__()
        if cfg.num_experts < 1 or not 1 <= cfg.top_k <= cfg.num_experts:
            raise ValueError(
                f"MoE needs model.moe.num_experts >= 1 and 1 <= top_k <= num_experts, got {cfg.num_experts}, {cfg.top_k}"
            )
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.hidden_size = default_expert_hidden_size(d_model, dense_hidden_size, cfg.top_k, cfg.ffn_hidden_size)
        self.router = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, d_model, self.hidden_size, cfg.expert_impl)
        shared_width = cfg.shared_expert_hidden_size or self.hidden_size * cfg.num_shared_experts
        self.shared_experts = SwiGLU(d_model, shared_width) if cfg.num_shared_experts > 0 else None
        self.shared_expert_gate = (
            nn.Linear(d_model, 1, bias=False) if cfg.num_shared_experts > 0 and cfg.shared_expert_gate else None
        )
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)
        self.routing_stats = RoutingStats.zeros(cfg.num_experts)
        self.aux_loss_scale = 1.0
        self.dispatcher = LocalDispatcher()  # expert parallelism swaps in an all-to-all dispatcher
        self.balance_group = None  # context parallelism: the group counting f_i of the balance loss

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Router, expert gate/up, shared gate/up and shared-expert gate ``N(0, std)``; down projections
        ``N(0, out_std)``; bias 0."""
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.experts.gate_up_proj, std=std)
        nn.init.normal_(self.experts.down_proj, std=out_std)
        if self.shared_experts is not None:
            nn.init.normal_(self.shared_experts.gate_proj.weight, std=std)
            nn.init.normal_(self.shared_experts.up_proj.weight, std=std)
            nn.init.normal_(self.shared_experts.down_proj.weight, std=out_std)
        if self.shared_expert_gate is not None:
            nn.init.normal_(self.shared_expert_gate.weight, std=std)
        self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        S = h.shape[0]
        E, K, cfg = self.num_experts, self.top_k, self.cfg
        with torch.autocast(h.device.type, enabled=False):  # router in fp32 (Megatron moe_router_dtype=fp32)
            logits = F.linear(h.float(), self.router.weight.float())
        scores = router_scores(logits, cfg.score_func)
        bias = self.expert_bias if cfg.bias_update_rate > 0 else None
        topk_weight, topk_idx = topk_route(scores, K, cfg.norm_topk_prob, bias)
        keep = None
        if cfg.capacity_factor > 0:
            capacity = math.ceil(cfg.capacity_factor * S * K / E)
            keep = capacity_keep_mask(topk_weight, topk_idx, E, capacity)
        slot_token = torch.arange(S, device=h.device).repeat_interleave(K)
        slot_expert, slot_weight = topk_idx.flatten(), topk_weight.flatten()
        if keep is not None:
            k = keep.flatten()
            slot_token, slot_expert, slot_weight = slot_token[k], slot_expert[k], slot_weight[k]
        y = self.dispatcher(h, slot_token, slot_expert, slot_weight, E, self.experts)
        if self.shared_experts is not None:
            shared = self.shared_experts(h)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            y = y + shared
        if self.training and torch.is_grad_enabled():
            probs = scores if cfg.score_func == "softmax" else scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
            aux = load_balancing_loss(probs, topk_idx, E, self.balance_group)
            z = router_z_loss(logits)
            total = cfg.aux_loss_coeff * aux + cfg.z_loss_coeff * z
            if total.requires_grad and (cfg.aux_loss_coeff > 0 or cfg.z_loss_coeff > 0):
                y = AuxLossScaler.apply(y, total, self.aux_loss_scale)
            if self.routing_stats.load.device != h.device:
                self.routing_stats.to(h.device)
            # tensors only: no host sync on GPU
            self.routing_stats.add(topk_idx, cfg.aux_loss_coeff * aux, cfg.z_loss_coeff * z,
                                   (~keep).sum() if keep is not None else None)
        return y.reshape(shape)

    @torch.no_grad()
    def after_step(self, stats: RoutingStats) -> None:
        """After the optimizer step: DeepSeek-V3 bias update from the step's loads reduced over all ranks."""
        if self.cfg.bias_update_rate > 0 and float(stats.load.mean()) > 0:
            self.expert_bias.copy_(expert_bias_update(self.expert_bias, stats.load, self.cfg.bias_update_rate))

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"num_experts={c.num_experts}, top_k={c.top_k}, score_func={c.score_func}, "
                f"capacity_factor={c.capacity_factor}, local_experts={self.experts.num_experts}")


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """``(name, module)`` of every :class:`MoE` in ``model`` (DDP-wrapped or not), in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
