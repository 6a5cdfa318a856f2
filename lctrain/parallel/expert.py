"""Expert parallelism: experts sharded over an ``ep`` axis, tokens exchanged with all-to-all.

Layout ("parallel folding", Megatron-Core): the ``dp x cp`` ranks (flat rank ``r``) are viewed as
a second mesh ``(edp, ep) = (world / ep, ep)`` with ``r = edp_rank * ep + ep_rank``. EP rank ``j``
holds experts ``[j * E/ep, (j+1) * E/ep)``. Everything that is not an expert weight (router,
shared experts, attention, embeddings) stays replicated and follows dp/cp as before.

Token path of one MoE layer (GShard, Lepikhin et al. 2020, Sec. 3.2; Megatron "alltoall"
token dispatcher):

1. permute this rank's routed slots by expert (stable sort), count slots per expert;
2. exchange the counts (``all_to_all_single``) so each rank knows how many rows it receives
   from every source for each of its local experts;
3. dispatch the rows (``all_to_all_single`` with splits), regroup them by local expert;
4. run the local experts (grouped GEMM), undo the regrouping;
5. combine: the reverse all-to-all returns each row to its source rank, which scales it by the
   routing weight and sums it into its token (unpermute).

Gradients flow through both all-to-alls (:class:`AllToAll` is its own transpose). Gradient
reduction: DDP skips expert weights (they are in ``_ddp_params_and_buffers_to_ignore``);
:func:`reduce_expert_grads` sums them over the ``edp`` group (the ranks holding the same
experts) and divides by the factor the trainer multiplied the loss by (the data-parallel
averaging degree), which gives exactly the gradient of the single-process model.

Checkpoints: :func:`expert_state_to_dtensor` presents each local expert weight (and its AdamW
moments) as a DTensor ``[Replicate(), Shard(0)]`` on the ``(edp, ep)`` mesh, so DCP stores the
global ``[E, ...]`` tensor and any ``ep_degree`` (or one process) loads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lctrain.kernels.moe.dispatch import combine, expert_counts, local_dispatch_combine

EXPERT_PARAM_ATTR = "_lctrain_expert_parallel"


@dataclass
class ExpertParallel:
    """Process groups of one expert-parallel layout.

    Attributes:
        mesh: the 2-D ``(edp, ep)`` DeviceMesh over all ranks (None in tests that pass groups).
        ep_group: ranks exchanging tokens (size ``ep_degree``).
        edp_group: ranks holding the same experts (size ``world / ep_degree``).
        ep_rank, ep_degree: this rank's index in ``ep_group`` and its size.
    """

    mesh: object | None
    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup
    ep_rank: int
    ep_degree: int


def build_expert_parallel(device_type: str, ep_degree: int, mesh=None) -> ExpertParallel:
    """The expert-parallel groups of an ``(edp, ep)`` mesh.

    Args:
        device_type: ``cuda`` or ``cpu`` (used when the mesh is built here).
        ep_degree: experts are split over this many ranks.
        mesh: the ``("edp", "ep")`` DeviceMesh from :meth:`lctrain.parallel.mesh.ParallelDims.build_meshes`;
            None builds it over every rank of the default group (collective).

    Raises:
        ValueError: ``ep_degree`` does not divide the world size.
    """
    world = dist.get_world_size()
    if ep_degree < 1 or world % ep_degree:
        raise ValueError(f"parallel.ep_degree={ep_degree} must divide the world size {world} (dp x cp)")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (world // ep_degree, ep_degree), mesh_dim_names=("edp", "ep"))
    return ExpertParallel(mesh, mesh.get_group("ep"), mesh.get_group("edp"), mesh.get_local_rank("ep"), ep_degree)


class AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` along dim 0 with explicit split sizes.

    Forward sends ``input_splits[j]`` rows to rank ``j`` and receives ``output_splits[j]`` rows
    from it; backward is the same exchange with the splits swapped.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_splits, input_splits = ctx.splits
        out = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return out, None, None, None


def dispatch_combine(
    x: torch.Tensor,
    slot_token: torch.Tensor,
    slot_expert: torch.Tensor,
    slot_weight: torch.Tensor,
    num_experts: int,
    expert_fn,
    ep: ExpertParallel | None = None,
) -> torch.Tensor:
    """Route slots to experts (locally or over ``ep``), run them, and sum the weighted outputs per token.

    Args:
        x: [S, D] this rank's tokens.
        slot_token: int64 [N] token index of each routed slot (a token appears once per kept top-k choice).
        slot_expert: int64 [N] global expert id of each slot, in ``[0, num_experts)``.
        slot_weight: [N] routing weight of each slot.
        num_experts: E over all ranks.
        expert_fn: ``f(rows [M, D] sorted by local expert, tokens_per_expert int64 [E_local]) -> [M, D]``.
        ep: expert-parallel groups, or None (all experts local).

    Returns:
        [S, D] in ``x.dtype`` (summed in fp32): ``y_s = sum over slots of s of weight * expert(x_s)``; zero for tokens
        without a slot. Collective over ``ep.ep_group`` (forward and backward) when ``ep`` is given.
    """
    if ep is None or ep.ep_degree == 1:
        return local_dispatch_combine(x, slot_token, slot_expert, slot_weight, num_experts, expert_fn)
    S, D = x.shape
    order = torch.argsort(slot_expert, stable=True)
    token_sorted = slot_token[order]
    rows = x[token_sorted]  # [N, D], grouped by global expert
    counts = expert_counts(slot_expert, num_experts)
    P = ep.ep_degree
    local = num_experts // P
    counts_recv = torch.empty_like(counts)
    dist.all_to_all_single(counts_recv, counts, group=ep.ep_group)  # [P * local]: source-major
    counts_recv = counts_recv.view(P, local)
    input_splits = counts.view(P, local).sum(1).tolist()
    output_splits = counts_recv.sum(1).tolist()
    recv = AllToAll.apply(rows, output_splits, input_splits, ep.ep_group)  # ordered (source, local expert)
    local_expert = torch.repeat_interleave(
        torch.arange(local, device=x.device).repeat(P), counts_recv.flatten().to(x.device)
    )
    regroup = torch.argsort(local_expert, stable=True)
    y_local = expert_fn(recv[regroup], counts_recv.sum(0))
    y_back = y_local[torch.argsort(regroup)]  # back to (source, local expert) order
    y = AllToAll.apply(y_back, input_splits, output_splits, ep.ep_group)
    return combine(y, token_sorted, slot_weight[order], S, x.dtype)  # weighting and the top-k sum in fp32


class AllToAllDispatcher:
    """The MoE layer's ``dispatcher`` under expert parallelism: :func:`dispatch_combine` over ``ep``.

    Same call signature as :class:`lctrain.layers.moe.LocalDispatcher`; collective over
    ``ep.ep_group`` in forward and backward.
    """

    def __init__(self, ep: ExpertParallel):
        self.ep = ep

    def __call__(self, x, slot_token, slot_expert, slot_weight, num_experts, expert_fn) -> torch.Tensor:
        return dispatch_combine(x, slot_token, slot_expert, slot_weight, num_experts, expert_fn, self.ep)


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, param)`` of the expert weights sharded by :func:`shard_experts` (names as in ``model``)."""
    return [(n, p) for n, p in model.named_parameters() if getattr(p, EXPERT_PARAM_ATTR, None) is not None]


