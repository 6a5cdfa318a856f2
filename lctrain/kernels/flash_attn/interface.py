"""FlashAttention-2 with log-sum-exp in Triton: raw forward/backward ops and autograd functions.

Three layers (DESIGN.md): the public functions :func:`flash_attn_func` /
:func:`flash_attn_varlen_func` (autograd), the raw :func:`flash_attn_fwd` / :func:`flash_attn_bwd`
(what ring attention calls per block pair), and the ``@triton.jit`` kernels in
:mod:`lctrain.kernels.flash_attn.triton_kernels`. Both raw ops are ``torch.library.custom_op``s
(``lctrain::flash_attn_fwd``, ``lctrain::flash_attn_bwd``) with fake implementations, and the
forward op has a registered autograd formula, so ``torch.compile(fullgraph=True)`` traces through
them as single nodes.

Algorithm: Dao, "FlashAttention-2" (2023), Alg. 1 (forward) and Alg. 2 (backward). The backward
takes the *saved* ``lse`` and ``out``: given the log-sum-exp and output of a larger attention
that merged this block with others (ring attention), it returns this block pair's share of the
gradients, because ``P_ij = exp(s_ij - lse_i)`` and ``D_i = rowsum(dO_i * O_i)`` are properties of
the merged row.

Layouts: dense ``[B, T, H, D]`` (lse ``[B, H, T]``) or packed variable-length ``[total, H, D]``
with int32 ``cu_seqlens`` ``[N + 1]`` (lse ``[H, total]``), as in the ``flash_attn`` package.
Masking follows FlashAttention >= 2.1 (bottom-right aligned when ``Tq != Tk``; see
:mod:`lctrain.kernels.flash_attn.naive`).
"""

from __future__ import annotations

import torch
import triton

from lctrain.kernels.limits import FLASH_MAX_HEAD_DIM
from lctrain.kernels.tiles import tile_dtype
from lctrain.kernels.varlen import check_cu_seqlens, max_seqlen
from lctrain.kernels.flash_attn import triton_kernels as tk

__all__ = ["flash_attn_bwd", "flash_attn_func", "flash_attn_fwd", "flash_attn_varlen_func"]


# Block sizes. Under the interpreter every program costs the same per op whatever its size, so
# wide blocks are fastest; tests may override them (e.g. to force several blocks per sequence),
# or run the CUDA tiles under the interpreter (``lctrain.kernels.tiles.force_cuda_tiles``).
BLOCK_OVERRIDE: dict[str, int] = {}


