"""``model.kernels=fla``: Gated DeltaNet and Lightning Attention through fla-core's chunk kernels.

fla (flash-linear-attention; since 0.3.2 its ops ship as the ``fla-core`` wheel, which needs
``einops``) is the kernel library that Qwen3-Next, Megatron-Core's Gated DeltaNet and flame run.
This module maps lctrain's kernel contract onto it, so the ops, the layers and context-parallel
state passing call fla exactly as they call lctrain's own kernels:

* :func:`fla_chunk_gated_delta_rule` has the signature of
  :func:`lctrain.kernels.gated_delta_rule.chunk_gated_delta_rule` and calls
  ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``.
* :func:`fla_chunk_lightning_attn` has the signature of
  :func:`lctrain.kernels.lightning_attn.chunk_lightning_attn` and calls
  ``fla.ops.simple_gla.chunk_simple_gla`` with the fixed per-head log decay ``g_gamma = -slope``
  (Lightning is simple GLA with data-independent decays: ``S_t = exp(-slope) S_{t-1} + k_t v_t^T``).

Layouts (checked for the pinned fla-core, :data:`FLA_PIN`): q, k ``[B, T, H, K]``; v
``[B, T, HV, V]``; g, beta ``[B, T, HV]``; value head ``j`` reads query/key head ``j // (HV / H)``
(fla's grouped value heads, lctrain's too); states ``[N, HV, K, V]``, fla's default
``state_v_first=False``, which is passed explicitly so that a release changing the default cannot
transpose lctrain's states silently (a transposed state would corrupt context-parallel state
passing); the returned final state's shape is checked. ``cu_seqlens`` goes to fla as int64 with
its host copy (``cu_seqlens_cpu``, from the collator's record: no device read).

fla's kernels run on GPUs only: under Triton's CPU interpreter (``TRITON_INTERPRET=1``) they fail
(their ``for i_t in range(NT)`` counters are Python ints there, ``i_t.to`` raises), and their
autotuners need a GPU driver. On CPU the tests check this mapping against fla's own PyTorch
reference functions (``fla.ops.*.naive``) through :func:`set_fla_kernels`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from lctrain.kernels.varlen import cu_seqlens_bounds, num_sequences

FLA_PIN = "fla-core==0.6.0"
FLA_INSTALL = f'pip install -e ".[fla]" (pins {FLA_PIN} and einops)'

__all__ = [
    "FLA_INSTALL",
    "FLA_PIN",
    "fla_chunk_gated_delta_rule",
    "fla_chunk_lightning_attn",
    "fla_import_error",
    "fla_kernels",
    "require_fla",
    "set_fla_kernels",
]

# (chunk_gated_delta_rule, chunk_simple_gla) replacing fla's, for the CPU tests (set_fla_kernels)
_OVERRIDE: tuple[Callable, Callable] | None = None


@functools.cache
def fla_import_error() -> str | None:
    """None if fla-core's two chunk kernels import, else the import error as one line."""
    try:
        with warnings.catch_warnings():  # on a machine without a GPU fla warns that it falls back to CPU
            warnings.simplefilter("ignore")
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
            from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def require_fla() -> None:
    """Raise ImportError naming the ``fla`` extra unless fla-core imports (or is replaced by
    :func:`set_fla_kernels`)."""
    err = fla_import_error() if _OVERRIDE is None else None
    if err is not None:
        raise ImportError(f"fla-core does not import ({err}); install it with {FLA_INSTALL}")


def set_fla_kernels(gdn: Callable | None, simple_gla: Callable | None = None) -> None:
    """Replace fla's two chunk kernels by functions with the same signatures (None: fla's again).

    Used by the CPU tests, which pass wrappers of fla's reference functions, since fla's Triton
    kernels do not run on CPU.
    """
    global _OVERRIDE
    _OVERRIDE = None if gdn is None else (gdn, simple_gla)


def fla_kernels() -> tuple[Callable, Callable]:
    """``(chunk_gated_delta_rule, chunk_simple_gla)`` of fla-core (or the :func:`set_fla_kernels` pair).

    Raises:
        ImportError: fla-core missing or broken (the message names the extra).
    """
    if _OVERRIDE is not None:
        return _OVERRIDE
    require_fla()
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_gated_delta_rule, chunk_simple_gla


def _varlen_args(cu_seqlens: torch.Tensor | None, B: int, T: int) -> dict:
    """fla's ``cu_seqlens`` (int64, on the device) and ``cu_seqlens_cpu`` from lctrain's int32 boundaries."""
    if cu_seqlens is None:
        return {}
    bounds = cu_seqlens_bounds(cu_seqlens, T, B)  # the host record: no device read
    return {"cu_seqlens": cu_seqlens.to(torch.long), "cu_seqlens_cpu": torch.tensor(bounds, dtype=torch.long)}


def _final(state: torch.Tensor | None, want: bool, shape: tuple[int, ...]) -> torch.Tensor | None:
    if not want:
        return None
    if state is None or tuple(state.shape) != shape:
        got = None if state is None else tuple(state.shape)
        raise RuntimeError(f"fla returned a final state of shape {got}, expected {shape} ([N, HV, K, V])")
    return state.float()


def fla_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule through fla's ``chunk_gated_delta_rule``, in lctrain's contract.

    Args:
        q, k: [B, T, H, K] (bf16 / fp16 on GPU; keys L2-normalised).
        v: [B, T, HV, V], HV a multiple of H (value head ``j`` reads q/k head ``j // (HV / H)``).
        g: [B, T, HV] log decay (fp32 or v's dtype); beta: [B, T, HV].
        scale: query scale, default ``K ** -0.5``.
        initial_state: [N, HV, K, V] (any float dtype; passed as fp32).
        output_final_state: also return the final states.
        cu_seqlens: int32/int64 [N + 1] boundaries (B == 1), with or without a host record.
        chunk_size: lctrain's chunk size; fla takes 16, 32 or 64 (others: 64; the result does
            not depend on it).

    Returns:
        ``(o [B, T, HV, V] in v's dtype, final_state fp32 [N, HV, K, V] or None)``.
    """
    gdn, _ = fla_kernels()
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = num_sequences(cu_seqlens, B, T)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = gdn(
        q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=output_final_state,
        state_v_first=False, chunk_size=chunk_size if chunk_size in (16, 32, 64) else 64,
        **_varlen_args(cu_seqlens, B, T),
    )
    return o.to(v.dtype), _final(ht, output_final_state, (N, HV, K, V))


def fla_chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning Attention through fla's ``chunk_simple_gla`` with ``g_gamma = -slope``.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V].
        slope: [H] decay rate per head (>= 0); a fixed buffer (fla returns no gradient for
            ``g_gamma``).
        scale, initial_state ([N, H, K, V]), output_final_state, cu_seqlens: as in
            :func:`fla_chunk_gated_delta_rule`.
        chunk_size: ignored (fla picks its own; the result does not depend on it).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state fp32 [N, H, K, V] or None)``.
    """
    _, simple_gla = fla_kernels()
    B, T, H, K = q.shape
    V = v.shape[3]
    N = num_sequences(cu_seqlens, B, T)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = simple_gla(
        q, k, v, g=None, g_gamma=-slope.detach().float(), scale=scale, initial_state=h0,
        output_final_state=output_final_state, state_v_first=False, **_varlen_args(cu_seqlens, B, T),
    )
    return o.to(v.dtype), _final(ht, output_final_state, (N, H, K, V))
