"""Deterministic, resumable global-batch sampling shared by all data-parallel ranks.

Every rank computes the same epoch order (a permutation from ``torch.Generator`` seeded with
``seed + epoch``), takes the same next ``global_batch_size`` indices for each optimizer step and
keeps only its contiguous slice. The global batch of a step therefore does not depend on the
data-parallel size: a run on 4 ranks sees exactly the samples a 1-rank run with gradient
accumulation sees, and a checkpoint taken at one dp size resumes at another.
"""

from __future__ import annotations

import torch

from lctrain.errors import ConfigError


class DistributedBatchSampler:
    """Yields, per optimizer step, this rank's micro-batches of sample indices.

    Epoch ``e`` orders the samples by ``torch.randperm(num_samples)`` drawn from a generator
    seeded with ``seed + e`` (or ``0..num_samples-1`` when ``shuffle=False``). Step ``s`` of the
    epoch takes positions ``[s*G, (s+1)*G)`` of that order, ``G = global_batch_size``; the last
    ``num_samples % G`` positions of an epoch are skipped (a partial global batch would change
    the loss scale), and the next step starts the next epoch. Rank ``r`` of ``P`` keeps positions
    ``[r*G/P, (r+1)*G/P)`` of the global batch, split into micro-batches of ``micro_batch_size``.

    Call :meth:`next_global_batch` once per optimizer step; :meth:`state_dict` after it
    describes exactly where the next step starts, so resuming reproduces the uninterrupted run.

    Args:
        num_samples: dataset length (windows), ``>= global_batch_size``.
        global_batch_size: samples per optimizer step over all data-parallel ranks
            (``train.global_batch_size``).
        micro_batch_size: samples per forward/backward (``train.micro_batch_size``).
        dp_rank: this rank's index on the data-parallel axis, ``0 <= dp_rank < dp_size``.
        dp_size: data-parallel degree.
        seed: base seed of the epoch permutations.
        shuffle: ``False`` keeps the dataset order every epoch (validation).

    Raises:
        ValueError: non-positive sizes, ``dp_rank`` out of range, ``global_batch_size`` not a
            multiple of ``micro_batch_size * dp_size``.
        ConfigError: fewer samples than one global batch (the corpus is too small for the batch).
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        for name, value in [
            ("train.global_batch_size", global_batch_size),
            ("train.micro_batch_size", micro_batch_size),
            ("data-parallel size", dp_size),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, {dp_size}) for a data-parallel size of {dp_size}")
        if global_batch_size % (micro_batch_size * dp_size) != 0:
            raise ValueError(
                f"train.global_batch_size={global_batch_size} must be a multiple of train.micro_batch_size="
                f"{micro_batch_size} times the data-parallel size {dp_size} (= {micro_batch_size * dp_size}); "
                f"change train.global_batch_size or train.micro_batch_size"
            )
        if num_samples < global_batch_size:  # the corpus is too small: an input error (exit code 2)
            raise ConfigError(
                f"the dataset has {num_samples} samples, fewer than one global batch "
                f"(train.global_batch_size={global_batch_size}); use a larger corpus, a smaller "
                f"data.seq_len, or a smaller train.global_batch_size"
            )
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0  # next position in the current epoch's order
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, ``num_samples // global_batch_size``."""
        return self.num_samples // self.global_batch_size

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per rank per step, ``global_batch_size / (micro_batch_size * dp_size)``."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch`` (identical on every rank): int64 [num_samples].

        Kept as a tensor (8 bytes a window, not a Python list of ints) so a corpus of billions
        of tokens costs little host memory; only each step's slice becomes Python ints.
        """
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def _current_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            self._order = self.epoch_order(self.epoch)
            self._order_epoch = self.epoch
        assert self._order is not None
        return self._order

    def next_global_batch(self) -> list[list[int]]:
        """This rank's micro-batches for the next optimizer step, and advance.

        Returns:
            ``grad_accum_steps`` lists of ``micro_batch_size`` sample indices each.
        """
        if self.position + self.global_batch_size > self.num_samples:
            self.epoch += 1
            self.position = 0
        order = self._current_order()
        batch = order[self.position:self.position + self.global_batch_size].tolist()
        self.position += self.global_batch_size
        per_rank = self.global_batch_size // self.dp_size
        mine = batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        m = self.micro_batch_size
        return [mine[k:k + m] for k in range(0, per_rank, m)]

    def state_dict(self) -> dict[str, int]:
        """Where the next step starts: ``epoch``, ``position``, plus ``seed`` / ``num_samples`` for checks.

        The state does not depend on ``dp_rank`` or ``dp_size``: any rank's copy resumes any layout.
        """
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from :meth:`state_dict`.

        Raises:
            ValueError: the state belongs to a different dataset size or seed (the data or
                ``data.seq_len`` / ``train.seed`` changed since the checkpoint: a
                :class:`~lctrain.errors.ConfigError`), or is malformed.
        """
        for key in ("epoch", "position"):
            if key not in state:
                raise ValueError(f"sampler state lacks '{key}'; keys found: {', '.join(state)}")
        if "num_samples" in state and int(state["num_samples"]) != self.num_samples:
            raise ConfigError(
                f"checkpointed data sampler covers {state['num_samples']} samples but the dataset now has "
                f"{self.num_samples}; the corpus, tokenizer or data.seq_len changed since the checkpoint"
            )
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ConfigError(
                f"checkpointed data sampler used seed {state['seed']} but this run uses {self.seed}; the sampler is "
                f"seeded from train.seed: set train.seed={state['seed']} to resume the same sample order"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_samples:
            raise ValueError(f"invalid sampler state epoch={epoch} position={position} for {self.num_samples} samples")
        self.epoch, self.position = epoch, position
