"""SwiGLU feed-forward block (Shazeer, "GLU Variants Improve Transformer", 2020, eq. 6 / FFN_SwiGLU).

ffn(x) = (silu(x W_gate) * (x W_up)) W_down
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def default_ffn_hidden_size(d_model: int, ffn_hidden_size: int = 0, multiple_of: int = 64) -> int:
    """Hidden width of the SwiGLU FFN.

    ``ffn_hidden_size > 0`` is returned as is; ``0`` means ``8/3 * d_model`` (the width that
    gives SwiGLU's three matrices the parameters of a 4x GELU MLP) rounded up to a multiple of
    ``multiple_of``.

    Raises:
        ValueError: negative ``ffn_hidden_size`` or non-positive ``d_model``.
    """
    if d_model < 1 or ffn_hidden_size < 0:
        raise ValueError(
            f"need d_model >= 1 and ffn_hidden_size >= 0 (0 = 8/3 d_model), got {d_model}, {ffn_hidden_size}"
        )
    if ffn_hidden_size:
        return ffn_hidden_size
    return multiple_of * math.ceil(8 * d_model / 3 / multiple_of)


class SwiGLU(nn.Module):
    """SwiGLU FFN without biases.

    Args:
        d_model: D.
        hidden_size: F, the inner width (see :func:`default_ffn_hidden_size`).

    Parameters: ``gate_proj``/``up_proj [F, D]``, ``down_proj [D, F]`` (residual output projection).

    ``forward(x [..., D]) -> [..., D]``.
    """

    def __init__(self, d_model: int, hidden_size: int):
        super().__init__()
        if d_model < 1 or hidden_size < 1:
            raise ValueError(f"SwiGLU needs d_model >= 1 and hidden_size >= 1, got {d_model}, {hidden_size}")
        self.d_model, self.hidden_size = d_model, hidden_size
        self.gate_proj = nn.Linear(d_model, hidden_size, bias=False)
        self.up_proj = nn.Linear(d_model, hidden_size, bias=False)
        self.down_proj = nn.Linear(hidden_size, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