def shard_experts(model: nn.Module, ep: ExpertParallel) -> None:
    """Keep only this rank's experts in every MoE layer of ``model`` (in place).

    The model must have been built with all ``E`` experts on every rank (same seed), so that the
    kept slices equal the single-process weights. Each layer's ``dispatcher`` becomes an
    :class:`AllToAllDispatcher`; each kept weight is tagged with ``ep`` for
    :func:`reduce_expert_grads`, DDP exclusion and checkpoints.

    Raises:
        ValueError: a layer's ``num_experts`` is not divisible by ``ep.ep_degree``.
    """
    from lctrain.layers.moe import MoE

    for module in model.modules():
        if isinstance(module, MoE):
            E = module.num_experts
            if E % ep.ep_degree:
                raise ValueError(f"model.moe.num_experts={E} is not divisible by parallel.ep_degree={ep.ep_degree}")
            n = E // ep.ep_degree
            sl = slice(ep.ep_rank * n, (ep.ep_rank + 1) * n)
            experts = module.experts
            experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.data[sl].clone())
            experts.down_proj = nn.Parameter(experts.down_proj.data[sl].clone())
            experts.num_experts = n
            module.dispatcher = AllToAllDispatcher(ep)
            for p in experts.parameters():
                setattr(p, EXPERT_PARAM_ATTR, ep)


