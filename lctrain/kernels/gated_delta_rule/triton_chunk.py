"""Chunked gated delta rule on Triton: public function, autograd, ``torch.library`` custom ops.

Same math and contract as the torch path :func:`lctrain.kernels.gated_delta_rule.chunk_gated_delta_rule`
(Gated DeltaNet, Yang, Kautz, Hatamizadeh, arXiv:2412.06464, eq. 10; chunkwise WY form of Yang
et al., arXiv:2406.06484), computed by the kernels of ``triton_kernels.py`` with chunk size 64:

forward:  prep (gamma, X = (I + M)^-1, W, U per chunk) -> sequential state pass (states entering
          each chunk, pseudo-values nv, final state) -> output (O = inter + intra).
backward: recomputes prep and the state pass (nothing but the inputs is saved for backward), then
          dnv_local, the reverse sequential pass over dS, and three chunk-local kernels with tiles
          of at most [64, 64] (K and V looped in blocks of 64): value side (dv, dAqk), state side
          per K tile (dq, dk, dW), WY side (dk, dg, dbeta).

Ops (compile without graph breaks under ``torch.compile``; the fake kernels give the shapes):

- ``lctrain::chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state?, cu_seqlens?)
  -> (o [B,T,HV,V] v.dtype, final_state [N,HV,K,V] fp32)``
- ``lctrain::chunk_gated_delta_rule_bwd(do, dht?, q, k, v, g, beta, scale, initial_state?,
  cu_seqlens?) -> (dq, dk, dv, dg, dbeta, dh0)``

triton is imported only when an op runs (``import lctrain`` works without triton).
"""

from __future__ import annotations

import torch

from lctrain.kernels.dispatch import triton_runnable
from lctrain.kernels.gated_delta_rule.chunk import _validate
from lctrain.kernels.norm import l2norm
from lctrain.kernels.limits import GDN_TRITON_MAX_KEY_DIM, GDN_TRITON_MAX_VALUE_DIM
from lctrain.kernels.varlen import host_bounds, with_host_bounds

__all__ = ["chunk_gated_delta_rule_triton"]

BT = 64  # chunk size of the kernels (tl.dot needs >= 16; 64 keeps the WY inverse 4 x 16 blocks)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def _tables(B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device):
    """Chunk and sequence tables (int32, on ``device``) of the packed layout, and their sizes.

    Returns ``((seq_bos, seq_eos, seq_chunk0 [N], chunk_bos, chunk_eos [NT]), N, NT)``: token
    range and first global chunk of each sequence; first token and sequence end of each chunk.
    """
    if cu_seqlens is None:
        bounds = torch.arange(B + 1, dtype=torch.int64) * T
    else:
        bounds = torch.tensor(host_bounds(cu_seqlens), dtype=torch.int64)  # the host record: no device read
    bos, eos = bounds[:-1], bounds[1:]
    n_chunks = (eos - bos + BT - 1) // BT
    chunk0 = torch.cumsum(n_chunks, 0) - n_chunks
    NT = int(n_chunks.sum())
    seq = torch.repeat_interleave(torch.arange(bos.numel()), n_chunks)
    ch_bos = bos[seq] + (torch.arange(NT) - chunk0[seq]) * BT
    ch_eos = eos[seq]
    pad = torch.zeros(1, dtype=torch.int64)  # kernels never read it; avoids zero-size tensors
    tabs = tuple(
        (x if x.numel() else pad).to(device=device, dtype=torch.int32, non_blocking=True)
        for x in (bos, eos, chunk0, ch_bos, ch_eos)
    )
    return tabs, bos.numel(), NT


def _check_runnable(x: torch.Tensor) -> None:
    if not triton_runnable(x.device):
        raise RuntimeError(
            f"chunk_gated_delta_rule_triton needs triton and a CUDA tensor (got device {x.device}); "
            "on CPU set TRITON_INTERPRET=1 before importing triton, or use the torch path "
            "(lctrain.kernels.gated_delta_rule.chunk_gated_delta_rule)"
        )


def _sizes(q, v):
    _, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if K > GDN_TRITON_MAX_KEY_DIM or V > GDN_TRITON_MAX_VALUE_DIM:
        raise ValueError(f"Triton gated delta rule supports head dims K <= 256, got K={K} V={V}")
    BK = _pow2(K)
    BV = min(64, _pow2(V))
    return T, H, K, HV, V, BK, BV