def _config(head_dim: int, backward: bool, dtype: torch.dtype) -> dict:
    """Tiles and launch options: the interpreter's 64 x 64, or the CUDA ones of ``dtype`` (or of
    the dtype :func:`lctrain.kernels.tiles.force_cuda_tiles` names); ``BLOCK_OVERRIDE`` last."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    tiles = tile_dtype(dtype)
    if tiles is None:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    elif tiles == torch.float32:  # exact fp32 products stage more shared memory: smaller tiles
        cfg = {
            "BLOCK_M": 32 if backward else 64,
            "BLOCK_N": 32,
            "num_warps": 4,
            "num_stages": 1 if backward else 2,
        }
    elif backward:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4 if block_d <= 64 else 8, "num_stages": 2}
    else:
        cfg = {
            "BLOCK_M": 128,
            "BLOCK_N": 64 if block_d <= 128 else 32,
            "num_warps": 4 if block_d <= 64 else 8,
            "num_stages": 3 if block_d <= 128 else 2,
        }
    cfg.update(BLOCK_OVERRIDE)
    cfg["BLOCK_D"] = block_d
    return cfg


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would cost ~1e-3 relative error); others use tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _window(causal: bool, window_size) -> tuple[int, int]:
    left, right = (int(w) for w in window_size)
    if causal:
        right = 0
    return left, right


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k):
    varlen = cu_seqlens_q is not None
    if (cu_seqlens_k is not None) != varlen:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    nd = 3 if varlen else 4
    layout = "[total, H, D] (packed, with cu_seqlens)" if varlen else "[B, T, H, D]"
    if q.dim() != nd or k.dim() != nd or v.dim() != nd:
        raise ValueError(
            f"q, k, v must be {layout}; got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[-2] % k.shape[-2]:
        raise ValueError(
            f"need k.shape == v.shape, equal head dims and Hq % Hkv == 0; "
            f"got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q{tuple(q.shape)} k{tuple(k.shape)}")
    if (
        q.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        or k.dtype != q.dtype
        or v.dtype != q.dtype
    ):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > FLASH_MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= 256, got {q.shape[-1]}")
    if varlen and (cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must both be [N + 1], got "
            f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}"
        )
    if varlen and not torch.compiler.is_compiling():  # values need a host read: skipped when traced
        check_cu_seqlens(cu_seqlens_q, q.shape[0])
        check_cu_seqlens(cu_seqlens_k, k.shape[0])


def _pack(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Dense -> packed views plus uniform cu_seqlens; packed inputs pass through."""
    if cu_seqlens_q is not None:
        return (
            q,
            k,
            v,
            cu_seqlens_q.to(torch.int32),
            cu_seqlens_k.to(torch.int32),
            max_seqlen_q,
            max_seqlen_k,
        )
    B, Tq, Tk = q.shape[0], q.shape[1], k.shape[1]
    cu_q = torch.arange(0, B + 1, device=q.device, dtype=torch.int32) * Tq
    cu_k = torch.arange(0, B + 1, device=q.device, dtype=torch.int32) * Tk
    return (
        q.reshape(B * Tq, *q.shape[2:]),
        k.reshape(B * Tk, *k.shape[2:]),
        v.reshape(B * Tk, *v.shape[2:]),
        cu_q,
        cu_k,
        Tq,
        Tk,
    )


