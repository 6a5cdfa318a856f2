"""Triton grouped GEMM for expert-sorted tokens: ``out[rows of e] = x[rows of e] @ w[e]``.

Three layers as elsewhere in ``lctrain.kernels``: :func:`triton_grouped_mm` (public, shapes
below), :class:`TritonGroupedMM` (autograd), and two ``@triton.jit`` kernels:

* ``_grouped_mm_kernel``: one program per (row tile of one expert's segment, column tile);
  the row tiles are listed on the host (``tile_expert``, ``tile_row``) so empty experts cost
  nothing. Used for the forward ``x @ w[e]`` and for ``dx = dy @ w[e]^T`` (``w`` passed with
  transposed strides).
* ``_grouped_wgrad_kernel``: ``dw[e] = x_e^T @ dy_e``, one program per (expert, K tile, N
  tile), looping over the segment's rows; an empty segment writes zeros.

Accumulation is fp32 (``tl.dot``); fp32 operands use exact IEEE fp32 products (``DOT_PREC``, as
the attention kernels), fp16/bf16 tensor cores. Tiles are 32 x 32 x 32 on CUDA and under the
interpreter alike. Tested against the per-expert reference (``tests/kernels/test_moe_grouped.py``)
under ``TRITON_INTERPRET=1`` in fp32 (the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, out_ptr, starts_ptr, ends_ptr, tile_expert_ptr, tile_row_ptr,
    K, N,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_t)
    row0 = tl.load(tile_row_ptr + pid_t)
    end = tl.load(ends_ptr + e)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < end
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + e * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=DOT_PREC)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, starts_ptr, ends_ptr,
    K, N,
    stride_xm, stride_xk, stride_dm, stride_dn, stride_we, stride_wk, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(starts_ptr + e)
    end = tl.load(ends_ptr + e)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < K
    col_ok = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        a = tl.load(x_ptr + rows[None, :] * stride_xm + ks[:, None] * stride_xk,
                    mask=k_ok[:, None] & row_ok[None, :], other=0.0)  # x_e^T tile [BLOCK_K, BLOCK_M]
        g = tl.load(dy_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a, g, input_precision=DOT_PREC)
    tl.store(dw_ptr + e * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
             acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 only affects fp32 operands


def _tiles(counts: torch.Tensor, device: torch.device):
    counts = counts.to(torch.int64).cpu()
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    n_tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_expert = torch.repeat_interleave(torch.arange(counts.numel()), n_tiles)
    first_tile = torch.cumsum(n_tiles, 0) - n_tiles
    tile_row = starts[tile_expert] + (torch.arange(tile_expert.numel()) - first_tile[tile_expert]) * BLOCK_M
    as_dev = lambda t: t.to(device=device, dtype=torch.int32)
    return as_dev(starts), as_dev(ends), as_dev(tile_expert), as_dev(tile_row)


def _fwd(x: torch.Tensor, w_strides: tuple[int, int, int], w: torch.Tensor, N: int, tiles) -> torch.Tensor:
    starts, ends, tile_expert, tile_row = tiles
    out = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    if tile_expert.numel() and N:
        grid = (tile_expert.numel(), triton.cdiv(N, BLOCK_N))
        _grouped_mm_kernel[grid](
            x, w, out, starts, ends, tile_expert, tile_row, x.shape[1], N,
            x.stride(0), x.stride(1), *w_strides, out.stride(0), out.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PREC=_dot_precision(x.dtype),
        )
    return out


class TritonGroupedMM(torch.autograd.Function):
    """Autograd wrapper: forward and ``dx`` with ``_grouped_mm_kernel``, ``dw`` with ``_grouped_wgrad_kernel``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        tiles = _tiles(counts, x.device)
        ctx.save_for_backward(x, w)
        ctx.tiles = tiles
        return _fwd(x, (w.stride(0), w.stride(1), w.stride(2)), w, w.shape[2], tiles)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        starts, ends, _, _ = ctx.tiles
        # dx[rows of e] = dy[rows of e] @ w[e]^T: w read with its K and N strides swapped
        dx = _fwd(dy, (w.stride(0), w.stride(2), w.stride(1)), w, w.shape[1], ctx.tiles)
        E, K, N = w.shape
        dw = torch.empty(E, K, N, dtype=w.dtype, device=w.device)
        grid = (E, triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N))
        _grouped_wgrad_kernel[grid](
            x, dy, dw, starts, ends, K, N,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PREC=_dot_precision(x.dtype),
        )
        return dx, dw, None


def triton_grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Grouped matmul over expert segments with the Triton kernels (differentiable in ``x`` and ``w``).

    Args:
        x: [M, K] rows sorted by expert (fp32/fp16/bf16; fp32 accumulation).
        w: [E, K, N] one matrix per expert, same dtype as ``x``.
        tokens_per_expert: int [E] rows of each expert (sums to M; zeros allowed).

    Returns:
        [M, N] in ``x.dtype``: ``out[rows of e] = x[rows of e] @ w[e]``.

    Raises:
        ValueError: mismatched shapes/dtypes or counts not summing to M.
    """
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1] or tokens_per_expert.shape != (w.shape[0],):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w {tuple(w.shape)}, tokens_per_expert "
                         f"{tuple(tokens_per_expert.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"x and w must share a dtype, got {x.dtype} and {w.dtype}")
    if int(tokens_per_expert.sum()) != x.shape[0]:
        raise ValueError(f"tokens_per_expert sums to {int(tokens_per_expert.sum())} but x has {x.shape[0]} rows")
    return TritonGroupedMM.apply(x, w, tokens_per_expert)