def _launch(BK: int) -> dict:
    """Launch options: one pipeline stage (the big fp32 tiles would not fit several in shared
    memory) and 8 warps for K = 128+ head dims to keep the [64, K] fp32 tiles in registers."""
    return {"num_warps": 8 if BK >= 128 else 4, "num_stages": 1}


def _k_tile(K: int) -> int:
    """K tile of the chunk-local backward kernels (they loop over K in tiles of at most 64)."""
    return min(64, _pow2(K))


def _dh_v_block(BK: int, BV: int) -> int:
    """V block of ``_bwd_dh_kernel``: 32 past K = 128 (its [K, BV] fp32 state and the [64, K]
    operands stay in registers on sm90: 2.2 KB of spills per thread at [256, 64], 1.4 KB at 32)."""
    return min(BV, 32) if BK > 128 else BV


def _prep_launch(K: int) -> dict:
    """Launch options of ``_prep_kernel`` (tiles of at most [64, 64]; sm90 spill budget)."""
    return {"num_warps": 4, "num_stages": 1}


def _bwd_launch(name: str, K: int) -> dict:
    """Launch options of the chunk-local backward kernels (``wy_v``, ``dqk``, ``wy``), whose tiles
    are at most [64, 64] at every head dim: the choices that keep each under the sm90 spill budget
    (``tests/kernels/sm90_budgets.py`` compiles them with these)."""
    warps = {"wy_v": 4, "dqk": 8, "wy": 4 if K <= 64 else 8}[name]
    return {"num_warps": warps, "num_stages": 1}


def _wy_prec(dtype: torch.dtype) -> str:
    """Input precision of the fp32 dots of the WY inverse and its gradient: IEEE for fp32 inputs,
    3xTF32 (fp32-level accuracy on tensor cores, far fewer registers than FMA dots) otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32x3"


def _dot_config(dtype: torch.dtype) -> dict:
    """Constexprs of the kernels' dots: operand dtype DT and input precision PREC."""
    import triton.language as tl

    if dtype == torch.float32:
        return {"DT": tl.float32, "PREC": "ieee"}
    # fp16 inputs keep fp16 operands (also what the CPU interpreter can check; its bf16 dot is wrong)
    return {"DT": tl.float16 if dtype == torch.float16 else tl.bfloat16, "PREC": "tf32"}  # PREC: fp32 only


def _forward_states(q, k, v, g, beta, initial_state, tabs, N, NT, BK, BV, lowp):
    """prep + state pass; returns gamma, X, W, U, h (states entering chunks), nv, final state."""
    from lctrain.kernels.gated_delta_rule import triton_kernels as tk

    seq_bos, seq_eos, seq_c0, ch_bos, ch_eos = tabs
    TT, H, K = q.shape[1] * q.shape[0], q.shape[2], q.shape[3]
    HV, V = v.shape[2], v.shape[3]
    dev = q.device
    inter = torch.float32 if q.dtype == torch.float32 else q.dtype
    gamma = torch.empty(TT, HV, dtype=torch.float32, device=dev)
    x = torch.empty(TT, HV, BT, dtype=torch.float32, device=dev)
    w = torch.empty(TT, HV, K, dtype=inter, device=dev)
    u = torch.empty(TT, HV, V, dtype=inter, device=dev)
    if NT > 0:
        tk._prep_kernel[(NT, HV)](
            k, v, g, beta, gamma, x, w, u, ch_bos, ch_eos,
            H=H, HV=HV, K=K, V=V, BT=BT, BK=_k_tile(K), BV=BV, **lowp, WPREC=_wy_prec(k.dtype), **_prep_launch(K),
        )
    h = torch.empty(max(NT, 1), HV, K, V, dtype=inter, device=dev)
    vnew = torch.empty(TT, HV, V, dtype=inter, device=dev)
    ht = torch.empty(N, HV, K, V, dtype=torch.float32, device=dev)
    h0 = initial_state.contiguous() if initial_state is not None else ht
    tk._fwd_h_kernel[(N * HV, triton_cdiv(V, BV))](
        k, w, u, gamma, h0, h, vnew, ht, seq_bos, seq_eos, seq_c0,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=BV, HAS_H0=initial_state is not None, **lowp, **_launch(BK),
    )
    return gamma, x, w, u, h, vnew, ht


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _prepare(q, k, v, g, beta):
    return [t.contiguous() for t in (q, k, v, g, beta)]