def reduce_expert_grads(model: nn.Module, divisor: float) -> None:
    """Sum expert-weight gradients over their ``edp`` group and divide by ``divisor`` (in place).

    ``divisor`` is the factor each rank's loss was multiplied by so that DDP's average gives the
    global-mean gradient (the data-parallel degree in :mod:`lctrain.train.trainer`). A weight
    with no gradient (no token reached it on this rank) counts as zero.
    """
    params = [p for _, p in expert_parameters(model)]
    if not params:
        return
    ep: ExpertParallel = getattr(params[0], EXPERT_PARAM_ATTR)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    if dist.get_world_size(ep.edp_group) > 1:
        dist.all_reduce(flat, group=ep.edp_group)
    flat /= divisor
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip all gradients of ``model`` by their global L2 norm when expert weights are EP-sharded.

    ``norm^2 = sum_replicated ||g||^2 + sum over EP ranks of sum_local_experts ||g||^2`` (each EP
    rank holds different experts; replicated weights are counted once). Scales every gradient by
    ``min(1, max_norm / (norm + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_`` does.

    Returns:
        The total norm before clipping (fp32 scalar tensor).
    """
    experts = {id(p) for _, p in expert_parameters(model)}
    grads_r, grads_e, ep = [], [], None
    for p in model.parameters():
        if p.grad is None:
            continue
        if id(p) in experts:
            grads_e.append(p.grad)
            ep = getattr(p, EXPERT_PARAM_ATTR)
        else:
            grads_r.append(p.grad)
    sq_r = sum((g.float().pow(2).sum() for g in grads_r), torch.zeros((), dtype=torch.float32))
    sq_e = sum((g.float().pow(2).sum() for g in grads_e), torch.zeros((), dtype=torch.float32))
    if ep is not None and ep.ep_degree > 1:
        dist.all_reduce(sq_e, group=ep.ep_group)
    total = (sq_r + sq_e).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads_r + grads_e:
        g.mul_(coef.to(g.dtype))
    return total


def expert_state_to_dtensor(model: nn.Module, state: dict) -> dict:
    """Wrap EP-sharded expert tensors of a ``get_state_dict`` result as DTensors (in place; returns ``state``).

    ``state`` is ``{"model": model_sd}`` or ``{"model": ..., "optim": optim_sd}`` keyed by
    parameter name without wrapper prefixes. Each local ``[E/ep, ...]`` expert weight and its
    same-shaped optimizer moments become ``DTensor.from_local(t, mesh, [Replicate(), Shard(0)])``,
    sharing storage with ``t`` so a DCP load writes straight into it. Undo with
    :func:`expert_state_to_local` before ``set_state_dict``.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    for name, p in expert_parameters(inner):
        ep: ExpertParallel = getattr(p, EXPERT_PARAM_ATTR)
        if ep.mesh is None or ep.ep_degree == 1:
            continue

        def wrap(t, p=p, ep=ep):
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and t.shape == p.shape:
                return DTensor.from_local(t, ep.mesh, [Replicate(), Shard(0)], run_check=False)
            return t

        if name in state["model"]:
            state["model"][name] = wrap(state["model"][name])
        opt_state = state.get("optim", {}).get("state", {})
        if name in opt_state:
            opt_state[name] = {k: wrap(v) for k, v in opt_state[name].items()}
    return state


def expert_state_to_local(model: nn.Module, state: dict) -> dict:
    """Undo :func:`expert_state_to_dtensor` (in place; returns ``state``): its DTensors become their local shards.

    Only the expert entries are touched (an FSDP2 model's own DTensors stay as they are).
    """
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    for name, _ in expert_parameters(inner):
        if name in state["model"]:
            state["model"][name] = local(state["model"][name])
        opt_state = state.get("optim", {}).get("state", {})
        if name in opt_state:
            opt_state[name] = {k: local(v) for k, v in opt_state[name].items()}
    return state
