"""The kernel plan: ``model.kernels`` and the target device resolved once into a per-op choice.

A run resolves its plan at model build (:func:`resolve_kernel_plan`), before any tensor moves,
and writes the concrete choice into every sequence op of the model (:func:`apply_kernel_plan`):
the layers and the context-parallel ops swapped in later then follow ``op.kernels`` (``triton``
or ``torch``) instead of deciding per call from the tensor's device. The trainer prints the plan
at start-up and records it in ``summary.json``.

Because the plan names its target device explicitly, the CUDA plan can be built and run on a
CPU machine: its Triton kernels then run under Triton's CPU interpreter (``TRITON_INTERPRET=1``),
so the composition a GPU run takes (flash varlen attention, flash ring blocks, Triton Gated
DeltaNet and Lightning kernels) is what the ``cuda_plan`` tests execute.

Implementations per op (``KernelPlan.ops``):

====================  =========================================================================
op                    implementations
====================  =========================================================================
local_attention       ``triton_flash`` (FlashAttention-2, Triton) | ``sdpa`` (torch SDPA)
varlen_attention      ``triton_flash_varlen`` | ``sdpa_per_document`` (a host loop: CPU only)
ring_block            ``triton_flash`` (fused, with lse) | ``cpu_flash`` (PyTorch's fused CPU
                      kernels) | ``dense_block`` (the fp32 ``[Tq, Tk]`` reference)
ulysses_attention     as ``varlen_attention`` (whole sequences after the all-to-all)
gated_delta_rule      ``triton_chunk`` | ``fla_chunk`` (fla-core's ``chunk_gated_delta_rule``)
                      | ``torch_chunk``
lightning_attn        ``triton_chunk`` | ``fla_simple_gla`` (fla-core's ``chunk_simple_gla``,
                      fixed decays) | ``torch_chunk``
moba                  ``triton`` | ``torch``
moe_gemm              ``grouped_mm`` (``torch._grouped_mm``, device offsets) | ``triton_grouped``
                      | ``loop``
loss                  ``chunked_linear_ce`` | ``logits_ce``
====================  =========================================================================

``SLOW_PATHS`` lists the implementations a CUDA run must never take unless the user asked for
the torch reference paths (``model.kernels=torch``, with a start-up warning).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lctrain.kernels.dispatch import (
    AUTO_FLA_ON_CUDA,
    AUTO_TRITON_ON_CUDA,
    FLA_OPS,
    check_kernels,
    fla_usable,
    triton_installed,
)
from lctrain.kernels.ops import (
    GatedDeltaRuleOp,
    LightningAttnOp,
    MoBAAttentionOp,
    SoftmaxAttentionOp,
    sequence_ops,
)

PLAN_DEVICES = ("cpu", "cuda")

# the ``dispatch`` op name each sequence op type follows
OP_OF_TYPE: dict[type, str] = {
    SoftmaxAttentionOp: "softmax_attention",
    MoBAAttentionOp: "moba",
    GatedDeltaRuleOp: "gated_delta_rule",
    LightningAttnOp: "lightning_attn",
}

# implementations that are a dense [Tq, Tk] block or a per-document Python loop: fine as CPU
# reference paths, never what a CUDA run should take
SLOW_PATHS = frozenset({"dense_block", "sdpa_per_document", "loop"})


@dataclass(frozen=True)
class KernelPlan:
    """One run's resolved kernel choice.

    Attributes:
        device: the target device type (``cpu`` | ``cuda``).
        kernels: the user's ``model.kernels`` (``auto`` | ``torch`` | ``triton`` | ``fla``).
        choice: per sequence-op name (``softmax_attention``, ``moba``, ``gated_delta_rule``,
            ``lightning_attn``): ``triton``, ``torch`` or (the last two) ``fla``, what
            :func:`apply_kernel_plan` writes into each op's ``kernels``.
        ops: per op of the module table: the implementation a step takes.
    """

    device: str
    kernels: str
    choice: dict[str, str] = field(default_factory=dict)
    ops: dict[str, str] = field(default_factory=dict)

    def slow_paths(self) -> dict[str, str]:
        """The ops of this plan that take a dense block or a per-document loop (see ``SLOW_PATHS``)."""
        return {op: impl for op, impl in self.ops.items() if impl in SLOW_PATHS}

    def table(self) -> str:
        """The plan as aligned ``op  implementation`` lines (printed at start-up)."""
        width = max(len(op) for op in self.ops)
        lines = [f"kernel plan for {self.device} (model.kernels={self.kernels}):"]
        lines += [f"  {op:<{width}}  {impl}" for op, impl in self.ops.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"device": self.device, "kernels": self.kernels, "choice": dict(self.choice), "ops": dict(self.ops)}


def _moe_gemm(device: str, expert_impl: str, dtype: torch.dtype) -> str:
    if expert_impl != "auto":
        return {"grouped": "grouped_mm", "triton": "triton_grouped", "loop": "loop"}[expert_impl]
    grouped = hasattr(torch, "_grouped_mm")
    if device == "cuda":
        # torch._grouped_mm on CUDA runs bf16 on sm90+ (checked per call); otherwise Triton
        return "grouped_mm" if grouped and dtype == torch.bfloat16 else "triton_grouped"
    return "grouped_mm" if grouped and dtype in (torch.float32, torch.bfloat16) else "loop"


def resolve_kernel_plan(
    kernels: str,
    device: str | torch.device,
    expert_impl: str = "auto",
    loss_chunk_size: int = 0,
    compute_dtype: torch.dtype = torch.float32,
) -> KernelPlan:
    """Resolve ``model.kernels`` for a target device into a :class:`KernelPlan`.

    Args:
        kernels: ``auto`` (the :data:`~lctrain.kernels.dispatch.AUTO_TRITON_ON_CUDA` table on
            CUDA, with fla's kernels for the ops of ``AUTO_FLA_ON_CUDA`` where fla-core imports,
            the compute dtype is bf16 and Triton is not interpreted; torch on CPU), ``triton``
            (every op with a Triton kernel), ``torch``, or ``fla`` (fla-core's kernels for Gated
            DeltaNet and Lightning, ``auto`` for the other ops; CUDA only).
        device: the target device (type ``cpu`` or ``cuda``); may differ from where the plan is
            built (the CUDA plan on a CPU machine runs under ``TRITON_INTERPRET=1``).
        expert_impl: ``model.moe.expert_impl`` (``auto`` | ``grouped`` | ``triton`` | ``loop``).
        loss_chunk_size: ``model.loss_chunk_size``.
        compute_dtype: the dtype the matmuls run in (bf16 under autocast), for the MoE GEMM.

    Returns:
        The plan.

    Raises:
        ValueError: unknown ``kernels`` or device type; ``fla`` on a CPU target (fla's Triton
            kernels run on GPUs only, not under ``TRITON_INTERPRET=1``).
        ImportError: ``kernels=triton``, or ``auto`` on CUDA, without the triton package;
            ``kernels=fla`` without fla-core (the message names the ``fla`` extra).
    """
    dev = torch.device(device).type
    if dev not in PLAN_DEVICES:
        raise ValueError(f"kernel plan device {dev!r}: allowed values are {', '.join(PLAN_DEVICES)}")
    check_kernels(kernels, "the model")
    if kernels == "auto" and dev == "cuda" and not triton_installed():
        raise ImportError(
            "model.kernels=auto on CUDA needs the triton package (the CUDA builds of torch ship it): "
            "pip install triton, or set model.kernels=torch for the (slow) reference paths"
        )
    if kernels == "fla":
        from lctrain.kernels.fla_backend import require_fla

        require_fla()
        if dev != "cuda":
            raise ValueError(
                "fla's Triton kernels run on GPUs only (not on CPU, not under TRITON_INTERPRET=1); "
                "use model.kernels=auto or torch on CPU"
            )
    if kernels == "fla" and dev == "cuda" and not triton_installed():
        raise ImportError("model.kernels=fla needs the triton package (the CUDA builds of torch ship it)")
    fla_auto = dev == "cuda" and fla_usable(compute_dtype)
    choice = {}
    for op in OP_OF_TYPE.values():
        if kernels == "fla" and op in FLA_OPS:
            choice[op] = "fla"
            continue
        if kernels in ("auto", "fla"):
            if dev == "cuda" and AUTO_FLA_ON_CUDA.get(op, False) and fla_auto:
                choice[op] = "fla"
                continue
            tri = dev == "cuda" and AUTO_TRITON_ON_CUDA.get(op, True)
        else:
            tri = kernels == "triton"
        choice[op] = "triton" if tri else "torch"
    flash = choice["softmax_attention"] == "triton"
    linear = {"triton": "triton_chunk", "torch": "torch_chunk"}
    ops = {
        "local_attention": "triton_flash" if flash else "sdpa",
        "varlen_attention": "triton_flash_varlen" if flash else "sdpa_per_document",
        "ring_block": "triton_flash" if flash else ("cpu_flash" if dev == "cpu" else "dense_block"),
        "ulysses_attention": "triton_flash_varlen" if flash else "sdpa_per_document",
        "gated_delta_rule": {**linear, "fla": "fla_chunk"}[choice["gated_delta_rule"]],
        "lightning_attn": {**linear, "fla": "fla_simple_gla"}[choice["lightning_attn"]],
        "moba": choice["moba"],
        "moe_gemm": _moe_gemm(dev, expert_impl, compute_dtype),
        "loss": "chunked_linear_ce" if loss_chunk_size > 0 else "logits_ce",
    }
    return KernelPlan(device=dev, kernels=kernels, choice=choice, ops=ops)


def apply_kernel_plan(model: torch.nn.Module, plan: KernelPlan) -> torch.nn.Module:
    """Write the plan's concrete choice into every sequence op of ``model`` (in place; returns it).

    Each op of a type in :data:`OP_OF_TYPE` gets ``kernels = plan.choice[op]`` (``triton``,
    ``torch`` or ``fla``) unless its layer was built with an explicit ``triton`` / ``torch`` choice other than
    the plan's ``kernels`` (a per-layer override stays). Context-parallel ops are applied later by
    ``parallelize()`` and read the choice from the op they wrap.
    """
    for *_, op in sequence_ops(model):
        name = OP_OF_TYPE.get(type(op))
        if name is not None and op.kernels in ("auto", plan.kernels):
            op.kernels = plan.choice[name]
    return model
