"""fp32 reference of MoBA block-sparse attention (the tests' ground truth), input checks, and
the attended-fraction statistic.

MoBA (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs",
arXiv:2502.13189, Sec. 2.2-2.3): the keys of every document are cut into blocks of
``block_size`` tokens starting at the document's first token (a block never crosses a document
boundary; the last block of a document may be shorter). A query at position ``i`` of its
document lies in block ``b_i = i // block_size``. Its gate scores the *past* blocks ``j < b_i``
by ``s_j = <q_i, mean(K_j)>`` (fp32; blocks after ``b_i`` are never candidates, and the own block
is not scored); the own block is always selected and attended causally, and ``top_k`` counts
it, so the ``top_k - 1`` highest-scoring past blocks are added (all past blocks if there are
fewer). Ties are broken towards the lower block index. The output is ordinary softmax attention
``softmax(scale * q . k) v`` over the union of the selected keys.

As in the paper's reference implementation, the selection is a hard, non-differentiable top-k:
gradients reach q, k and v only through the attention itself, never through the mean-pooled
gate scores.

This module materialises the [T, T] mask per head (memory O(Hq T^2)); it is meant for tests and
small inputs. The selection is computed by explicit pairwise ranking, independently of the
sort-based selection of the fast paths.
"""

from __future__ import annotations

import itertools

import torch

from lctrain.kernels.varlen import cu_seqlens_bounds, num_sequences

__all__ = ["check_moba_inputs", "moba_attn_naive", "moba_block_mask", "moba_selected_fraction"]

PAPER = "Lu et al. 2025, MoBA: Mixture of Block Attention for Long-Context LLMs (arXiv:2502.13189)"


def check_moba_inputs(q, k, v, block_size, top_k, cu_seqlens=None) -> list[tuple[int, int]]:
    """Validate MoBA arguments and return the document spans ``[(start, end), ...]`` of one row.

    Args:
        q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with ``Hq % Hkv == 0``; floating point, one dtype.
        block_size: int >= 1. top_k: int >= 1.
        cu_seqlens: optional int [N + 1] boundaries of packed documents (needs B == 1).

    Returns:
        The ``(start, end)`` token spans of the documents of every batch row: ``[(0, T)]``
        without ``cu_seqlens``, else the consecutive ``cu_seqlens`` spans (empty ones kept);
        ``None`` while ``torch.compile`` traces with ``cu_seqlens`` (only its rank and B are
        checked then; the Triton op checks the values when it runs).

    Raises:
        ValueError: wrong ranks or shapes, ``Hq % Hkv != 0``, mixed or non-float dtypes,
            ``block_size < 1``, ``top_k < 1``, or ``cu_seqlens`` with B != 1, not 1-D integer,
            not starting at 0 / ending at T, or decreasing.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, T, H, D]; got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"need k.shape == v.shape and q, k sharing B, T and D; "
            f"got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"need Hq % Hkv == 0 (GQA); got Hq={q.shape[2]}, Hkv={k.shape[2]}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 (it counts the query's own block), got {top_k!r}")
    B, T = q.shape[:2]
    if cu_seqlens is None:
        return [(0, T)]
    if torch.compiler.is_compiling():
        # reading the boundaries would end the graph; the Triton op checks them eagerly
        if B != 1 or cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens must be [N + 1] with batch size 1, got B={B}")
        return None
    bounds = cu_seqlens_bounds(cu_seqlens, T, B)  # raises ValueError on bad cu_seqlens
    return list(itertools.pairwise(bounds))


def _doc_block_select(qd, kd, block_size, top_k):
    """Selected blocks for one document and all heads.

    qd [L, Hq, D], kd [L, Hkv, D] (fp32) -> bool [Hq, L, nb]: query i of head h uses block j.
    """
    L, Hq, _ = qd.shape
    Hkv = kd.shape[1]
    nb = -(-L // block_size)
    means = torch.stack(
        [kd[j * block_size : min((j + 1) * block_size, L)].mean(0) for j in range(nb)], 0
    )  # [nb, Hkv, D]
    means = means.repeat_interleave(Hq // Hkv, dim=1)  # [nb, Hq, D]
    scores = torch.einsum("ihd,jhd->hij", qd, means)  # [Hq, L, nb]
    own = torch.arange(L, device=qd.device) // block_size  # [L]
    blk = torch.arange(nb, device=qd.device)
    past = blk[None, :] < own[:, None]  # [L, nb]
    # rank of block j among the query's past blocks: how many past blocks beat it (higher score,
    # or equal score and lower index)
    sj = scores[..., :, None]  # candidate j
    sk = scores[..., None, :]  # competitor j'
    beats = (sk > sj) | ((sk == sj) & (blk[None, :] < blk[:, None]))  # [Hq, L, j, j']
    rank = (beats & past[None, :, None, :]).sum(-1)  # [Hq, L, nb]
    chosen = past[None] & (rank < top_k - 1)
    chosen = chosen | (blk[None, None, :] == own[None, :, None])
    return chosen


@torch.no_grad()
def moba_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    top_k: int,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean MoBA attention mask [B, Hq, T, T]: True where query ``i`` attends key ``j``.

    The own block is attended causally (``j <= i``), the ``top_k - 1`` best past blocks of the
    document fully; nothing crosses a document boundary. See the module docstring and
    Lu et al. 2025 (MoBA), Sec. 2.2.

    Args:
        q: [B, T, Hq, D]; k: [B, T, Hkv, D] (``Hq % Hkv == 0``); any float dtype (scored in fp32).
        block_size: tokens per key block (>= 1). top_k: blocks per query including its own (>= 1).
        cu_seqlens: optional int32 [N + 1] document boundaries of the packed row (B == 1).

    Returns:
        bool tensor [B, Hq, T, T] on q's device.

    Raises:
        ValueError: as :func:`check_moba_inputs`.
    """
    spans = check_moba_inputs(q, k, k, block_size, top_k, cu_seqlens)
    B, T, Hq, _ = q.shape
    mask = torch.zeros(B, Hq, T, T, dtype=torch.bool, device=q.device)
    for b in range(B):
        for s, e in spans:
            if e == s:
                continue
            L = e - s
            chosen = _doc_block_select(q[b, s:e].float(), k[b, s:e].float(), block_size, top_k)
            key_blk = torch.arange(L, device=q.device) // block_size
            causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
            mask[b, :, s:e, s:e] = chosen[:, :, key_blk] & causal
    return mask


