"""Kernel choice shared by every op and mixer: ``model.kernels = auto | torch | triton | fla``.

One place answers "is Triton there" (:func:`triton_installed`), "can it run on this device"
(:func:`triton_runnable`), "which implementation does this choice take for this tensor"
(:func:`pick_kernel`, :func:`use_triton`); the choice travels down as the same string everywhere.
``fla`` runs Gated DeltaNet and Lightning through the optional fla-core package
(:mod:`lctrain.kernels.fla_backend`); every other op treats it as ``auto``.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

KERNEL_CHOICES = ("auto", "torch", "triton", "fla")

# the ops fla-core implements (model.kernels=fla, or auto on CUDA where the table below names fla)
FLA_OPS = frozenset({"gated_delta_rule", "lightning_attn"})


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
        ImportError: ``kernels='triton'`` without the triton package; ``kernels='fla'`` without
            the fla-core package (the message names the ``fla`` extra).
    """
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r} for {what}; allowed values are {', '.join(KERNEL_CHOICES)}")
    if kernels == "triton" and not triton_installed():
        raise ImportError(
            f"kernels='triton' for {what} needs the triton package (pip install triton); "
            f"use kernels='auto' or 'torch' (the PyTorch path runs on CPU and CUDA)"
        )
    if kernels == "fla" and not fla_installed():
        from lctrain.kernels.fla_backend import FLA_INSTALL

        raise ImportError(f"kernels='fla' for {what} needs the fla-core package: {FLA_INSTALL}")
    return kernels


@functools.cache
def fla_installed() -> bool:
    """Whether the fla package (fla-core) can be found (it is not imported here)."""
    return importlib.util.find_spec("fla") is not None


def fla_usable(dtype: torch.dtype | None) -> bool:
    """Whether ``auto`` may take fla's kernels for tensors of ``dtype``: fla-core imports, Triton
    compiles for a GPU (fla's kernels do not run under ``TRITON_INTERPRET=1``: their loop
    counters are plain ints there), and the dtype is bf16 / fp16 (fp32 runs stay on lctrain's
    kernels: fla's dots take TF32 inputs in fp32)."""
    if dtype not in (torch.bfloat16, torch.float16) or triton_interpreting() or not fla_installed():
        return False
    from lctrain.kernels.fla_backend import fla_import_error

    return fla_import_error() is None


# What ``kernels="auto"`` picks on CUDA, per op: True = the Triton kernel, False = the torch path;
# for the ops in AUTO_FLA_ON_CUDA, fla's kernel instead where :func:`fla_usable`.
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

# Ops whose ``auto`` on CUDA takes fla's chunk kernels where fla-core is installed (bf16/fp16): the
# kernels Qwen3-Next, Megatron-Core and flame run. No GPU run has compared them with lctrain's
# own Triton kernels yet (benchmarks/gpu_check.py times both): set from its numbers.
AUTO_FLA_ON_CUDA: dict[str, bool] = {
    "gated_delta_rule": True,
    "lightning_attn": True,
}


def pick_kernel(kernels: str, x: torch.Tensor, op: str = "") -> str:
    """The implementation ``kernels`` takes for ``op`` on tensors like ``x``: ``triton`` | ``torch`` | ``fla``.

    ``triton`` and ``torch`` are taken as given; ``fla`` for the ops in :data:`FLA_OPS` (other ops
    treat it as ``auto``); ``auto``: torch unless ``x`` is on CUDA with triton installed, then the
    :data:`AUTO_TRITON_ON_CUDA` entry, or fla for an op of :data:`AUTO_FLA_ON_CUDA` where
    :func:`fla_usable` for ``x.dtype``.
    """
    if kernels == "fla":
        if op in FLA_OPS:
            return "fla"
        kernels = "auto"
    if kernels in ("triton", "torch"):
        return kernels
    if not (x.is_cuda and triton_installed()):
        return "torch"
    if AUTO_FLA_ON_CUDA.get(op, False) and fla_usable(getattr(x, "dtype", None)):
        return "fla"
    return "triton" if AUTO_TRITON_ON_CUDA.get(op, True) else "torch"


def use_triton(kernels: str, x: torch.Tensor, op: str = "") -> bool:
    """Whether ``kernels`` picks lctrain's Triton path of ``op`` for tensors like ``x``.

    Always for ``"triton"`` (on CPU that needs ``TRITON_INTERPRET=1``); never for ``"torch"``;
    for ``"auto"`` (and ``"fla"`` on an op fla does not implement) when :func:`pick_kernel` says
    ``triton`` (CUDA tensor, triton installed, :data:`AUTO_TRITON_ON_CUDA`; unknown ops: Triton).
    """
    return pick_kernel(kernels, x, op) == "triton"
