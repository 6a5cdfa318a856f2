"""Linear cross entropy over chunks of rows: the ``[N, V]`` logits never exist at once.

For hidden states ``h`` [N, D], the output projection ``W`` [V, D] and labels ``y``, the loss is
``L = sum_{i: y_i != ignore} (lse_i - z_{i, y_i})`` with ``z_i = W h_i`` and
``lse_i = log sum_v exp(z_iv)``. Its gradients are ``dz_i = g (softmax(z_i) - onehot(y_i))``
(zero for ignored rows), ``dh_i = dz_i W`` and ``dW = sum_i dz_i^T h_i``.

Forward computes ``z`` for ``chunk_size`` rows at a time (fp32 log-sum-exp) and keeps only
``lse`` [N]; backward recomputes each chunk's logits from the saved ``h``, ``W`` and ``lse``. The
memory for logits falls from ``O(N V)`` (logits, their log-softmax saved for backward and their
gradient) to ``O(chunk_size V)``, at the price of one more ``[chunk, D] x [D, V]`` matmul per
chunk in backward. The same fusion is Megatron-LM's cross-entropy loss fusion, Liger-Kernel's
fused linear cross entropy and torchtune's chunked output loss.
"""

from __future__ import annotations

import torch

__all__ = ["linear_cross_entropy_chunked"]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_size: int):
        N = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        wt = weight.t()
        for s in range(0, N, chunk_size):
            e = min(N, s + chunk_size)
            z = (hidden[s:e] @ wt).to(acc)  # [n, V]
            lse_c = torch.logsumexp(z, -1)
            y = labels[s:e]
            valid = y != ignore_index
            target = z.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
            total += torch.where(valid, lse_c - target, 0.0).sum()
            lse[s:e] = lse_c
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        return total

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, lse = ctx.saved_tensors
        N = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        wt = weight.t()
        rows = torch.arange(min(N, ctx.chunk_size), device=hidden.device)
        for s in range(0, N, ctx.chunk_size):
            e = min(N, s + ctx.chunk_size)
            h = hidden[s:e]
            y = labels[s:e]
            valid = y != ctx.ignore_index
            dz = torch.exp((h @ wt).to(lse.dtype) - lse[s:e, None])  # softmax, [n, V]
            dz[rows[: e - s], torch.where(valid, y, 0)] -= 1.0
            dz *= torch.where(valid, grad.to(lse.dtype), 0.0)[:, None]
            dz = dz.to(hidden.dtype)
            if need_h:
                dh[s:e] = dz @ weight
            if need_w:
                dw += (dz.t() @ h).to(dw.dtype)
        return dh, (dw.to(weight.dtype) if need_w else None), None, None, None


def linear_cross_entropy_chunked(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Summed cross entropy of ``hidden @ weight.T`` against ``labels``, ``chunk_size`` rows at a time.

    Args:
        hidden: [N, D] final hidden states (any float dtype; the matmuls run in it).
        weight: [V, D] output projection, same dtype as ``hidden``.
        labels: int [N] target ids in ``[0, V)`` or ``ignore_index``.
        ignore_index: label of rows that count nothing (no loss, no gradient).
        chunk_size: rows per chunk (> 0).

    Returns:
        scalar: the sum over labelled rows of ``logsumexp(z_i) - z_{i, y_i}``, with the log-sum-exp
        and the sum in fp32 (fp64 for fp64 inputs); the weight gradient is accumulated over the
        chunks in that dtype. Differentiable once w.r.t. ``hidden`` and ``weight``.

    Raises:
        ValueError: shapes or dtypes that do not match, or ``chunk_size < 1``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N={hidden.shape[0]}], got {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, int(ignore_index), chunk_size)