def moba_attn_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    top_k: int,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 MoBA reference: ``(out, lse)`` from the explicit [T, T] mask.

    Args:
        q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with ``Hq % Hkv == 0`` (query head ``h`` reads
            key/value head ``h // (Hq // Hkv)``).
        block_size, top_k, cu_seqlens: see :func:`moba_block_mask`.
        scale: logit scale, default ``D ** -0.5``.

    Returns:
        ``out`` fp32 [B, T, Hq, D] (fp64 if given fp64) and ``lse`` fp32 natural-log
        [B, Hq, T]. Differentiable with respect to q, k, v through the attention only (the
        block selection is a constant mask).

    Raises:
        ValueError: as :func:`check_moba_inputs`.

    Reference: Lu et al. 2025, MoBA (arXiv:2502.13189).
    """
    check_moba_inputs(q, k, v, block_size, top_k, cu_seqlens)
    mask = moba_block_mask(q, k, block_size, top_k, cu_seqlens)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    Hq, Hkv = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kr = k.repeat_interleave(Hq // Hkv, dim=2)
    vr = v.repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kr) * scale
    s = s.masked_fill(~mask, float("-inf"))  # every row keeps at least its diagonal
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bhij,bjhd->bihd", p, vr)
    return out, lse


def moba_selected_fraction(
    seqlen: int,
    block_size: int,
    top_k: int,
    cu_seqlens: torch.Tensor | None = None,
    unit: str = "blocks",
) -> float:
    """Fraction of the causal attention that MoBA computes (for logging sparsity).

    The count does not depend on the data: a query in block ``b_i`` of its document attends
    ``min(top_k, b_i + 1)`` of its ``b_i + 1`` causal key blocks, i.e.
    ``min(top_k - 1, b_i) * block_size + (i - b_i * block_size + 1)`` of its ``i + 1`` causal keys
    (past blocks are always full).

    Args:
        seqlen: T, tokens per row.
        block_size, top_k: as for :func:`moba_attn_naive`.
        cu_seqlens: optional int [N + 1] document boundaries (else one document of T tokens).
        unit: ``"blocks"``: attended / causal (query, key block) pairs; ``"keys"``: attended /
            causal (query, key) pairs, the FLOP ratio vs causal dense attention.

    Returns:
        A float in (0, 1] (1.0 for an empty input).

    Raises:
        ValueError: ``block_size`` or ``top_k`` < 1, unknown ``unit``, bad ``cu_seqlens``.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if unit not in ("blocks", "keys"):
        raise ValueError(f"unit must be 'blocks' or 'keys', got {unit!r}")
    num_sequences(cu_seqlens, 1, seqlen)
    lengths = [seqlen] if cu_seqlens is None else torch.diff(cu_seqlens.detach().cpu().long()).tolist()
    got = total = 0
    for L in lengths:
        i = torch.arange(L, dtype=torch.float64)
        b = torch.div(i, block_size, rounding_mode="floor")
        if unit == "blocks":
            got += torch.minimum(b + 1, torch.tensor(float(top_k))).sum().item()
            total += (b + 1).sum().item()
        else:
            past = torch.minimum(b, torch.tensor(top_k - 1.0)) * block_size  # full past blocks
            got += (past + (i - b * block_size + 1)).sum().item()
            total += (i + 1).sum().item()
    return got / total if total else 1.0