def _fwd_impl(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    _check_runnable(q)
    from lctrain.kernels.gated_delta_rule import triton_kernels as tk

    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    B = q.shape[0]
    T, H, K, HV, V, BK, BV = _sizes(q, v)
    tabs, N, NT = _tables(B, T, cu_seqlens, q.device)
    lowp = _dot_config(q.dtype)
    gamma, _, _, _, h, vnew, ht = _forward_states(q, k, v, g, beta, initial_state, tabs, N, NT, BK, BV, lowp)
    o = torch.empty_like(v)
    if NT > 0:
        tk._fwd_o_kernel[(NT, triton_cdiv(V, BV), HV)](
            q, k, vnew, h, gamma, o, tabs[3], tabs[4], scale,
            H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=BV, **lowp, **_launch(BK),
        )
    return o, ht


def _bwd_impl(do, dht, q, k, v, g, beta, scale, initial_state, cu_seqlens):
    _check_runnable(q)
    from lctrain.kernels.gated_delta_rule import triton_kernels as tk

    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    do = do.contiguous()
    B = q.shape[0]
    T, H, K, HV, V, BK, BV = _sizes(q, v)
    tabs, N, NT = _tables(B, T, cu_seqlens, q.device)
    seq_bos, seq_eos, seq_c0, ch_bos, ch_eos = tabs
    lowp = _dot_config(q.dtype)
    dev = q.device
    TT = B * T
    gamma, x, w, _, h, vnew, _ = _forward_states(q, k, v, g, beta, initial_state, tabs, N, NT, BK, BV, lowp)
    dvl = torch.empty(TT, HV, V, dtype=torch.float32, device=dev)
    if NT > 0:
        tk._bwd_dv_local_kernel[(NT, triton_cdiv(V, BV), HV)](
            q, k, gamma, do, dvl, ch_bos, ch_eos, scale,
            H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=BV, **lowp, **_launch(BK),
        )
    dh = torch.empty_like(h)
    dnv = torch.empty_like(vnew)
    dh0 = torch.empty(N, HV, K, V, dtype=torch.float32, device=dev)
    BVH = _dh_v_block(BK, BV)
    tk._bwd_dh_kernel[(N * HV, triton_cdiv(V, BVH))](
        q, k, w, gamma, do, dvl, dht.contiguous() if dht is not None else dh0, dh, dnv, dh0,
        seq_bos, seq_eos, seq_c0, scale,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=BVH, HAS_DHT=dht is not None, **lowp, **_launch(BK),
    )
    dq = torch.empty(TT, HV, K, dtype=torch.float32, device=dev)
    dk = torch.empty(TT, HV, K, dtype=torch.float32, device=dev)
    dv = torch.empty(TT, HV, V, dtype=torch.float32, device=dev)
    dg = torch.empty(TT, HV, dtype=torch.float32, device=dev)
    dbeta = torch.empty(TT, HV, dtype=torch.float32, device=dev)
    if NT > 0:
        BKT = _k_tile(K)
        NK = triton_cdiv(K, BKT)
        dad = torch.empty(TT, HV, BT, dtype=torch.float32, device=dev)  # dAqk * D * scale
        dxv = torch.empty(TT, HV, BT, dtype=torch.float32, device=dev)  # dnv (beta V)^T
        dw = torch.empty(TT, HV, K, dtype=torch.float32, device=dev)
        dgp = torch.empty(NK + 1, TT, HV, dtype=torch.float32, device=dev)  # dgamma parts
        tk._bwd_wy_v_kernel[(NT, HV)](
            q, k, v, beta, gamma, x, vnew, dnv, do, dv, dad, dxv, dgp, dbeta, ch_bos, ch_eos, scale,
            H=H, HV=HV, K=K, V=V, BT=BT, BK=BKT, BV=BV, **lowp, **_bwd_launch("wy_v", K),
        )
        tk._bwd_dqk_kernel[(NK, NT, HV)](
            q, k, gamma, h, dh, vnew, dnv, do, dad, dq, dk, dw, dgp, ch_bos, ch_eos, scale, TT,
            H=H, HV=HV, K=K, V=V, BT=BT, BK=BKT, BV=BV, **lowp, **_bwd_launch("dqk", K),
        )
        tk._bwd_wy_kernel[(NT, HV)](
            k, beta, gamma, x, dxv, dw, dk, dgp, dg, dbeta, ch_bos, ch_eos, TT,
            H=H, HV=HV, K=K, BT=BT, BK=BKT, **lowp, WPREC=_wy_prec(q.dtype), **_bwd_launch("wy", K),
        )
    else:
        dq.zero_(), dk.zero_(), dv.zero_(), dg.zero_(), dbeta.zero_()
    G = HV // H
    dq = dq.view(B, T, H, G, K).sum(3)
    dk = dk.view(B, T, H, G, K).sum(3)
    return (
        dq.to(q.dtype),
        dk.to(k.dtype),
        dv.view(B, T, HV, V).to(v.dtype),
        dg.view(B, T, HV).to(g.dtype),
        dbeta.view(B, T, HV).to(beta.dtype),
        dh0,
    )


# ------------------------------------------------------------------ torch.library custom ops


@torch.library.custom_op("lctrain::chunk_gated_delta_rule_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, g, beta, scale, initial_state, cu_seqlens)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = torch.empty_like(v)
    ht = v.new_empty(N, v.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)
    return o, ht


@torch.library.custom_op("lctrain::chunk_gated_delta_rule_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor,
    dht: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(do, dht, q, k, v, g, beta, scale, initial_state, cu_seqlens)


@_bwd_op.register_fake
def _bwd_fake(do, dht, q, k, v, g, beta, scale, initial_state, cu_seqlens):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dh0 = v.new_empty(N, v.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)
    return (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
        torch.empty_like(g), torch.empty_like(beta), dh0,
    )


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, scale, initial_state, cu_seqlens = inputs
    ctx.scale = scale
    ctx.has_h0 = initial_state is not None
    ctx.has_cu = cu_seqlens is not None
    saved = [q, k, v, g, beta]
    if ctx.has_h0:
        saved.append(initial_state)
    if ctx.has_cu:
        saved.append(cu_seqlens)
    ctx.save_for_backward(*saved)


def _backward(ctx, do, dht):
    saved = list(ctx.saved_tensors)
    q, k, v, g, beta = saved[:5]
    rest = saved[5:]
    initial_state = rest.pop(0) if ctx.has_h0 else None
    cu_seqlens = rest.pop(0) if ctx.has_cu else None
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dbeta, dh0 = _bwd_op(do, dht, q, k, v, g, beta, ctx.scale, initial_state, cu_seqlens)
    dh0 = dh0.to(initial_state.dtype) if initial_state is not None else None
    return dq, dk, dv, dg, dbeta, None, dh0, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def chunk_gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, chunkwise (C = 64, WY representation) on Triton; differentiable.

    Recurrence per value head (Gated DeltaNet, arXiv:2412.06464, eq. 10), state ``S`` [K, V]:
    ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T (scale q_t)``.

    Args:
        q, k: [B, T, H, K] queries and keys (fp32 / bf16 / fp16; keys L2-normalised, or pass
            ``use_qk_l2norm_in_kernel=True``). K <= 256.
        v: [B, T, HV, V] values; ``HV`` (num_v_heads) a multiple of H: q/k head ``h`` serves value
            heads ``h*G .. h*G+G-1`` with ``G = HV // H``.
        g: [B, T, HV] log decay per token (``<= 0``).
        beta: [B, T, HV] write strength in [0, 1].
        scale: query scale; default ``K ** -0.5``.
        initial_state: [N, HV, K, V] state before each sequence (N = B, or len(cu_seqlens) - 1).
        output_final_state: also return the fp32 state after each sequence.
        cu_seqlens: integer [N + 1] boundaries of packed sequences (B == 1; empty sequences allowed).
        use_qk_l2norm_in_kernel: L2-normalise q and k over K first (fp32, eps 1e-6 inside the
            sqrt; a fused torch pre-op, gradients included).

    Returns:
        ``(o, final_state)``: o [B, T, HV, V] in v.dtype; final_state [N, HV, K, V] fp32 or None.

    Raises:
        ValueError: inconsistent shapes (as the torch path), HV not a multiple of H, K > 256.
        RuntimeError: triton missing, or a CPU tensor without TRITON_INTERPRET=1.

    Numerics: fp32 accumulation everywhere; bf16/fp16 inputs use bf16/fp16 tensor-core operands and
    store the per-chunk states/W/U/nv in the input dtype (as fla does); fp32 inputs run IEEE fp32
    dots. The within-chunk cumulative decay is fp32 (the torch path uses fp64).
    """
    _validate(q, k, v, g, beta, initial_state, cu_seqlens, 1)
    _check_runnable(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if cu_seqlens is not None:
        cu_seqlens = with_host_bounds(cu_seqlens, dtype=torch.int64)  # the host record comes along
    o, ht = _fwd_op(q, k, v, g, beta, float(scale), initial_state, cu_seqlens)
    return o, (ht if output_final_state else None)
