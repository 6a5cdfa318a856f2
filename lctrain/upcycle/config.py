"""Section ``upcycle``: the BAM / BTX upcycling pipeline of ``launch/upcycle.py``.

A BAM recipe is an ordinary lctrain recipe (its ``model`` section is the dense seed) plus this
section. The pipeline (Zhang et al. 2024, "BAM! Just Like That: Simple and Efficient Parameter
Upcycling for Mixture of Experts"; BTX: Sukhbaatar et al. 2024, "Branch-Train-MiX"):

1. ``parent``: train the dense seed for ``parent_steps`` on the union of the branch domains
   (skipped when ``upcycle.parent`` names an existing checkpoint);
2. ``branch``: one copy of the parent per entry of ``branches``, each trained ``branch_steps``
   on the documents its ``filter`` selects (``data.filter`` syntax), starting from the parent's
   weights with a fresh optimizer (skipped for a branch whose ``checkpoint`` is given);
3. ``mix``: one upcycled MoE per entry of ``variants`` written as a step-0 lctrain checkpoint;
4. ``train``: each upcycled model trained ``moe_steps`` on the union, then every model is
   evaluated on each domain's held-out documents (``bam_summary.json``).

This module holds only the dataclasses (imported by :mod:`lctrain.config`; it imports nothing
else from lctrain but the errors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lctrain.errors import ConfigError

__all__ = ["STAGES", "VARIANTS", "BranchConfig", "UpcycleConfig", "variant_dir_name"]

STAGES = ("branch", "mix", "train", "all")
# btx: FFN experts only, attention averaged (Branch-Train-MiX); full / shared_kv: BAM with soft
# mixture-of-attention experts, each its own q/k/v/o, or K/V averaged over the seeds and per-expert q/o.
VARIANTS = ("btx", "full", "shared_kv")
ROUTER_INITS = ("normal", "zeros")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def variant_dir_name(variant: str) -> str:
    """Run directory (under ``train.out_dir``) of an upcycled variant: ``moe_btx``, ``moe_bam_full``, ..."""
    return "moe_btx" if variant == "btx" else f"moe_bam_{variant}"


@dataclass
class BranchConfig:
    """One domain expert.

    Attributes:
        name: short identifier (letters, digits, ``_ . -``); the run directory is
            ``<train.out_dir>/branch_<name>``.
        filter: ``data.filter`` expression selecting the domain's documents (e.g.
            ``author=William Shakespeare``); its own ``data.val_fraction`` split is the
            domain's held-out set.
        checkpoint: optional path of an already trained seed checkpoint (a ``step_XXXXXXXX``
            directory, or a run directory whose newest checkpoint is used); the branch is then
            not trained.
    """

    name: str = ""
    filter: str = ""
    checkpoint: str = ""


@dataclass
class UpcycleConfig:
    """Section ``upcycle`` (see the module docstring for the stages).

    Attributes:
        stage: ``branch`` (parent + branches), ``mix`` (write the upcycled step-0 checkpoints),
            ``train`` (train them, evaluate, write ``bam_summary.json``) or ``all``.
        seed_recipe: dense recipe whose sections are loaded under this recipe's own by
            ``launch/upcycle.py`` (empty: this recipe's ``model`` section is the seed).
        parent: an existing dense checkpoint used as the parent instead of training one; its
            saved config gives the seed architecture.
        parent_steps / branch_steps / moe_steps: optimizer steps of the parent, of each branch and
            of each upcycled model (the same for every variant, so BTX and BAM see the same tokens).
        branches: the domains (at least 2: one expert each).
        variants: which upcycled models to build and train, among ``btx``, ``full``, ``shared_kv``.
        shared_expert: add the parent's FFN as an always-on shared expert (``model.moe``
            ``num_shared_experts = 1``); the routed and shared down projections are then halved so
            the FFN starts as the mean of the parent FFN and the routed mixture.
        router_init: ``normal`` (new routers drawn from ``N(0, model.init_std)``, as BTX/BAM
            initialise them) or ``zeros`` (uniform gates at the start).
        router_seed: seed of the router draw (the same FFN routers for every variant).
    """

    stage: str = "all"
    seed_recipe: str = ""
    parent: str = ""
    parent_steps: int = 200
    branch_steps: int = 200
    moe_steps: int = 200
    branches: list[BranchConfig] = field(default_factory=list)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    shared_expert: bool = False
    router_init: str = "normal"
    router_seed: int = 0

    def validate(self, prefix: str = "upcycle") -> None:
        """Raise :class:`~lctrain.errors.ConfigError` naming the bad key and what is allowed."""
        if self.stage not in STAGES:
            raise ConfigError(f"invalid {prefix}.stage={self.stage!r}: allowed values are {', '.join(STAGES)}")
        if self.router_init not in ROUTER_INITS:
            raise ConfigError(
                f"invalid {prefix}.router_init={self.router_init!r}: allowed values are {', '.join(ROUTER_INITS)}"
            )
        for key in ("parent_steps", "branch_steps", "moe_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"invalid {prefix}.{key}={getattr(self, key)!r}: must be a positive integer")
        bad = [v for v in self.variants if v not in VARIANTS]
        if not self.variants or bad or len(set(self.variants)) != len(self.variants):
            raise ConfigError(
                f"invalid {prefix}.variants={list(self.variants)!r}: a non-empty list without repeats of "
                f"{', '.join(VARIANTS)}"
            )
        if len(self.branches) < 2:
            raise ConfigError(
                f"{prefix}.branches has {len(self.branches)} entries: upcycling needs at least 2 domains (one expert "
                f"each), e.g. upcycle.branches=[{{name: a, filter: 'author=X'}}, {{name: b, filter: 'author=Y'}}]"
            )
        names = [b.name for b in self.branches]
        for i, b in enumerate(self.branches):
            if not _NAME.match(b.name or ""):
                raise ConfigError(
                    f"invalid {prefix}.branches.{i}.name={b.name!r}: letters, digits, '_', '.', '-' (a directory name)"
                )
            if not b.filter.strip():  # also needed with a given checkpoint: the domain's held-out split
                raise ConfigError(
                    f"{prefix}.branches.{i} ({b.name}) has no filter: set {prefix}.branches.{i}.filter to a data.filter "
                    f"expression selecting its domain (e.g. 'author=William Shakespeare')"
                )
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{prefix}.branches: names must be unique, repeated: {', '.join(dup)}")
