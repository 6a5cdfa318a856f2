"""Per-rank memory of one training step, from lctrain's own code run without data.

:func:`trace_step` builds the model, resolves the kernel plan for the target device, applies
``parallelize()`` (expert, context and data parallelism, activation checkpointing) on the
process group of the target world size, and runs one training step (forward with the summed
loss, backward, gradient clipping, AdamW step) while PyTorch's memory tracker
(``torch.distributed._tools.mem_tracker.MemTracker``) attributes every live tensor to parameters,
gradients, optimizer states, activations or temporaries. With ``fake=True`` the tensors are fake
(``FakeTensorMode``: shapes and dtypes, no storage) on a fake process group, so a 1.3B model at a
million tokens traces on a CPU machine in seconds; the Triton kernels of the CUDA plan are
``torch.library`` custom ops with fake implementations, so the trace takes the composition a GPU
run takes (flash varlen attention, ring blocks, chunked Gated DeltaNet). The traced step is a
steady-state one: the optimizer states exist before it starts (created by an untracked step on
zero gradients), as at every step of a run but the first. With ``fake=False`` the
same step runs on real CPU tensors: that is the measurement the prediction is checked against.

This is the approach of torchtitan's memory estimator (a training step under ``FakeTensorMode``
with a fake process group), applied to lctrain's hybrid models, context parallelism and MoE.

Assumptions (stated in every report): the live-tensor peak is what the CUDA caching allocator
must hold; the reserve adds the CUDA context, cuBLAS/NCCL workspaces (``CONTEXT_MIB``) and an
allocator fragmentation margin (``FRAGMENTATION``) on top; routed layers trace with the routing of
fake values (static shapes: every token's ``top_k`` slots exist whatever their experts), and
expert parallelism is not traced (its all-to-all sizes are data-dependent).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lctrain.config import RunConfig
from lctrain.data.packing import IGNORE_INDEX
from lctrain.kernels.plan import apply_kernel_plan, resolve_kernel_plan
from lctrain.kernels.varlen import attach_host_bounds, position_ids_from_cu_seqlens
from lctrain.models import HybridLM
from lctrain.parallel import parallelize
from lctrain.parallel.context import shard_batch
from lctrain.parallel.mesh import DistEnv, resolve_dims
from lctrain.train.optim import build_optimizer

MIB = 2.0**20
CONTEXT_MIB = 1024.0  # CUDA context + cuBLAS workspace + NCCL buffers per rank (typical for H100 with NCCL)
FRAGMENTATION = 0.10  # caching-allocator fragmentation margin over the live-tensor peak

# GPU memory per device, MiB (what torch.cuda.mem_get_info reports free on an idle device, rounded down)
GPUS: dict[str, float] = {
    "h100-80gb": 80.0 * 1024 - 512,
    "h200-141gb": 140.0 * 1024 - 512,
    "a100-80gb": 80.0 * 1024 - 512,
}


@dataclass
class MemoryEstimate:
    """Predicted (or measured) memory of one training step on one rank, MiB.

    Attributes:
        parts: at the step's peak: ``parameters``, ``gradients``, ``optimizer_states``,
            ``activations`` (saved for backward), ``temporaries``, ``other``.
        peak_live_mib: the peak of live tensor bytes over the step.
        saved_per_block: activations saved for backward by each block (``"3:A"``: block 3, an
            attention layer), MiB.
        reserve_mib: the CUDA context and fragmentation margin added to the live peak.
        predicted_peak_mib: ``peak_live_mib + reserve_mib`` (what must fit in the GPU).
        layout: the resolved degrees and switches of the step.
    """

    peak_live_mib: float
    parts: dict[str, float]
    saved_per_block: dict[str, float]
    layout: dict
    reserve_mib: float = 0.0
    predicted_peak_mib: float = 0.0
    assumptions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tracker():
    """``MemTracker`` that keeps the step's global peak only.

    The stock tracker also updates the peak of every active module after every op (a loop over
    all tracked modules per op: minutes for a 24-layer model); the planner needs the global peak
    and the per-block snapshots taken at the forward hooks, which are unchanged.
    """
    from copy import deepcopy

    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class _GlobalPeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = deepcopy(dev_snap)

    return _GlobalPeakTracker()


def _category_bytes(snapshot: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for dev, cats in snapshot.items():
        if str(dev) == "cpu" or getattr(dev, "type", "") in ("cpu", "cuda"):
            for k, v in cats.items():
                name = str(getattr(k, "value", k))
                out[name] = out.get(name, 0.0) + float(v)
    return out


_PART_NAMES = {
    "Parameter": "parameters", "Gradient": "gradients", "Optstate": "optimizer_states", "Activation": "activations",
    "Temp": "temporaries", "Buffer": "other", "Other": "other",
}


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0):
    """A fake process group of ``world_size`` ranks (collectives are no-ops) for the duration.

    Raises:
        RuntimeError: a process group exists already.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group exists already; the planner traces on its own fake group")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _bucket_as_is(state, bucket):
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _documents(total: int, num_documents: int) -> list[int]:
    """Boundaries of ``num_documents`` equal documents over ``total`` tokens (the last takes the rest)."""
    n = max(1, min(num_documents, total))
    step = total // n
    return [0, *[step * i for i in range(1, n)], total]


