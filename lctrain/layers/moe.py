"""Mixture-of-experts FFN: top-k router, SwiGLU experts, shared experts, balancing losses.

Sources of each formula (``S`` tokens, ``E`` experts, ``K = top_k``, router logits ``z [S, E]``):

* Scores: ``softmax`` over experts (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2022)
  or per-expert ``sigmoid`` (DeepSeek-V3, Liu et al. 2024, eq. 15). The top-k weights are
  renormalised to sum to one when ``norm_topk_prob`` ("top-k then renormalise": Mixtral,
  Qwen-MoE, DeepSeek-V3 eq. 13), or used as they are ("softmax then top-k": Switch, GShard,
  DeepSeek-V2).
* Aux-loss-free balancing (DeepSeek-V3 Sec. 2.1.2 / Wang et al. 2024 "Auxiliary-Loss-Free Load
  Balancing"): a per-expert bias ``b`` is added to the scores *for selection only*; after each
  optimizer step ``b_i += rate * sign(mean_load - load_i)`` with loads counted over the step's
  global batch (all ranks).
* Load-balancing loss (Switch Transformer eq. 4-6, top-k form as in Megatron-Core):
  ``aux_loss = coeff * E * sum_i f_i * P_i``, ``f_i`` = fraction of the ``S * K`` routed slots
  that chose expert ``i`` (before capacity dropping), ``P_i`` = mean over tokens of the router
  probability of ``i`` (softmax scores; for ``sigmoid`` the scores normalised to sum to one per
  token, DeepSeek-V3 eq. 18-20). Equals ``coeff`` under perfectly uniform routing.
* Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): ``z_loss = coeff * mean_s(logsumexp(z_s)^2)``.
* Capacity (GShard / Switch): each expert takes at most ``ceil(capacity_factor * S * K / E)``
  slots; when more choose it, the slots with the lowest routing score are dropped first
  (Megatron's "probs" drop policy). ``capacity_factor = 0``: dropless (MegaBlocks, Gale et al. 2023).
* Shared experts (DeepSeekMoE, Dai et al. 2024): an always-on SwiGLU added to the routed output.

Parallelism: expert parallelism is :mod:`lctrain.parallel.expert` (set by ``shard_experts``).
Under context parallelism each rank routes its own sequence shard; only ``f_i`` of the
load-balancing loss is counted over the context-parallel group, so the losses equal those of the
unsharded micro-batch. Capacity is computed per rank from its local tokens (as Megatron-Core
does before dispatch), so with ``capacity_factor > 0`` which slots drop depends on the layout.

Both losses reach the gradient through :class:`AuxLossScaler` (the Megatron-Core approach): the
forward output is unchanged and the backward adds ``d(scale * loss)`` to the router, so the
losses need not travel through DDP wrappers or activation checkpointing; the trainer sets
``scale`` per micro-batch (:func:`set_aux_loss_scale`) and reads the logged values from
:meth:`MoE.pop_step_stats`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lctrain.config import MoEConfig
from lctrain.kernels.moe import grouped_swiglu
from lctrain.layers.ffn import SwiGLU


def default_expert_hidden_size(d_model: int, dense_hidden_size: int, top_k: int, ffn_hidden_size: int = 0) -> int:
    """Per-expert width: ``ffn_hidden_size`` if > 0, else ``dense_hidden_size / top_k`` rounded up to 64."""
    if ffn_hidden_size > 0:
        return ffn_hidden_size
    return 64 * math.ceil(dense_hidden_size / top_k / 64)


def router_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """fp32 router scores [S, E] from logits [S, E]: ``softmax`` over experts or elementwise ``sigmoid``.

    Raises:
        ValueError: unknown ``score_func``.
    """
    if score_func == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits.float())
    raise ValueError(f"model.moe.score_func={score_func!r}: allowed values are softmax, sigmoid")


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


def load_balancing_loss(
    probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, group=None
) -> torch.Tensor:
    """Switch load-balancing loss without its coefficient: ``E * sum_i f_i * P_i`` (fp32 scalar).

    Args:
        probs: [S, E] router probabilities (rows sum to one), differentiable.
        topk_idx: int64 [S, K] selected experts (no gradient).
        num_experts: E.
        group: optional process group whose ranks hold the other shards of the same sequences
            (context parallelism): ``f`` is then counted over all of them (one all-reduce, no
            gradient) while ``P`` stays local, so the mean of the ranks' losses equals the loss of
            the whole micro-batch when the shards are the same size (Megatron-Core does the same).

    ``f_i = count_i / (S * K)``, ``P_i = mean_s probs[s, i]`` (Fedus et al. 2022, eq. 4-6).
    """
    S, K = topk_idx.shape
    counts = torch.bincount(topk_idx.flatten(), minlength=num_experts).to(probs.dtype)
    total = torch.tensor([float(S * K)], dtype=probs.dtype, device=probs.device)
    if group is not None:
        import torch.distributed as dist

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
    counts = torch.bincount(flat_e, minlength=num_experts)
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
        cfg: :class:`lctrain.config.MoEConfig` (``num_experts >= 1``).
        dense_hidden_size: the dense FFN width (for the default expert width).

    Submodules / state: ``router`` (Linear D -> E, no bias, computed in fp32), ``experts``
    (:class:`GroupedExperts`), ``shared_experts`` (SwiGLU of width ``num_shared_experts * F``, or
    None), buffer ``expert_bias`` [E] fp32 (persistent: checkpointed), step statistics
    (non-persistent).

    ``forward(x [..., D]) -> [..., D]`` (same dtype). In training mode with gradients enabled the
    aux and z losses are attached via :class:`AuxLossScaler` with ``aux_loss_scale`` and the
    routing loads / losses are accumulated for :meth:`pop_step_stats`.

    Raises:
        ValueError: ``num_experts < 1`` or ``top_k`` outside ``[1, num_experts]``.
    """

    # Tokens are routed independently, so a sequence shard needs nothing from the other context-parallel
    # ranks except the expert counts of the load-balancing loss (see load_balancing_loss).
    supports_context_parallel = True

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
        self.shared_experts = (
            SwiGLU(d_model, self.hidden_size * cfg.num_shared_experts) if cfg.num_shared_experts > 0 else None
        )
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)
        self.register_buffer("step_tokens_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float64), persistent=False)
        # aux_loss sum, z_loss sum, dropped slots, routed slots, forward calls
        self.register_buffer("step_stats", torch.zeros(5, dtype=torch.float64), persistent=False)
        self.aux_loss_scale = 1.0
        self.ep = None  # lctrain.parallel.expert.ExpertParallel after shard_experts
        self.context_parallel = None  # set by lctrain.parallel.context.apply_context_parallel

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Router, expert gate/up and shared gate/up ``N(0, std)``; down projections ``N(0, out_std)``; bias 0."""
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.experts.gate_up_proj, std=std)
        nn.init.normal_(self.experts.down_proj, std=out_std)
        if self.shared_experts is not None:
            nn.init.normal_(self.shared_experts.gate_proj.weight, std=std)
            nn.init.normal_(self.shared_experts.up_proj.weight, std=std)
            nn.init.normal_(self.shared_experts.down_proj.weight, std=out_std)
        self.expert_bias.zero_()

    def shard_experts(self, ep) -> None:
        """Keep experts ``[ep_rank * E/ep, (ep_rank+1) * E/ep)`` and route over ``ep`` (see parallel.expert)."""
        if self.num_experts % ep.ep_degree:
            raise ValueError(
                f"model.moe.num_experts={self.num_experts} is not divisible by parallel.ep_degree={ep.ep_degree}"
            )
        n = self.num_experts // ep.ep_degree
        sl = slice(ep.ep_rank * n, (ep.ep_rank + 1) * n)
        self.experts.gate_up_proj = nn.Parameter(self.experts.gate_up_proj.data[sl].clone())
        self.experts.down_proj = nn.Parameter(self.experts.down_proj.data[sl].clone())
        self.experts.num_experts = n
        self.ep = ep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lctrain.parallel.expert import dispatch_combine

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
        y = dispatch_combine(h, slot_token, slot_expert, slot_weight, E, self.experts, self.ep)
        if self.shared_experts is not None:
            y = y + self.shared_experts(h)
        if self.training and torch.is_grad_enabled():
            probs = scores if cfg.score_func == "softmax" else scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
            cp = self.context_parallel
            aux = load_balancing_loss(probs, topk_idx, E, cp.group if cp is not None and cp.degree > 1 else None)
            z = router_z_loss(logits)
            total = cfg.aux_loss_coeff * aux + cfg.z_loss_coeff * z
            if total.requires_grad and (cfg.aux_loss_coeff > 0 or cfg.z_loss_coeff > 0):
                y = AuxLossScaler.apply(y, total, self.aux_loss_scale)
            with torch.no_grad():  # tensors only: no host sync on GPU
                self.step_tokens_per_expert += torch.bincount(topk_idx.flatten(), minlength=E).to(torch.float64)
                dropped = (~keep).sum() if keep is not None else torch.zeros((), device=h.device)
                self.step_stats += torch.stack([
                    cfg.aux_loss_coeff * aux.detach().double(), cfg.z_loss_coeff * z.detach().double(),
                    dropped.double(), torch.tensor(float(S * K), dtype=torch.float64, device=h.device),
                    torch.ones((), dtype=torch.float64, device=h.device),
                ])
        return y.reshape(shape)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"num_experts={c.num_experts}, top_k={c.top_k}, score_func={c.score_func}, "
                f"capacity_factor={c.capacity_factor}, ep={'off' if self.ep is None else self.ep.ep_degree}")


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """``(name, module)`` of every :class:`MoE` in ``model`` (DDP-wrapped or not), in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Set the gradient weight of the aux/z losses of every MoE layer (per micro-batch)."""
    for _, m in moe_layers(model):
        m.aux_loss_scale = float(scale)


@torch.no_grad()
def finish_step(model: nn.Module, group=None) -> dict | None:
    """Reduce the step's routing statistics over all ranks, update expert biases, reset the counters.

    Collective over ``group`` (default: the world) when a process group exists. Call once per
    optimizer step, after ``optimizer.step()``.

    Returns:
        None when the model has no MoE layer; else ``{"aux_loss", "z_loss", "dropped_frac",
        "load_max_mean", "layers": [{"name", "tokens_per_expert": [...], "load_max_mean"}]}``:
        losses are per-layer values summed over layers and averaged over micro-batches and
        ranks; ``load_max_mean`` is max/mean of routed slots per expert (1.0 = perfectly even),
        averaged over layers.
    """
    import torch.distributed as dist

    layers = moe_layers(model)
    if not layers:
        return None
    packed = torch.cat([torch.cat([m.step_tokens_per_expert, m.step_stats]) for _, m in layers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed, group=group)
    out_layers, aux, z, dropped, slots = [], 0.0, 0.0, 0.0, 0.0
    offset = 0
    for name, m in layers:
        E = m.num_experts
        load = packed[offset:offset + E]
        stats = packed[offset + E:offset + E + 5]
        offset += E + 5
        calls = max(float(stats[4]), 1.0)
        aux += float(stats[0]) / calls
        z += float(stats[1]) / calls
        dropped += float(stats[2])
        slots += float(stats[3])
        mean = float(load.mean())
        ratio = float(load.max()) / mean if mean > 0 else float("nan")
        out_layers.append({"name": name, "tokens_per_expert": load.tolist(), "load_max_mean": ratio})
        if m.cfg.bias_update_rate > 0 and mean > 0:
            m.expert_bias.copy_(expert_bias_update(m.expert_bias, load, m.cfg.bias_update_rate))
        m.step_tokens_per_expert.zero_()
        m.step_stats.zero_()
    ratios = [x["load_max_mean"] for x in out_layers]
    return {
        "aux_loss": aux, "z_loss": z, "dropped_frac": dropped / slots if slots > 0 else 0.0,
        "load_max_mean": sum(ratios) / len(ratios), "layers": out_layers,
    }
