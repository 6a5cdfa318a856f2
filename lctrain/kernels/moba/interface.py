"""MoBA block-sparse attention with Triton kernels: custom ops, autograd and the entry point.

Three layers, as in :mod:`lctrain.kernels.flash_attn.interface`: :func:`moba_attn_triton`
(autograd), the raw ops ``lctrain::moba_attn_fwd`` / ``lctrain::moba_attn_bwd``
(``torch.library.custom_op`` with fake implementations; the forward has a registered autograd
formula, so ``torch.compile(fullgraph=True)`` traces each as a single node), and the
``@triton.jit`` kernels of :mod:`lctrain.kernels.moba.triton_kernels`.

``moba_attn_fwd(q, k, v, cu_seqlens, block_size, top_k, scale) -> (out, lse, sel)``:
the block selection (torch, fp32, :func:`lctrain.kernels.moba.chunk.select_blocks`) runs inside
the op and is returned as ``sel`` int32 [B, Hq, T, K1] (non-differentiable) so the backward
reuses it instead of re-scoring. ``moba_attn_bwd(dout, q, k, v, out, lse, dlse, sel, ...) ->
(dq, dk, dv)``; the gate gets no gradient (MoBA, Lu et al. 2025, arXiv:2502.13189).

Inside each op (eager code, invisible to the compiler): block table and (query, key block)
pair layout (:mod:`lctrain.kernels.moba.chunk`; one host sync for the number of segments), the
own-block and pair kernels, and the fp32 log-sum-exp merge of the ``1 + K1`` parts per query.
Extra memory: fp32 per-pair buffers ``[B Hq T K1, D]`` (partial outputs in the forward, partial
dq in the backward) and fp32 own-block parts ``[B T Hq, D]``.
"""

from __future__ import annotations

import itertools

import torch
import triton

from lctrain.kernels.moba import triton_kernels as tk
from lctrain.kernels.moba.chunk import block_table, merge_parts, num_slots, pair_layout, select_blocks
from lctrain.kernels.moba.naive import check_moba_inputs
from lctrain.kernels.limits import MOBA_TRITON_MAX_HEAD_DIM
from lctrain.kernels.tiles import tile_dtype
from lctrain.kernels.varlen import host_bounds, num_sequences, with_host_bounds

__all__ = ["moba_attn_bwd", "moba_attn_fwd", "moba_attn_triton"]


# Tile sizes; tests may override them (e.g. to force several tiles per MoBA block), or run the
# CUDA tiles under the interpreter (``lctrain.kernels.tiles.force_cuda_tiles``).
BLOCK_OVERRIDE: dict[str, int] = {}


