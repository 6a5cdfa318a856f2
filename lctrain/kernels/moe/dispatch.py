"""Token <-> expert-slot permutation of a mixture-of-experts layer on one device.

Slots are the kept ``(token, expert, weight)`` top-k choices; they are sorted by expert (stable),
the experts run on the sorted rows, and each row's output is weighted and summed back into its
token (GShard, Lepikhin et al. 2020, Sec. 3.2; Megatron's token permute / unpermute).
"""

from __future__ import annotations

import torch


def expert_counts(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [num_experts]: how many entries of ``index`` (int, any shape, values in ``[0, E)``) name each expert.

    ``torch.bincount(index, minlength=E)`` with a static output shape (bincount's length depends on
    the values), so routing traces with fake tensors (the memory planner) and under compile.
    """
    flat = index.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.int64, device=index.device).index_add_(0, flat, torch.ones_like(flat))


def combine(y: torch.Tensor, token_sorted: torch.Tensor, weight_sorted: torch.Tensor, num_tokens: int,
            dtype: torch.dtype) -> torch.Tensor:
    """Sum expert outputs into their tokens.

    Args:
        y: [N, D] expert outputs, rows in sorted-slot order.
        token_sorted: int64 [N] token of each row.
        weight_sorted: [N] routing weight of each row.
        num_tokens: S.
        dtype: result dtype.

    Returns:
        [S, D] in ``dtype``: ``sum over rows of token s of weight * y`` (fp32 accumulation; zero
        for tokens without a row).
    """
    y = y.float() * weight_sorted.float()[:, None]
    out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
    return out.index_add(0, token_sorted, y).to(dtype)


def local_dispatch_combine(x: torch.Tensor, slot_token: torch.Tensor, slot_expert: torch.Tensor,
                           slot_weight: torch.Tensor, num_experts: int, expert_fn) -> torch.Tensor:
    """Route slots to experts that are all on this device, run them, and combine.

    Args:
        x: [S, D] tokens.
        slot_token, slot_expert: int64 [N] token and expert of each kept slot.
        slot_weight: [N] routing weights.
        num_experts: E.
        expert_fn: ``f(rows [N, D] sorted by expert, tokens_per_expert int64 [E]) -> [N, D]``.

    Returns:
        [S, D] in ``x.dtype``.
    """
    order = torch.argsort(slot_expert, stable=True)
    token_sorted = slot_token[order]
    counts = expert_counts(slot_expert, num_experts)
    y = expert_fn(x[token_sorted], counts)
    return combine(y, token_sorted, slot_weight[order], x.shape[0], x.dtype)
