"""Lightning Attention-2 in Triton: ``chunk_lightning_attn_triton`` (forward and backward).

Same contract as :func:`lctrain.kernels.lightning_attn.chunk_lightning_attn` (the torch path);
the algorithm (Qin et al., "Lightning Attention-2", arXiv:2401.04658, Alg. 1-2: softmax-free
attention with the decay mask inside a block, the recurrent [K, V] state across blocks) and the
kernels are in :mod:`lctrain.kernels.lightning_attn.triton_kernels`. Three layers as in
DESIGN.md: this public function, :class:`LightningAttnFunction` (autograd), the kernels.
"""

from __future__ import annotations

import itertools

import torch
import triton

from lctrain.kernels.lightning_attn import triton_kernels as tk
from lctrain.kernels.lightning_attn.chunk import _validate
from lctrain.kernels.lightning_attn.naive import check_slope
from lctrain.kernels.limits import LIGHTNING_TRITON_MAX_HEAD_DIM
from lctrain.kernels.tiles import tile_dtype
from lctrain.kernels.varlen import host_bounds

__all__ = ["chunk_lightning_attn_triton"]


def _interpreter_tiles() -> bool:
    """Whether the interpreter's full-width state tiles apply (the CUDA ones: 64 wide, also under
    the interpreter inside :func:`lctrain.kernels.tiles.force_cuda_tiles`)."""
    return tile_dtype(torch.float32) is None


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _state_tiles(K: int, V: int) -> tuple[int, int]:
    bk = max(16, triton.next_power_of_2(K))
    bv = max(16, triton.next_power_of_2(V))
    if _interpreter_tiles():
        return bk, bv
    return min(bk, 64), min(bv, 64)


def _block_tables(cu: torch.Tensor, C: int, lengths: list[int]):
    """Global block enumeration (sequence-major): offsets [N+1], block -> (sequence, index)."""
    nblk = [(n + C - 1) // C for n in lengths]
    dev = cu.device
    offsets = torch.tensor([0, *itertools.accumulate(nblk)], dtype=torch.int32)
    seq = torch.repeat_interleave(
        torch.arange(len(nblk), dtype=torch.int32), torch.tensor(nblk, dtype=torch.long)
    )
    idx = (
        torch.cat([torch.arange(n, dtype=torch.int32) for n in nblk])
        if nblk
        else torch.zeros(0, dtype=torch.int32)
    )
    return offsets.to(dev), seq.to(dev), idx.to(dev), sum(nblk)


class _Plan:
    """Packed views and block tables shared by forward and backward."""

    def __init__(self, q, cu_seqlens, C):
        B, T, H, _ = q.shape
        if cu_seqlens is None:
            lengths = [T] * B
            self.cu = torch.arange(0, B + 1, dtype=torch.int32, device=q.device) * T
        else:
            b = host_bounds(cu_seqlens)  # the host record: no device read
            lengths = [e - s for s, e in zip(b[:-1], b[1:])]
            self.cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        self.N, self.H, self.C = len(lengths), H, C
        self.offsets, self.seq, self.idx, self.num_blocks = _block_tables(self.cu, C, lengths)


def _fwd(q, k, v, slope, scale, h0, plan: _Plan, output_final_state: bool):
    B, T, H, K = q.shape
    V = v.shape[-1]
    qp, kp, vp = (x.reshape(B * T, H, x.shape[-1]) for x in (q, k, v))
    o = torch.empty_like(vp)
    states = torch.empty(plan.num_blocks, H, K, V, dtype=torch.float32, device=q.device)
    ht = torch.empty(plan.N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    BK, BV = _state_tiles(K, V)
    if plan.N > 0:
        tk._state_fwd[(plan.N * H, triton.cdiv(K, BK), triton.cdiv(V, BV))](
            kp,
            vp,
            h0 if h0 is not None else states,
            ht if ht is not None else states,
            states,
            plan.cu,
            plan.offsets,
            slope,
            kp.stride(0),
            kp.stride(1),
            vp.stride(0),
            vp.stride(1),
            H,
            K,
            V,
            HAS_H0=h0 is not None,
            STORE_HT=ht is not None,
            DOT_PREC=_dot_precision(q.dtype),
            C=plan.C,
            BK=BK,
            BV=BV,
            num_warps=4,
        )
    if plan.num_blocks > 0:
        fk, fv = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))
        bv = fv if _interpreter_tiles() else min(fv, 64)
        tk._output_fwd[(plan.num_blocks, triton.cdiv(V, bv), H)](
            qp,
            kp,
            vp,
            o,
            states,
            plan.cu,
            plan.seq,
            plan.idx,
            slope,
            qp.stride(0),
            qp.stride(1),
            kp.stride(0),
            kp.stride(1),
            vp.stride(0),
            vp.stride(1),
            o.stride(0),
            o.stride(1),
            H,
            K,
            V,
            scale,
            DOT_PREC=_dot_precision(q.dtype),
            C=plan.C,
            BK=fk,
            BV=bv,
            num_warps=4,
        )
    return o.view(B, T, H, V), states, ht


