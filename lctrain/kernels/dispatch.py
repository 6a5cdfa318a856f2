"""Kernel choice shared by every op and mixer: ``model.kernels = auto | torch | triton``.

One place answers "is Triton there" (:func:`triton_installed`), "can it run on this device"
(:func:`triton_runnable`) and "does this choice take the Triton path for this tensor"
(:func:`use_triton`); the choice travels down as the same string everywhere.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

KERNEL_CHOICES = ("auto", "torch", "triton")


@functools.cache
def triton_installed() -> bool:
    """Whether the triton package can be found (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runnable(device: torch.device | str | None = None) -> bool:
    """True if triton is installed and can run on ``device``: CUDA, or any device under the interpreter."""
    if not triton_installed():
        return False
    if triton_interpreting():
        return True
    dev = torch.device(device) if device is not None else None
    return (dev is None or dev.type == "cuda") and torch.cuda.is_available()


def check_kernels(kernels: str, what: str) -> str:
    """Validate a ``kernels`` choice for the op or layer named ``what``; return it.

    Raises:
        ValueError: ``kernels`` not one of :data:`KERNEL_CHOICES`.
        ImportError: ``kernels='triton'`` without the triton package.
    """
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r} for {what}; allowed values are {', '.join(KERNEL_CHOICES)}")
    if kernels == "triton" and not triton_installed():
        raise ImportError(
            f"kernels='triton' for {what} needs the triton package (pip install triton); "
            f"use kernels='auto' or 'torch' (the PyTorch path runs on CPU and CUDA)"
        )
    return kernels


# What ``kernels="auto"`` picks on CUDA, per op: True = the Triton kernel, False = the torch path.
# Softmax attention takes the Triton FlashAttention-2 kernels: the training batches are packed
# documents, and the torch path has no fused kernel that takes ``cu_seqlens`` and returns the
# log-sum-exp (it loops over documents, and ring blocks would fall back to the dense [Tq, Tk]
# reference). The linear-attention and MoBA ops use Triton, since their torch paths are CPU
# reference paths (python loops over chunks). No GPU run has measured these yet
# (benchmarks/gpu_check.py is ready for one): revisit each entry with its numbers.
AUTO_TRITON_ON_CUDA: dict[str, bool] = {
    "softmax_attention": True,
    "gated_delta_rule": True,
    "lightning_attn": True,
    "moba": True,
}


def use_triton(kernels: str, x: torch.Tensor, op: str = "") -> bool:
    """Whether ``kernels`` picks the Triton path of ``op`` for tensors like ``x``.

    Always for ``"triton"`` (on CPU that needs ``TRITON_INTERPRET=1``); never for ``"torch"``;
    for ``"auto"`` when ``x`` is on CUDA, triton is installed and :data:`AUTO_TRITON_ON_CUDA`
    says Triton for ``op`` (unknown ops: Triton).
    """
    if kernels == "triton":
        return True
    return kernels == "auto" and x.is_cuda and triton_installed() and AUTO_TRITON_ON_CUDA.get(op, True)