def _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, wl, wr):
    varlen = cu_seqlens_q is not None
    B = None if varlen else q.shape[0]
    qp, kp, vp, cu_q, cu_k, mq, _ = _pack(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    total_q, Hq, D = qp.shape
    Hkv = kp.shape[1]
    out = torch.empty_like(qp)
    lse = torch.empty(Hq, total_q, device=q.device, dtype=torch.float32)
    n_seq = cu_q.shape[0] - 1
    cfg = _config(D, backward=False, dtype=q.dtype)
    if total_q > 0 and n_seq > 0 and mq > 0:
        grid = (n_seq, triton.cdiv(mq, cfg["BLOCK_M"]), Hq)
        tk._fwd_kernel[grid](
            qp,
            kp,
            vp,
            out,
            lse,
            cu_q,
            cu_k,
            qp.stride(0),
            qp.stride(1),
            kp.stride(0),
            kp.stride(1),
            vp.stride(0),
            vp.stride(1),
            out.stride(0),
            out.stride(1),
            lse.stride(0),
            scale * tk.LOG2E,
            wl,
            wr,
            D,
            GROUP=Hq // Hkv,
            HAS_LEFT=wl >= 0,
            HAS_RIGHT=wr >= 0,
            DOT_PREC=_dot_precision(q.dtype),
            **cfg,
        )
    if varlen:
        return out, lse
    Tq = q.shape[1]
    return out.view(q.shape), lse.view(Hq, B, Tq).transpose(0, 1).contiguous()


def _bwd_impl(
    dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, wl, wr
):
    varlen = cu_seqlens_q is not None
    qp, kp, vp, cu_q, cu_k, mq, mk = _pack(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    total_q, Hq, D = qp.shape
    Hkv = kp.shape[1]
    dop = dout.contiguous().reshape(qp.shape)
    outp = out.reshape(qp.shape)
    if not varlen:  # [B, H, T] -> [H, B*T]
        lse = lse.transpose(0, 1).reshape(Hq, total_q)
        dlse = None if dlse is None else dlse.transpose(0, 1).reshape(Hq, total_q)
    lse = lse.float().contiguous()
    # D_i = rowsum(dO_i * O_i) (FlashAttention-2 Alg. 2 line 4); an upstream gradient of lse adds
    # dlse_i * P_ij to dS_ij, which is the same as subtracting it from D_i
    delta = (dop.float() * outp.float()).sum(-1).transpose(0, 1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dq = torch.empty_like(qp)
    dk = torch.empty_like(kp)
    dv = torch.empty_like(vp)
    n_seq = cu_q.shape[0] - 1
    cfg = _config(D, backward=True, dtype=q.dtype)
    common = dict(
        GROUP=Hq // Hkv, HAS_LEFT=wl >= 0, HAS_RIGHT=wr >= 0, DOT_PREC=_dot_precision(q.dtype), **cfg
    )
    if kp.shape[0] > 0 and n_seq > 0 and mk > 0:
        tk._bwd_dkdv_kernel[(n_seq, triton.cdiv(mk, cfg["BLOCK_N"]), Hkv)](
            qp,
            kp,
            vp,
            dop,
            lse,
            delta,
            dk,
            dv,
            cu_q,
            cu_k,
            qp.stride(0),
            qp.stride(1),
            kp.stride(0),
            kp.stride(1),
            vp.stride(0),
            vp.stride(1),
            dop.stride(0),
            dop.stride(1),
            dk.stride(0),
            dk.stride(1),
            dv.stride(0),
            dv.stride(1),
            lse.stride(0),
            scale,
            scale * tk.LOG2E,
            wl,
            wr,
            D,
            **common,
        )
    else:
        dk.zero_()
        dv.zero_()
    if total_q > 0 and n_seq > 0 and mq > 0:
        tk._bwd_dq_kernel[(n_seq, triton.cdiv(mq, cfg["BLOCK_M"]), Hq)](
            qp,
            kp,
            vp,
            dop,
            lse,
            delta,
            dq,
            cu_q,
            cu_k,
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
            lse.stride(0),
            scale,
            scale * tk.LOG2E,
            wl,
            wr,
            D,
            **common,
        )
    else:
        dq.zero_()
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


# ---------------------------------------------------------------------------------------------
# custom ops (single graph nodes for torch.compile)


@torch.library.custom_op("lctrain::flash_attn_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        window_left,
        window_right,
    )


@_fwd_op.register_fake
def _(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right
):
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("lctrain::flash_attn_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(
        dout,
        q,
        k,
        v,
        out,
        lse,
        dlse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        window_left,
        window_right,
    )


@_bwd_op.register_fake
def _(
    dout,
    q,
    k,
    v,
    out,
    lse,
    dlse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale,
    window_left,
    window_right,
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, mq, mk, scale, wl, wr = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (mq, mk, scale, wl, wr)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    mq, mk, scale, wl, wr = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, dlse, cu_q, cu_k, mq, mk, scale, wl, wr)
    return dq, dk, dv, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public API


def _max_seqlen(cu: torch.Tensor, given: int | None) -> int:
    if given is not None:
        return int(given)
    return max_seqlen(cu)  # from the host record of the boundaries (one read if there is none)


def flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw FlashAttention-2 forward returning ``(out, lse)`` (differentiable through both).

    Args:
        q: [B, Tq, Hq, D], or packed [total_q, Hq, D] with ``cu_seqlens_q``. fp16/bf16/fp32,
            ``D <= 256``.
        k, v: [B, Tk, Hkv, D], or packed [total_k, Hkv, D]; ``Hq % Hkv == 0`` (GQA).
        softmax_scale: logit scale, default ``D ** -0.5``.
        causal: mask keys after the (bottom-right aligned) diagonal; same as ``window_size[1] = 0``.
        window_size: ``(left, right)`` sliding window, ``-1`` = unlimited.
        cu_seqlens_q, cu_seqlens_k: int32 [N + 1] boundaries of the packed sequences (q's and k's
            sequence ``n`` attend each other; their lengths may differ).
        max_seqlen_q, max_seqlen_k: longest sequence (computed with a host sync if None).

    Returns:
        ``out`` with q's shape and dtype; ``lse`` fp32 natural-log, [B, Hq, Tq] or [Hq, total_q];
        rows that see no key have ``out = 0`` and ``lse = -inf``.

    Raises:
        ValueError: bad shapes/dtypes, or only one of ``cu_seqlens_q``/``cu_seqlens_k``.
    """
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    wl, wr = _window(causal, window_size)
    if cu_seqlens_q is not None:
        mq, mk = _max_seqlen(cu_seqlens_q, max_seqlen_q), _max_seqlen(cu_seqlens_k, max_seqlen_k)
    else:
        mq, mk = q.shape[1], k.shape[1]
    return _fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, mq, mk, scale, wl, wr)


def flash_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw FlashAttention-2 backward for one (query block, key block) pair.

    ``out`` and ``lse`` may belong to a larger attention that merged this key block with others
    (ring attention passes the final merged ``out``/``lse``): the result is then this block
    pair's contribution, ``dQ`` summed over key blocks and ``dK``/``dV`` over query blocks give
    the full gradients. ``dS_ij = P_ij (dP_ij - D_i + dlse_i)`` with ``P_ij = exp(s_ij - lse_i)``,
    ``D_i = rowsum(dout_i * out_i)`` (FlashAttention-2, Alg. 2).

    Args:
        dout: gradient of ``out``, q's shape.
        q, k, v, softmax_scale, causal, window_size, cu_seqlens_*, max_seqlen_*: as for
            :func:`flash_attn_fwd` of this block pair.
        out: q's shape, the (merged) attention output.
        lse: fp32 natural-log, [B, Hq, Tq] (dense) or [Hq, total_q] (packed), of ``out``.
        dlse: optional gradient of ``lse``, same shape.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v.

    Raises:
        ValueError: as :func:`flash_attn_fwd`, or ``dout``/``out``/``lse`` of the wrong shape.
    """
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(
            f"dout{tuple(dout.shape)} and out{tuple(out.shape)} must have q's shape {tuple(q.shape)}"
        )
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    if tuple(lse.shape) != lse_shape or (dlse is not None and tuple(dlse.shape) != lse_shape):
        raise ValueError(f"lse (and dlse) must be {lse_shape}, got {tuple(lse.shape)}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    wl, wr = _window(causal, window_size)
    if cu_seqlens_q is not None:
        mq, mk = _max_seqlen(cu_seqlens_q, max_seqlen_q), _max_seqlen(cu_seqlens_k, max_seqlen_k)
    else:
        mq, mk = q.shape[1], k.shape[1]
    return _bwd_op(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, mq, mk, scale, wl, wr)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    return_lse: bool = False,
):
    """Softmax attention ``softmax(scale Q K^T + mask) V`` for [B, T, H, D] (FlashAttention-2).

    Args:
        q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] with ``Hq % Hkv == 0``; fp16/bf16/fp32.
        softmax_scale, causal, window_size: see :func:`flash_attn_fwd`.
        return_lse: also return the fp32 natural-log ``lse`` [B, Hq, Tq] (differentiable).

    Returns:
        ``out`` [B, Tq, Hq, D] in q's dtype, or ``(out, lse)``.
    """
    out, lse = flash_attn_fwd(q, k, v, softmax_scale, causal, window_size)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    return_lse: bool = False,
):
    """Attention over packed variable-length sequences, layout ``[total, H, D]``.

    Args:
        q: [total_q, Hq, D]; k, v: [total_k, Hkv, D] (the lctrain model layout ``[1, T, H, D]``
            is ``x[0]``).
        cu_seqlens_q, cu_seqlens_k: int32 [N + 1], sequence ``n`` is rows
            ``cu_seqlens[n]:cu_seqlens[n+1]``; no attention crosses a boundary.
        max_seqlen_q, max_seqlen_k: longest sequence; computed (host sync) if None.
        softmax_scale, causal, window_size: see :func:`flash_attn_fwd`.
        return_lse: also return ``lse`` fp32 [Hq, total_q].

    Returns:
        ``out`` [total_q, Hq, D] in q's dtype, or ``(out, lse)``.
    """
    out, lse = flash_attn_fwd(
        q, k, v, softmax_scale, causal, window_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    return (out, lse) if return_lse else out