def _bwd(do, dht, q, k, v, slope, scale, states, plan: _Plan, need_dh0: bool):
    B, T, H, K = q.shape
    V = v.shape[-1]
    qp, kp, vp = (x.reshape(B * T, H, x.shape[-1]) for x in (q, k, v))
    dop = do.contiguous().reshape(B * T, H, V)
    dstates = torch.empty_like(states)
    dh0 = torch.empty(plan.N, H, K, V, dtype=torch.float32, device=q.device) if need_dh0 else None
    dht = dht.float().contiguous() if dht is not None else None
    BK, BV = _state_tiles(K, V)
    if plan.N > 0:
        tk._state_bwd[(plan.N * H, triton.cdiv(K, BK), triton.cdiv(V, BV))](
            qp,
            dop,
            dht if dht is not None else dstates,
            dh0 if dh0 is not None else dstates,
            dstates,
            plan.cu,
            plan.offsets,
            slope,
            qp.stride(0),
            qp.stride(1),
            dop.stride(0),
            dop.stride(1),
            H,
            K,
            V,
            scale,
            HAS_DHT=dht is not None,
            STORE_DH0=dh0 is not None,
            DOT_PREC=_dot_precision(q.dtype),
            C=plan.C,
            BK=BK,
            BV=BV,
            num_warps=4,
        )
    dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
    if plan.num_blocks > 0:
        fk, fv = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))
        tk._block_bwd[(plan.num_blocks, H)](
            qp,
            kp,
            vp,
            dop,
            dq,
            dk,
            dv,
            states,
            dstates,
            plan.cu,
            plan.seq,
            plan.idx,
            slope,
            qp.stride(0),
            qp.stride(1),
            kp.stride(0),
            kp.stride(1),
            vp.stride(0),
            vp.stride(1),
            dop.stride(0),
            dop.stride(1),
            dq.stride(0),
            dq.stride(1),
            dk.stride(0),
            dk.stride(1),
            dv.stride(0),
            dv.stride(1),
            H,
            K,
            V,
            scale,
            DOT_PREC=_dot_precision(q.dtype),
            C=plan.C,
            BK=fk,
            BV=fv,
            num_warps=4 if max(fk, fv) <= 64 else 8,
        )
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dh0


class LightningAttnFunction(torch.autograd.Function):
    """Autograd wrapper; saves q, k, v, slope, initial state and recomputes block states in backward."""

    @staticmethod
    def forward(ctx, q, k, v, slope, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        slope = slope.detach().float().contiguous()
        h0 = initial_state.detach().float().contiguous() if initial_state is not None else None
        plan = _Plan(q, cu_seqlens, chunk_size)
        o, _, ht = _fwd(q, k, v, slope, scale, h0, plan, output_final_state)
        ctx.save_for_backward(q, k, v, slope, h0)
        ctx.plan, ctx.scale = plan, scale
        ctx.has_h0 = initial_state is not None
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        if ht is not None:
            return o, ht
        return o, None

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, slope, h0 = ctx.saved_tensors
        plan = ctx.plan
        if do is None:
            do = torch.zeros_like(v)
        _, states, _ = _fwd(q, k, v, slope, ctx.scale, h0, plan, False)  # recompute block states
        dq, dk, dv, dh0 = _bwd(
            do, dht, q, k, v, slope, ctx.scale, states, plan, ctx.has_h0 and ctx.needs_input_grad[5]
        )
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, None, None, dh0, None, None, None


def chunk_lightning_attn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning Attention-2 with Triton kernels (forward and backward).

    Recurrence per head: ``S_t = exp(-slope_h) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    Args:
        q, k: [B, T, H, K] queries and keys (fp16/bf16/fp32; on GPU bf16 with fp32 accumulation).
        v: [B, T, H, V] values, same dtype.
        slope: [H] decay rate per head, ``>= 0``. A fixed buffer: it receives no gradient.
        scale: query scale; default ``K ** -0.5``.
        initial_state: [N, H, K, V] state before the first token of each sequence (N = B, or
            the number of sequences in ``cu_seqlens``); differentiable.
        output_final_state: also return the fp32 state after the last token of each sequence.
        cu_seqlens: int [N + 1] cumulative lengths of packed sequences (requires B == 1); the
            state restarts at each sequence start.
        chunk_size: block size C, a power of two >= 16; on CUDA at most 64 is used (32 for fp32
            with head dims > 64) to fit shared memory; the result does not depend on C.

    Returns:
        ``(o, final_state)``: o [B, T, H, V] in v's dtype; final_state fp32 [N, H, K, V] or None.

    Raises:
        ValueError: as :func:`~lctrain.kernels.lightning_attn.chunk_lightning_attn`, plus a
            ``chunk_size`` that is not a power of two >= 16, K or V > 128, mixed or unsupported
            dtypes, or a ``slope`` that requires grad.
    """
    _validate(q, k, v, initial_state, cu_seqlens, chunk_size)
    H, K = q.shape[2], q.shape[3]
    check_slope(slope, H)
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the Triton kernel, got {chunk_size}")
    if K > LIGHTNING_TRITON_MAX_HEAD_DIM or v.shape[-1] > LIGHTNING_TRITON_MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= 128 for the Triton kernel, got K={K} V={v.shape[-1]}")
    if (
        q.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        or k.dtype != q.dtype
        or v.dtype != q.dtype
    ):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if slope.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "the Triton Lightning kernel gives slope no gradient; pass slope.detach() "
            "(or use chunk_lightning_attn for a learned slope)"
        )
    if scale is None:
        scale = K**-0.5
    if q.is_cuda:
        # the backward kernel holds [C, K|V] tiles of q, k, v, dO and [K, V] states in shared
        # memory: 64-token blocks fit the 227 KB of an H100 for bf16 with 128-wide heads, 32 for
        # exact fp32 matmuls. The result does not depend on the block size.
        chunk_size = min(chunk_size, 32 if q.dtype == torch.float32 and max(K, v.shape[-1]) > 64 else 64)
    return LightningAttnFunction.apply(
        q, k, v, slope, float(scale), initial_state, output_final_state, cu_seqlens, chunk_size
    )
