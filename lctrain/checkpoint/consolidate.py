"""DeepSpeed ZeRO checkpoints -> plain weights (export, upcycling, evaluation).

A checkpoint written with ``parallel.dp_impl=deepspeed`` keeps model and optimizer in DeepSpeed's
own partitioned files (``<step dir>/deepspeed/zero``, :mod:`lctrain.parallel.deepspeed`).
:func:`consolidate_checkpoint` merges them into one ``HybridLM.state_dict()`` in one process;
:func:`export_checkpoint` writes that to a file. The checkpoint reader
(:func:`lctrain.checkpoint.load_weights`) calls it for every DeepSpeed checkpoint it loads.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch

from lctrain.checkpoint.reader import checkpoint_model_config
from lctrain.data.tokenizer import atomic_write
from lctrain.models import HybridLM
from lctrain.parallel.deepspeed import DS_SUBDIR, DS_TAG, import_deepspeed

__all__ = ["consolidate_checkpoint", "export_checkpoint"]


def consolidate_checkpoint(path: str | os.PathLike, model_cfg=None) -> dict[str, torch.Tensor]:
    """Plain fp32 weights of a DeepSpeed lctrain checkpoint (any ZeRO stage, any number of ranks).

    DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` merges the per-rank fp32 partitions
    of ``path/deepspeed/zero``; the result is loaded (strictly) into a fresh
    ``HybridLM(model_cfg)`` on CPU, so the returned dict is exactly ``HybridLM(model_cfg).state_dict()``
    (tied weights and buffers included), the form :mod:`lctrain.upcycle` and
    ``torch.load_state_dict`` expect. Runs in one process, without a process group.

    Args:
        path: an lctrain checkpoint directory written with ``parallel.dp_impl=deepspeed``.
        model_cfg: the :class:`~lctrain.config.ModelConfig`; default: the one saved in the
            checkpoint's ``trainer_state.json``.

    Returns:
        ``{name: fp32 CPU tensor}`` with ``HybridLM.state_dict()`` keys.

    Raises:
        ValueError: ``path`` holds no DeepSpeed checkpoint.
        ConfigError: no ``model_cfg`` and none saved in the checkpoint (or one this lctrain cannot read).
        RuntimeError: the merged weights do not fit the model (missing / unexpected keys).
    """
    path = Path(path)
    ds_dir = path / DS_SUBDIR
    if not (ds_dir / DS_TAG).is_dir():
        raise ValueError(f"{path} holds no DeepSpeed checkpoint ({ds_dir / DS_TAG} is missing)")
    if model_cfg is None:
        model_cfg = checkpoint_model_config(path, "DeepSpeed checkpoint")
    import_deepspeed("cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # optional dependency

    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        merged = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DS_TAG)
    model = HybridLM(model_cfg)
    own = model.state_dict()
    names_of: dict[int, list[str]] = {}  # tied parameters: every name of one tensor
    for n, prm in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(prm), []).append(n)
    value: dict[str, torch.Tensor] = {}
    missing = []
    for names in names_of.values():
        have = [n for n in names if n in merged]
        if not have:
            missing += names
        for n in names:
            value[n] = merged[have[0]] if have else own[n]
    unexpected = sorted(set(merged) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"DeepSpeed checkpoint {path} does not fit the model: missing {sorted(missing)[:8]}, "
                           f"unexpected {unexpected[:8]}")
    # buffers DeepSpeed did not store keep the fresh model's (deterministic) values
    full = {k: (value[k] if k in value else merged.get(k, own[k])).detach().to(own[k].dtype) for k in own}
    model.load_state_dict(full, strict=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def export_checkpoint(path: str | os.PathLike, out_file: str | os.PathLike, model_cfg=None) -> Path:
    """Write :func:`consolidate_checkpoint`'s weights to ``out_file``: safetensors for ``.safetensors``, else ``torch.save``.

    Every ``HybridLM.state_dict()`` key is written (tied weights as separate copies), so
    ``HybridLM(cfg).load_state_dict(loaded, strict=True)`` takes the file as it is. Atomic
    (temporary file, then rename).

    Returns:
        ``out_file`` as a :class:`Path`.
    """
    state = {k: v.contiguous() for k, v in consolidate_checkpoint(path, model_cfg).items()}
    out = Path(out_file)
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write(out, lambda f: f.write(save(state)))
    else:
        atomic_write(out, lambda f: torch.save(state, f))
    return out
