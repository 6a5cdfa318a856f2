"""Grouped SwiGLU over experts for tokens already sorted by expert.

Two paths compute the same thing on ``x`` sorted so that expert ``e`` owns rows
``[offs[e-1], offs[e])``:

* ``grouped``: ``torch._grouped_mm`` (one call per projection for all experts, as in
  torchtitan / Megatron "grouped GEMM"); it runs on CPU (fp32/bf16, rows 16-byte aligned) and on
  CUDA for bf16 on compute capability >= 9.0.
* ``loop``: a loop over the sorted segments, one ordinary matmul per non-empty expert.
* ``triton``: the Triton grouped GEMM of ``triton_grouped.py`` (CUDA, or the interpreter).

Experts that receive no token are handled by both (an empty segment).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lctrain.kernels.dispatch import triton_installed


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``torch._grouped_mm(a, b, offs)``: every row of the 2-D operand meets one ``[K, M]``
    matrix (forward ``[N, K] x [G, K, M]``; weight gradient ``[K, N] x [N, M]`` split by ``offs``):
    ``2 * a.numel() * M``. Registered with PyTorch's FLOP counter, which has no formula of its own."""
    n = 1
    for d in a_shape:
        n *= d
    return 2 * n * b_shape[-1]


if hasattr(torch.ops.aten, "_grouped_mm"):
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if torch.ops.aten._grouped_mm not in flop_registry and torch.ops.aten._grouped_mm.default not in flop_registry:
        register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects gradients with zero strides (e.g. from ``.sum()``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_mm_supported(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands here (dtype, device, 16-byte row alignment)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.dtype != gate_up_proj.dtype or x.dtype != down_proj.dtype:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    item = x.element_size()
    return all((n * item) % 16 == 0 for n in (x.shape[1], gate_up_proj.shape[2], down_proj.shape[1]))


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x`` rows of group ``g`` times ``weight[g]``, for rows sorted by group.

    One ``torch._grouped_mm`` call with the group offsets as a device tensor (no host read) where
    it can run these operands (:func:`grouped_mm_supported`: CPU fp32/bf16, CUDA bf16 on sm90+),
    else a loop over the groups (one host read of ``counts``).

    Args:
        x: [N, K] rows sorted by group (group 0's rows first).
        weight: [G, K, M].
        counts: int [G] rows of each group (summing to N; zeros allowed).

    Returns:
        [N, M] in ``x.dtype``; differentiable with respect to ``x`` and ``weight``.
    """
    if grouped_mm_supported(x, weight, weight.transpose(1, 2)):
        offs = torch.cumsum(counts.to(device=x.device, dtype=torch.int64), 0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x.contiguous(), weight, offs=offs))
    outs, start = [], 0
    for g, n in enumerate(counts.tolist()):  # one host read
        if n:
            outs.append(x[start:start + n] @ weight[g])
            start += n
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[2]) + 0 * weight.sum()


def grouped_swiglu(
    x: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """SwiGLU of each expert applied to its segment of expert-sorted tokens.

    ``y[rows of e] = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]`` (Shazeer 2020, FFN_SwiGLU).

    Args:
        x: [N, D] tokens sorted by expert (expert 0's rows first).
        tokens_per_expert: int [E] rows of each expert (sums to N; zeros allowed), on any device.
        gate_up_proj: [E, D, 2F] (gate columns first, then up).
        down_proj: [E, F, D].
        impl: ``auto`` (``grouped`` when :func:`grouped_mm_supported`, else ``triton`` on CUDA when
            Triton is installed, else ``loop``), ``grouped``, ``loop`` or ``triton``.

    Returns:
        [N, D] in ``x.dtype``; differentiable with respect to ``x`` and both weights.

    Raises:
        ValueError: unknown ``impl``, mismatched shapes, or (``loop``) counts not summing to N.
            The ``grouped`` path takes the counts as device offsets and reads nothing back
            (the router produces them, summing to N by construction).
        RuntimeError: ``impl='grouped'`` where ``torch._grouped_mm`` cannot run these operands.
    """
    E, D, F2 = gate_up_proj.shape
    if impl not in ("auto", "grouped", "loop", "triton"):
        raise ValueError(f"impl={impl!r}: allowed values are auto, grouped, loop, triton")
    if x.dim() != 2 or x.shape[1] != D or down_proj.shape != (E, F2 // 2, D) or tokens_per_expert.shape != (E,):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, tokens_per_expert {tuple(tokens_per_expert.shape)}, "
            f"gate_up_proj {tuple(gate_up_proj.shape)}, down_proj {tuple(down_proj.shape)}"
        )
    supported = grouped_mm_supported(x, gate_up_proj, down_proj)
    if impl == "grouped" and not supported:
        raise RuntimeError(
            f"torch._grouped_mm cannot run {x.dtype} on {x.device} with D={D}, 2F={F2} (needs CPU fp32/bf16 or "
            "CUDA bf16 on sm90+, rows a multiple of 16 bytes); use impl='loop' or 'auto'"
        )
    Fh = F2 // 2
    if impl == "auto" and not supported and x.device.type == "cuda" and triton_installed():
        impl = "triton"
    if impl == "triton":
        from lctrain.kernels.moe.triton_grouped import triton_grouped_mm

        h = triton_grouped_mm(x, gate_up_proj, tokens_per_expert)
        return triton_grouped_mm(F.silu(h[:, :Fh]) * h[:, Fh:], down_proj, tokens_per_expert)
    if impl == "grouped" or (impl == "auto" and supported):
        offs = torch.cumsum(tokens_per_expert.to(device=x.device, dtype=torch.int64), 0).to(torch.int32)
        h = _ContiguousGrad.apply(torch._grouped_mm(x.contiguous(), gate_up_proj, offs=offs))
        a = (F.silu(h[:, :Fh]) * h[:, Fh:]).contiguous()
        return _ContiguousGrad.apply(torch._grouped_mm(a, down_proj, offs=offs))
    counts = tokens_per_expert.tolist()  # the loop path needs the counts on the host (one read)
    if sum(counts) != x.shape[0]:
        raise ValueError(f"tokens_per_expert sums to {sum(counts)} but x has {x.shape[0]} rows")
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        h = x[start:start + n] @ gate_up_proj[e]
        outs.append((F.silu(h[:, :Fh]) * h[:, Fh:]) @ down_proj[e])
        start += n
    if not outs:
        # No rows at all (an expert-parallel rank that received nothing): an empty result that
        # stays on x's graph, so the all-to-all backward still runs on this rank.
        return x * 0.0
    return torch.cat(outs, 0)
