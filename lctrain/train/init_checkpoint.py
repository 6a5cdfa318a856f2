"""A step-0 checkpoint from given weights: how upcycling and ``launch/import_hf.py`` start a run.

The weights (an upcycled model, a branch of it, or a model imported from transformers) are
written as an ordinary lctrain checkpoint ``<out_dir>/checkpoints/step_00000000`` by a real
:class:`~lctrain.train.trainer.Trainer` of the run's config: the weights given, a fresh AdamW
state, the scheduler and data sampler at step 0. ``Trainer(cfg).fit()`` with
``train.resume=auto`` (or ``train.resume=<that directory>``) then loads it like any checkpoint, at
any data- or expert-parallel size (DCP reshards), and a later interruption resumes from the newest
checkpoint as usual.

A fresh optimizer must be stored explicitly: DCP's ``get_state_dict`` materialises the lazy AdamW
state of an optimizer that has none by taking one zero-gradient step (``step = 1``), which would
change the first real updates' bias correction. :func:`write_init_checkpoint` materialises the state
itself and resets ``step`` to 0 with zero moments, which AdamW treats exactly as a new state.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch

from lctrain.errors import ConfigError
from lctrain.parallel.data_parallel import unwrap
from lctrain.train.trainer import Trainer

__all__ = ["write_init_checkpoint"]


@torch.no_grad()
def _fresh_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Materialise the per-parameter state of an optimizer that never stepped, as a fresh one holds it.

    One step with zero gradients and ``lr = 0`` (parameters unchanged: the decoupled decay factor is
    ``1 - 0 * wd`` and the update ``0 * m / (sqrt(v) + eps)``), then every ``step`` counter and
    moment is reset to 0: AdamW's first real step then sees what a new optimizer would.
    """
    lrs = []
    for group in optimizer.param_groups:
        lrs.append(group["lr"])
        group["lr"] = torch.zeros_like(group["lr"]) if torch.is_tensor(group["lr"]) else 0.0
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0


def write_init_checkpoint(cfg, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write ``state_dict`` as the step-0 checkpoint of the run ``cfg`` (``<out_dir>/checkpoints/step_00000000``).

    Collective under torchrun (every rank calls it with the same arguments). A
    :class:`~lctrain.train.trainer.Trainer` of ``cfg`` is built with ``parallel.ep_degree=1`` and
    ``parallel.dp_impl=ddp`` (every rank holds whole parameters; the checkpoint format does not
    depend on either) and ``train.resume=none``; the weights are loaded into it, a fresh optimizer
    state is stored (see the module docstring) and :meth:`Trainer.save` writes the checkpoint with
    the scheduler, sampler and train state of step 0.

    Args:
        cfg: the :class:`~lctrain.config.RunConfig` that will train from the checkpoint.
        state_dict: ``HybridLM(cfg.model).state_dict()``-shaped weights (CPU or any device).

    Returns:
        The checkpoint directory.

    Raises:
        ConfigError: ``state_dict`` does not match the model of ``cfg`` (missing / unexpected
            keys or shapes, named).
    """
    init = copy.deepcopy(cfg)
    init.parallel.ep_degree = 1
    init.parallel.dp_impl = "ddp"
    init.train.resume = "none"
    trainer = Trainer(init)
    model = unwrap(trainer.model)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    bad = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or bad:
        raise ConfigError(
            f"the weights for {cfg.train.out_dir} do not fit its model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, other shapes {bad[:5]}"
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].device) for k, v in state_dict.items()}, strict=True)
    _fresh_optimizer_state(trainer.optimizer)
    path = trainer.save()
    trainer.close()  # the run lock: the training job that follows takes it
    return path
