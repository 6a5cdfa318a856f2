"""Kernel choice shared by the token mixers: ``model.kernels = auto | torch | triton``."""

from __future__ import annotations

import importlib.util

import torch

KERNEL_CHOICES = ("auto", "torch", "triton")


def triton_installed() -> bool:
    """Whether the triton package can be found (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def check_kernels(kernels: str, what: str) -> str:
    """Validate a ``kernels`` choice for the layer named ``what``; return it.

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


def use_triton(kernels: str, x: torch.Tensor) -> bool:
    """Whether ``kernels`` picks the Triton path for tensors like ``x``: always for ``"triton"``
    (on CPU that needs ``TRITON_INTERPRET=1``), for ``"auto"`` when ``x`` is on CUDA and triton is
    installed, never for ``"torch"``."""
    return kernels == "triton" or (kernels == "auto" and x.is_cuda and triton_installed())