def _config(head_dim: int, block_size: int, backward: bool, dtype: torch.dtype) -> dict:
    """Tiles and launch options: the interpreter's 64 x 64, or the CUDA ones of ``dtype`` (or of
    the dtype :func:`lctrain.kernels.tiles.force_cuda_tiles` names), capped at the MoBA block;
    ``BLOCK_OVERRIDE`` last."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    fit = max(16, triton.next_power_of_2(block_size))  # tiles never cross a MoBA block
    tiles = tile_dtype(dtype)
    if tiles is None:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    elif tiles == torch.float32:
        cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    elif backward:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4 if block_d <= 64 else 8, "num_stages": 2}
    else:
        cfg = {
            "BLOCK_M": 64,
            "BLOCK_N": 64 if block_d <= 128 else 32,
            "num_warps": 4 if block_d <= 64 else 8,
            "num_stages": 3 if block_d <= 128 else 2,
        }
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], fit)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], fit)
    cfg.update(BLOCK_OVERRIDE)
    cfg["BLOCK_D"] = block_d
    return cfg


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_triton(q):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton path takes fp16/bf16/fp32, got {q.dtype}")
    if q.shape[-1] > MOBA_TRITON_MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= 256 for the Triton path, got {q.shape[-1]}")


def _spans(cu_seqlens, T):
    if cu_seqlens is None:
        return [(0, T)]
    return list(itertools.pairwise(host_bounds(cu_seqlens)))


def _flat(x):
    B, T = x.shape[:2]
    return x.contiguous().view(B * T, *x.shape[2:])


def _fwd_impl(q, k, v, cu_seqlens, block_size, top_k, scale):
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    K1 = num_slots(T, block_size, top_k)
    num_sequences(cu_seqlens, B, T)  # skipped by the caller under torch.compile
    if T == 0:
        return (
            torch.empty_like(q),
            q.new_empty((B, Hq, 0), dtype=torch.float32),
            torch.empty((B, Hq, 0, K1), dtype=torch.int32, device=q.device),
        )
    tab = block_table(_spans(cu_seqlens, T), B, T, block_size, q.device)
    sel = select_blocks(q, k, tab, top_k)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    NT = B * T
    cfg = _config(D, block_size, backward=False, dtype=q.dtype)
    meta = {
        "BLOCK_D": cfg["BLOCK_D"],
        "DOT_PREC": _dot_precision(q.dtype),
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
    }
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    scale_log2 = scale * tk.LOG2E
    o_own = torch.empty(NT, Hq, D, device=q.device, dtype=torch.float32)
    lse_own = torch.empty(Hq, NT, device=q.device, dtype=torch.float32)
    tpb = triton.cdiv(block_size, BM)
    tk._own_fwd_kernel[(tab.total * tpb, Hq)](
        qf, kf, vf, o_own, lse_own, tab.start, tab.length,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        o_own.stride(0), o_own.stride(1), lse_own.stride(0),
        scale_log2, D, tpb,
        GROUP=Hq // Hkv, BLOCK_M=BM, BLOCK_N=BN, **meta,
    )  # fmt: skip
    o_own = o_own.view(B, T, Hq, D).transpose(1, 2)
    lse_own = lse_own.view(Hq, B, T).transpose(0, 1)
    if K1 == 0:
        return o_own.transpose(1, 2).to(q.dtype).contiguous(), lse_own.contiguous(), sel
    lay = pair_layout(sel, Hkv, tab.total, BM)
    P = B * Hq * T * K1
    o_pair = torch.zeros(P, D, device=q.device, dtype=torch.float32)
    lse_pair = torch.full((P,), float("-inf"), device=q.device, dtype=torch.float32)
    if lay.nseg > 0:
        tk._pair_fwd_kernel[(lay.nseg,)](
            qf, kf, vf, o_pair, lse_pair, lay.seg_group, lay.lane_pair, tab.start,
            qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
            o_pair.stride(0),
            T, Hq, K1, tab.total, block_size, scale_log2, D,
            BLOCK_M=BM, BLOCK_N=BN, **meta,
        )  # fmt: skip
    out, lse = merge_parts(o_own, lse_own, o_pair.view(B, Hq, T, K1, D), lse_pair.view(B, Hq, T, K1))
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse.contiguous(), sel


def _bwd_impl(dout, q, k, v, out, lse, dlse, sel, cu_seqlens, block_size, scale):
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    K1 = sel.shape[-1]
    if T == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    tab = block_table(_spans(cu_seqlens, T), B, T, block_size, q.device)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    dof = _flat(dout)
    NT = B * T
    # [B, Hq, T] -> [Hq, B * T]
    lse_f = lse.float().transpose(0, 1).reshape(Hq, NT).contiguous()
    # D_i = rowsum(dO_i * O_i) (FlashAttention-2 Alg. 2); an upstream dlse enters as -dlse
    delta = (dof.float() * _flat(out).float()).sum(-1).transpose(0, 1)
    if dlse is not None:
        delta = delta - dlse.float().transpose(0, 1).reshape(Hq, NT)
    delta = delta.contiguous()
    cfg = _config(D, block_size, backward=True, dtype=q.dtype)
    meta = {
        "BLOCK_D": cfg["BLOCK_D"],
        "DOT_PREC": _dot_precision(q.dtype),
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
    }
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    scale_log2 = scale * tk.LOG2E
    G = Hq // Hkv
    dq = torch.empty(NT, Hq, D, device=q.device, dtype=torch.float32)
    tpb = triton.cdiv(block_size, BM)
    tk._own_dq_kernel[(tab.total * tpb, Hq)](
        qf, kf, vf, dof, lse_f, delta, dq, tab.start, tab.length,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        dof.stride(0), dof.stride(1), dq.stride(0), dq.stride(1), lse_f.stride(0),
        scale, scale_log2, D, tpb,
        GROUP=G, BLOCK_M=BM, BLOCK_N=BN, **meta,
    )  # fmt: skip
    if K1 > 0:
        lay = pair_layout(sel, Hkv, tab.total, BM)
        group_start, group_count, sorted_pairs = lay.group_start, lay.group_count, lay.sorted_pairs
        if lay.nseg > 0:
            P = B * Hq * T * K1
            dq_pair = torch.zeros(P, D, device=q.device, dtype=torch.float32)
            tk._pair_dq_kernel[(lay.nseg,)](
                qf, kf, vf, dof, lse_f, delta, dq_pair, lay.seg_group, lay.lane_pair, tab.start,
                qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
                dof.stride(0), dof.stride(1), dq_pair.stride(0), lse_f.stride(0),
                T, Hq, K1, tab.total, block_size, scale, scale_log2, D,
                BLOCK_M=BM, BLOCK_N=BN, **meta,
            )  # fmt: skip
            # [B, Hq, T, K1, D] summed over slots -> [B, T, Hq, D]
            dq = dq + dq_pair.view(B, Hq, T, K1, D).sum(3).transpose(1, 2).reshape(NT, Hq, D)
    else:
        group_count = torch.zeros(Hkv * tab.total, dtype=torch.int32, device=q.device)
        group_start = group_count
        sorted_pairs = torch.zeros(1, dtype=torch.int32, device=q.device)
    dk = torch.empty_like(kf)
    dv = torch.empty_like(vf)
    tpn = triton.cdiv(block_size, BN)
    tk._dkdv_kernel[(tab.total * tpn, Hkv)](
        qf, kf, vf, dof, lse_f, delta, dk, dv, tab.start, tab.length,
        group_start, group_count, sorted_pairs,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        dof.stride(0), dof.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse_f.stride(0),
        T, Hq, max(K1, 1), tab.total, scale, scale_log2, D, tpn,
        GROUP=G, BLOCK_M=BM, BLOCK_N=BN, **meta,
    )  # fmt: skip
    return dq.view(q.shape).to(q.dtype), dk.view(k.shape), dv.view(v.shape)


# ---------------------------------------------------------------------------------------------
# custom ops (single graph nodes for torch.compile)


@torch.library.custom_op("lctrain::moba_attn_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    block_size: int,
    top_k: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, cu_seqlens, block_size, top_k, softmax_scale)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, block_size, top_k, softmax_scale):
    B, T, Hq, _ = q.shape
    K1 = num_slots(T, block_size, top_k)
    return (
        torch.empty_like(q),
        q.new_empty((B, Hq, T), dtype=torch.float32),
        q.new_empty((B, Hq, T, K1), dtype=torch.int32),
    )


@torch.library.custom_op("lctrain::moba_attn_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    sel: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    block_size: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(dout, q, k, v, out, lse, dlse, sel, cu_seqlens, block_size, softmax_scale)


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, sel, cu_seqlens, block_size, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu, block_size, _top_k, scale = inputs
    out, lse, sel = output
    ctx.mark_non_differentiable(sel)
    ctx.save_for_backward(q, k, v, out, lse, sel, cu)
    ctx.args = (block_size, scale)


def _backward(ctx, dout, dlse, _dsel):
    q, k, v, out, lse, sel, cu = ctx.saved_tensors
    block_size, scale = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, dlse, sel, cu, block_size, scale)
    return dq, dk, dv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public API


def moba_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    top_k: int,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw Triton MoBA forward: ``(out, lse, sel)``, differentiable through ``out`` and ``lse``.

    Args:
        q: [B, T, Hq, D]; k, v: [B, T, Hkv, D], ``Hq % Hkv == 0``; fp16/bf16/fp32, ``D <= 256``.
        block_size, top_k, cu_seqlens, scale: see :func:`lctrain.kernels.moba.moba_attn_func`.

    Returns:
        ``out`` [B, T, Hq, D] in q's dtype; ``lse`` fp32 natural-log [B, Hq, T]; ``sel`` int32
        [B, Hq, T, K1] (K1 = ``min(top_k - 1, ceil(T / block_size) - 1)``): the selected past
        blocks as global ids ``b * nb + j`` in score order, ``-1`` for unused slots.

    Raises:
        ValueError: bad shapes/dtypes/arguments (see
            :func:`lctrain.kernels.moba.naive.check_moba_inputs`), ``D > 256``.
    """
    check_moba_inputs(q, k, v, block_size, top_k, cu_seqlens)
    _check_triton(q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    cu = None if cu_seqlens is None else with_host_bounds(cu_seqlens, dtype=torch.int32)
    return _fwd_op(q, k, v, cu, block_size, top_k, scale)


def moba_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sel: torch.Tensor,
    block_size: int,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw Triton MoBA backward for the selection ``sel`` of :func:`moba_attn_fwd`.

    Args:
        dout: gradient of ``out`` (q's shape); q, k, v, block_size, cu_seqlens, scale: as given to
            the forward; out, lse, sel: its outputs; dlse: optional gradient of ``lse``.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v (no gradient through the gate).

    Raises:
        ValueError: as :func:`moba_attn_fwd`, or ``dout``/``out``/``lse``/``sel`` of wrong shape.
    """
    check_moba_inputs(q, k, v, block_size, 1, cu_seqlens)
    _check_triton(q)
    B, T, Hq, _ = q.shape
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(
            f"dout{tuple(dout.shape)} and out{tuple(out.shape)} must have q's shape {tuple(q.shape)}"
        )
    if tuple(lse.shape) != (B, Hq, T) or (dlse is not None and tuple(dlse.shape) != (B, Hq, T)):
        raise ValueError(f"lse (and dlse) must be {(B, Hq, T)}, got {tuple(lse.shape)}")
    if sel.dim() != 4 or tuple(sel.shape[:3]) != (B, Hq, T) or sel.dtype != torch.int32:
        raise ValueError(f"sel must be int32 [B, Hq, T, K1], got {sel.dtype} {tuple(sel.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    cu = None if cu_seqlens is None else with_host_bounds(cu_seqlens, dtype=torch.int32)
    return _bwd_op(dout, q, k, v, out, lse, dlse, sel, cu, block_size, scale)


def moba_attn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    top_k: int,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA attention with the Triton kernels: ``(out, lse)`` (autograd through both).

    Same arguments, results and errors as :func:`moba_attn_fwd`, without ``sel``.
    """
    out, lse, _ = moba_attn_fwd(q, k, v, block_size, top_k, cu_seqlens, scale)
    return out, lse
