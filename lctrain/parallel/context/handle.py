"""The :class:`ContextParallel` handle: process groups and the zigzag token layout of one cp group.

A handle is built once per run by :func:`build_context_parallel` (a collective over all ranks) and
handed to the layers explicitly by :func:`lctrain.parallel.context.apply_context_parallel`; layers
never read global process-group state.

Rank layout inside a cp group of degree ``P`` (cp ranks ``0..P-1``) with Ulysses degree ``U``:
cp rank ``r`` is Ulysses rank ``r % U`` of the Ulysses group ``{i*U + u : u < U}`` (``i = r // U``,
consecutive ranks, so the all-to-all stays inside a node) and ring rank ``i`` of the ring group
``{i'*U + (r % U) : i' < P/U}``. ``cp_impl=ring`` is ``U = 1``; ``cp_impl=ulysses`` is ``U = P``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from lctrain.config import CP_IMPLS, check_cp_layout


@dataclass(frozen=True)
class ContextParallel:
    """Context-parallel handle of one rank.

    Attributes:
        group: process group of the ``degree`` ranks sharing one sequence.
        rank: this rank's index in ``group`` (0..degree-1); it holds zigzag chunks
            ``rank`` and ``2*degree-1-rank`` of every sequence.
        degree: P, the context-parallel degree (``parallel.cp_degree``).
        impl: ``ring`` | ``ulysses`` | ``usp`` (how softmax attention is parallelised).
        ulysses_degree: U, ranks of one all-to-all group (1 for ring, P for ulysses).
        ulysses_group, ulysses_rank: the all-to-all group and this rank's index in it.
        ring_group, ring_rank, ring_degree: the K/V-rotation group (P / U ranks).
        ring_global_ranks: global ranks of ``ring_group`` in ring order (for point-to-point).
    """

    group: dist.ProcessGroup
    rank: int
    degree: int
    impl: str
    ulysses_degree: int
    ulysses_group: dist.ProcessGroup | None
    ulysses_rank: int
    ring_group: dist.ProcessGroup | None
    ring_rank: int
    ring_degree: int
    ring_global_ranks: tuple[int, ...]

    # ---------------------------------------------------------------- zigzag layout
    def chunk_ids(self, cp_rank: int | None = None) -> tuple[int, int]:
        """Zigzag chunks ``(r, 2P-1-r)`` held by cp rank ``cp_rank`` (default: this rank)."""
        r = self.rank if cp_rank is None else cp_rank
        return r, 2 * self.degree - 1 - r

    def token_indices(self, global_len: int, cp_rank: int | None = None, device=None) -> torch.Tensor:
        """int64 [global_len / P] global token indices held by ``cp_rank`` (see :func:`zigzag_indices`)."""
        from lctrain.parallel.context.zigzag import zigzag_indices

        return zigzag_indices(global_len, self.degree, self.rank if cp_rank is None else cp_rank, device)

    def ulysses_token_indices(self, global_len: int, ring_rank: int | None = None, device=None) -> torch.Tensor:
        """Global indices of the tokens a rank holds after the Ulysses all-to-all.

        That is the concatenation, in Ulysses-rank order, of the zigzag indices of the ``U`` cp
        ranks of ring position ``ring_rank`` (default: this rank's).
        """
        i = self.ring_rank if ring_rank is None else ring_rank
        U = self.ulysses_degree
        return torch.cat([self.token_indices(global_len, i * U + u, device) for u in range(U)])

    def ulysses_token_runs(self, global_len: int, ring_rank: int | None = None) -> list[tuple[int, int, int]]:
        """The tokens of :meth:`ulysses_token_indices` as host runs ``(local start, global start, length)``.

        One run per zigzag chunk (``2U`` of ``global_len / 2P`` tokens), in local order: what ring
        attention plans its blocks from, without a device index tensor.
        """
        i = self.ring_rank if ring_rank is None else ring_rank
        U, P = self.ulysses_degree, self.degree
        c = global_len // (2 * P)
        runs, local = [], 0
        for u in range(U):
            for ch in self.chunk_ids(i * U + u):
                runs.append((local, ch * c, c))
                local += c
        return runs


def build_context_parallel(
    cp_groups: list[list[int]], cp_impl: str = "ring", ulysses_degree: int = 1
) -> ContextParallel | None:
    """Create the process groups of context parallelism (collective: every rank must call it).

    Args:
        cp_groups: the global ranks of every cp group (e.g. the rows of the ``("dp", "cp")``
            mesh: ``[[d*P + c for c in range(P)] for d in range(dp)]``); this rank must be in one.
        cp_impl: ``ring`` | ``ulysses`` | ``usp``.
        ulysses_degree: U for ``usp`` (ignored by ring; ulysses uses P).

    Returns:
        This rank's :class:`ContextParallel`, or None when P == 1.

    Raises:
        ConfigError: bad impl / Ulysses degree (see :func:`lctrain.config.check_cp_layout`).
        ValueError: this rank is in no group or the groups differ in size.
    """
    P = len(cp_groups[0])
    if any(len(g) != P for g in cp_groups):
        raise ValueError(f"cp groups must all have the same size, got {cp_groups}")
    if P == 1:
        return None
    U = check_cp_layout(P, cp_impl, ulysses_degree)
    me = dist.get_rank()
    mine = None
    for ranks in cp_groups:  # new_group is collective over the world: every rank creates every group
        g = dist.new_group(ranks)
        ulysses = [dist.new_group([ranks[i * U + u] for u in range(U)]) for i in range(P // U)]
        rings = [dist.new_group([ranks[i * U + u] for i in range(P // U)]) for u in range(U)]
        if me in ranks:
            r = ranks.index(me)
            i, u = r // U, r % U
            mine = ContextParallel(
                group=g, rank=r, degree=P, impl=cp_impl, ulysses_degree=U,
                ulysses_group=ulysses[i], ulysses_rank=u,
                ring_group=rings[u], ring_rank=i, ring_degree=P // U,
                ring_global_ranks=tuple(ranks[j * U + u] for j in range(P // U)),
            )
    if mine is None:
        raise ValueError(f"rank {me} is in none of the cp groups {cp_groups}")
    return mine


def cp_groups_from_mesh(mesh) -> list[list[int]]:
    """The cp groups (global ranks) of a ``("dp", "cp")`` DeviceMesh: one list per dp index."""
    rows = mesh.mesh.tolist()  # host lists (no tensor op: also works while fake tensors are traced)
    while rows and isinstance(rows[0], list) and rows[0] and isinstance(rows[0][0], list):
        rows = [r for block in rows for r in block]
    return [list(map(int, row)) for row in rows]
