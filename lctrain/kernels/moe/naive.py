"""fp32 per-expert reference of the routed MoE FFN (what the grouped and expert-parallel paths must equal).

Independent of any sorting or grouping: each expert gathers the tokens that selected it with a
boolean mask, runs its SwiGLU (Shazeer 2020) and the outputs are summed with the routing weights,
``y_s = sum_j w_{s,j} * expert_{e_{s,j}}(x_s)`` (Shazeer et al. 2017, eq. 1, with top-k gates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_ffn_reference(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of the selected experts' SwiGLU outputs, one expert at a time, in fp32.

    Args:
        x: [S, D] tokens (any float dtype; computed in fp32).
        topk_idx: int64 [S, K] selected expert of each slot (values in ``[0, E)``).
        topk_weight: [S, K] routing weight of each slot (0 for a dropped slot).
        gate_up_proj: [E, D, 2F]; columns ``[:F]`` are the gate, ``[F:]`` the up projection.
        down_proj: [E, F, D].

    Returns:
        [S, D] fp32. Differentiable with respect to every float input.

    Raises:
        ValueError: shapes that do not agree.
    """
    S, D = x.shape
    E, D2, F2 = gate_up_proj.shape
    if topk_idx.shape != topk_weight.shape or topk_idx.shape[0] != S or D2 != D or down_proj.shape != (E, F2 // 2, D):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, topk_idx {tuple(topk_idx.shape)}, topk_weight "
            f"{tuple(topk_weight.shape)}, gate_up_proj {tuple(gate_up_proj.shape)}, down_proj {tuple(down_proj.shape)}"
        )
    Fh = F2 // 2
    out = torch.zeros(S, D, dtype=torch.float32, device=x.device)
    for e in range(E):
        mask = topk_idx == e  # [S, K]
        rows = mask.any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        w = (topk_weight.float() * mask).sum(dim=1)[rows]
        h = x[rows].float() @ gate_up_proj[e].float()
        y = (F.silu(h[:, :Fh]) * h[:, Fh:]) @ down_proj[e].float()
        out = out.index_add(0, rows, y * w[:, None])
    return out