def trace_step(cfg: RunConfig, world_size: int = 1, *, target: str = "cuda", fake: bool = True, rank: int = 0,
               num_documents: int = 3) -> MemoryEstimate:
    """Trace one training step of ``cfg`` on one rank and attribute its memory.

    Args:
        cfg: the run's config (model, ``data.seq_len``, ``train.micro_batch_size``, ``parallel.*``,
            ``model.activation_checkpointing``, ``model.loss_chunk_size``).
        world_size: ranks of the run; the process group must exist with this size (see
            :func:`fake_process_group`) when > 1.
        target: the device type the kernel plan is resolved for (``cuda``: bf16 autocast where
            ``train.dtype`` is ``auto``); the tensors themselves live on the CPU.
        fake: fake tensors (prediction) or real CPU tensors (measurement).
        rank: this rank (for the zigzag shard).
        num_documents: documents in the packed micro-batch (they cut the shards).

    Returns:
        The :class:`MemoryEstimate` (``reserve_mib`` 0: see :func:`estimate`).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import _ModState

    dims = resolve_dims(cfg.parallel, world_size)
    env = DistEnv(rank, world_size, 0, torch.device("cpu"), "fake" if fake and world_size > 1 else
                  (dist.get_backend() if dist.is_initialized() else None))
    meshes = dims.build_meshes(env)
    plan = resolve_kernel_plan(cfg.model.kernels, target, expert_impl=cfg.model.moe.expert_impl,
                               loss_chunk_size=cfg.model.loss_chunk_size)
    t = cfg.train
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and target == "cuda")
    L = cfg.data.seq_len * t.micro_batch_size  # one packed micro-batch of this dp rank
    bounds = _documents(L, num_documents)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        torch.manual_seed(0)
        model = HybridLM(cfg.model)
        apply_kernel_plan(model, plan)
    # parallelize() outside the mode: its process-group and mesh bookkeeping stays on real host
    # tensors, while every op on the (fake) parameters still runs in their fake mode
    par = parallelize(model, dims, meshes, dataclasses.replace(cfg, train=dataclasses.replace(t, compile=False)),
                      dataclasses.replace(env, device=torch.device("cpu")))
    if fake and isinstance(par.model, torch.nn.parallel.DistributedDataParallel):
        # the fake group's all-reduce completes with no tensor; the reduction is in place in the
        # gradient buckets (no memory of its own), so the traced hook returns the bucket as it is
        par.model.register_comm_hook(None, _bucket_as_is)
    with mode:
        model = par.model
        optimizer = build_optimizer(model, cfg.optim, target)
        cu = attach_host_bounds(torch.tensor(bounds, dtype=torch.int32), bounds)
        ids = torch.randint(0, cfg.model.vocab_size, (1, L))
        batch = {"input_ids": ids, "labels": ids.clone(), "cu_seqlens": cu,
                 "position_ids": position_ids_from_cu_seqlens(cu, L)}
        if par.cp is not None:
            batch = shard_batch(batch, par.cp.degree, par.cp.rank)
        # steady state: a run's second and later steps hold the optimizer states through forward and
        # backward, so they are created first (an untracked step on zero gradients), as they exist
        # at every step but the first
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mt = _tracker()
        mt.track_external(model, optimizer)
        blocks = list(getattr(getattr(model, "module", model), "layers", []))
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with mt:
            with ctx:
                loss = model(batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                             labels=batch["labels"], ignore_index=IGNORE_INDEX)
            par.dp.backward(par.dp.scale_loss(loss, float(L)))
            par.dp.finish_backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                           cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = _category_bytes(mt.get_tracker_snapshot("peak"))
        saved = {}
        for i, block in enumerate(blocks):
            stats = mt.memory_tracking.get(block)
            if stats is None:
                continue
            snaps = stats.snapshots
            pre, post = snaps.get(_ModState.PRE_FW), snaps.get(_ModState.POST_FW)
            if pre and post:
                d = _category_bytes(post[-1]).get("Total", 0.0) - _category_bytes(pre[-1]).get("Total", 0.0)
                saved[f"{i}:{cfg.model.layer_pattern[i % len(cfg.model.layer_pattern)]}"] = max(d, 0.0) / MIB
    parts: dict[str, float] = {}
    for k, v in peak.items():
        if k == "Total":
            continue
        name = _PART_NAMES.get(k, "other")
        parts[name] = parts.get(name, 0.0) + v / MIB
    layout = {"world_size": world_size, "dp": dims.dp, "cp": dims.cp, "ep": dims.ep,
              "cp_impl": cfg.parallel.cp_impl if dims.cp > 1 else None, "dp_impl": cfg.parallel.dp_impl,
              "activation_checkpointing": cfg.model.activation_checkpointing,
              "loss_chunk_size": cfg.model.loss_chunk_size, "seq_len": cfg.data.seq_len,
              "micro_batch_size": t.micro_batch_size, "target": target, "bf16": bf16, "kernel_plan": plan.ops}
    return MemoryEstimate(peak_live_mib=peak.get("Total", sum(peak.values())) / MIB, parts=parts,
                          saved_per_block=saved, layout=layout)


def estimate(cfg: RunConfig, world_size: int = 1, *, target: str = "cuda", num_documents: int = 3) -> MemoryEstimate:
    """Predicted per-rank peak of one training step: :func:`trace_step` on fake tensors and a fake
    process group of ``world_size`` ranks, plus the stated reserve (context and fragmentation)."""
    if world_size > 1:
        with fake_process_group(world_size):
            est = trace_step(cfg, world_size, target=target, fake=True, num_documents=num_documents)
    else:
        est = trace_step(cfg, 1, target=target, fake=True, num_documents=num_documents)
    est.reserve_mib = (CONTEXT_MIB if target == "cuda" else 0.0) + FRAGMENTATION * est.peak_live_mib
    est.predicted_peak_mib = est.peak_live_mib + est.reserve_mib
    est.assumptions = [
        f"reserve: {CONTEXT_MIB:.0f} MiB CUDA context/workspaces (cuda target) + {FRAGMENTATION:.0%} of the live peak "
        "for allocator fragmentation",
        f"{num_documents} documents per micro-batch; routed layers at static top-k shapes; no expert parallelism traced",
    ]
    return est
