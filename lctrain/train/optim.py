"""AdamW with decoupled weight decay applied only to weight matrices.

Source: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019). Excluding
gains, biases and the Mamba-style decay parameters (``A_log``, ``dt_bias``) from weight decay
follows common practice (GPT-2/nanoGPT, Mamba, Gated DeltaNet reference code): shrinking them
towards zero changes what the layer computes rather than regularising it.
"""

from __future__ import annotations

import torch
from torch import nn

from lctrain.config import OptimConfig

# Parameter names (last component of the dotted name) that are never decayed: the log decay
# rate and time-step bias of Mamba / Gated DeltaNet gates.
NO_DECAY_NAMES = frozenset({"A_log", "dt_bias"})

FUSED_CHOICES = ("auto", "true", "false")


def is_decayed(name: str, param: nn.Parameter) -> bool:
    """Whether ``param`` (called ``name`` in ``model.named_parameters()``) gets weight decay.

    The rule, applied in order:

    1. ``param._no_weight_decay is True`` (an attribute a layer may set) -> no decay;
    2. the last component of ``name`` is ``A_log`` or ``dt_bias`` -> no decay;
    3. ``param.ndim >= 2`` (linear / conv / embedding weights, embeddings included) -> decay;
    4. everything else (``ndim <= 1``: norm gains, biases, scalars) -> no decay.

    Args:
        name: dotted parameter name, e.g. ``layers.0.attn.q_proj.weight``.
        param: the parameter (a plain tensor or a DTensor; only ``ndim`` and attributes are read).

    Returns:
        True when the parameter belongs in the weight-decay group.
    """
    if getattr(param, "_no_weight_decay", False):
        return False
    if name.rsplit(".", 1)[-1] in NO_DECAY_NAMES:
        return False
    return param.ndim >= 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of ``model`` into a decay and a no-decay group.

    Every parameter with ``requires_grad=True`` appears exactly once (``named_parameters``
    de-duplicates tied weights such as a shared embedding / output matrix). Frozen parameters
    are left out. Empty groups are omitted, decay group first.

    Args:
        model: any module (plain, DDP-wrapped or FSDP2-sharded).
        weight_decay: decoupled weight-decay coefficient for the decay group.

    Returns:
        A list of ``{"params": [...], "weight_decay": float}`` dicts for ``torch.optim``.

    Raises:
        ValueError: the model has no trainable parameters.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if is_decayed(name, p) else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError(
            "model has no trainable parameters (all have requires_grad=False); nothing to optimise"
        )
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters with two weight-decay groups.

    Groups follow :func:`is_decayed`: weight decay ``cfg.weight_decay`` on parameters with
    ``ndim >= 2`` (embeddings included), none on 1-D parameters (norm weights, biases), on
    parameters named ``A_log`` / ``dt_bias`` and on parameters flagged
    ``param._no_weight_decay = True``.

    Implementation: the fused kernel (``fused=True``) when ``cfg.fused == "true"`` or when
    ``cfg.fused == "auto"`` and ``device_type == "cuda"``; otherwise the multi-tensor
    ``foreach`` implementation.

    Args:
        model: the module whose parameters are optimised (wrap with DDP/FSDP2 before or after:
            both expose the same parameter objects).
        cfg: ``lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay`` and ``fused``
            (``auto | true | false``) are read. The learning rate is the peak value; the
            scheduler (:mod:`lctrain.train.schedule`) multiplies it.
        device_type: ``"cuda"``, ``"cpu"``, ... (``torch.device.type`` of the parameters).

    Returns:
        ``torch.optim.AdamW``.

    Raises:
        ValueError: ``cfg.fused`` is not one of ``auto``, ``true``, ``false``; a hyper-parameter is
            out of range; or the model has no trainable parameters.
    """
    if cfg.fused not in FUSED_CHOICES:
        allowed = ", ".join(FUSED_CHOICES)
        raise ValueError(f"optim.fused={cfg.fused!r} is invalid; allowed values are {allowed}")
    if cfg.lr <= 0:
        raise ValueError(f"optim.lr={cfg.lr} must be > 0")
    if cfg.weight_decay < 0:
        raise ValueError(f"optim.weight_decay={cfg.weight_decay} must be >= 0")
    for key, beta in (("beta1", cfg.beta1), ("beta2", cfg.beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"optim.{key}={beta} must be in [0, 1)")
    if cfg.eps <= 0:
        raise ValueError(f"optim.eps={cfg.eps} must be > 0")
    fused = cfg.fused == "true" or (cfg.fused == "auto" and device_type == "cuda")
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **kwargs,
    )
