"""fp32 (or fp64) reference of the linear cross entropy: full logits, then ``F.cross_entropy``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_naive(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """``sum_i CE(hidden_i W^T, labels_i)`` over the labelled rows, computed in fp32 with the whole
    ``[N, V]`` logit matrix (fp64 for fp64 inputs). hidden [N, D], weight [V, D], labels int [N];
    returns a scalar in that dtype."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(acc) @ weight.to(acc).t()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
