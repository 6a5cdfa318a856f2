"""The BAM / BTX pipeline of ``launch/upcycle.py``: parent -> branches -> mix -> MoE training -> evaluation.

Run directories under ``R = train.out_dir``::

    R/parent/               dense parent (data: the union of the branch filters)
    R/branch_<name>/        one seed per domain (data: its filter), starts from the parent's weights
    R/moe_btx/              BTX: FFN experts, attention averaged
    R/moe_bam_full/         BAM: FFN experts + soft attention experts (each its own q/k/v/o)
    R/moe_bam_shared_kv/    BAM: FFN experts + soft attention experts sharing averaged K/V
    R/bam_summary.json      per-domain validation losses, steps and tokens of every model
    R/.cache/data           tokenizer and token caches (unless data.cache_dir is set)

Every training run is an ordinary :class:`~lctrain.train.trainer.Trainer` run with
``train.resume=auto`` in its own directory, so each stage resumes after an interruption and works
under torchrun. A branch and an upcycled model start from a step-0 checkpoint written by
:func:`lctrain.train.init_checkpoint.write_init_checkpoint`; each such directory also gets a
``recipe.yaml`` with which ``launch/train.py recipe=<dir>/recipe.yaml`` continues the run.

Data: the parent and the upcycled models train on ``filter_1 | filter_2 | ...``; ``build_data``
splits each ``|`` alternative separately, so every run holds out exactly the documents of the
domains' own held-out splits (no model trains on a document another is evaluated on). All runs
share the parent's tokenizer (``data.tokenizer`` is set to its file).

Evaluation: every model on each domain's held-out split, the first ``train.eval_batches *
train.micro_batch_size`` windows as :meth:`Trainer.evaluate` reads them.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from lctrain.errors import ConfigError
from lctrain.upcycle.config import variant_dir_name

__all__ = ["SUMMARY_FILE", "Plan", "evaluate_state_dict", "format_table", "load_upcycle_config", "make_plan",
           "run_pipeline", "upcycle_main"]

SUMMARY_FILE = "bam_summary.json"
MODEL_NAMES = {"btx": "btx", "full": "bam_full", "shared_kv": "bam_shared_kv"}


def _log(msg: str) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"[upcycle] {msg}", flush=True)


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _rank0_first(fn):
    """Run ``fn`` on rank 0, then (if it worked) on the other ranks; an error on rank 0 stops every rank.

    Rank 0 fills the caches (datasets Arrow files, tokenizer, token streams) before the others
    read them, as the trainer does; its ConfigError is re-raised on every rank instead of leaving
    them waiting.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    result, error, message = None, None, [None]
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, after telling the other ranks)
            error, message = e, [f"{e}" if isinstance(e, ConfigError) else f"{type(e).__name__} on rank 0: {e}"]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise ConfigError(message[0])
    if dist.get_rank() != 0:
        result = fn()
    return result


# --------------------------------------------------------------------------------------- config


def load_upcycle_config(argv: list[str]):
    """Load a BAM recipe: ``recipe=NAME [scale=NAME] [key=value ...]`` -> validated RunConfig.

    When the recipe (or an ``upcycle.seed_recipe=`` override) names a seed recipe, that recipe's
    YAML is merged under the BAM recipe's own (the BAM file's keys win), then the scale preset and
    the overrides apply as in :func:`lctrain.config.load_config`. ``parallel.ep_degree`` is meant
    for the upcycled models (the recipe's model is the dense seed, which expert parallelism refuses):
    it is set after loading and checked against each upcycled model's config by :func:`make_plan`.

    Raises:
        ConfigError: as :func:`~lctrain.config.load_config`, an unknown seed recipe, or an invalid
            ``upcycle`` section.
    """
    from omegaconf import OmegaConf

    from lctrain.config import RECIPES_DIR, _load_yaml, _recipe_path, load_config

    recipe = next((a.split("=", 1)[1] for a in argv if a.startswith("recipe=")), None)
    if recipe is None:
        return load_config(argv)  # raises the usual "no recipe given" error
    path = _recipe_path(recipe, RECIPES_DIR)
    own = _load_yaml(path, "recipe")
    seed = next((a.split("=", 1)[1] for a in argv if a.startswith("upcycle.seed_recipe=")), None)
    if seed is None:
        seed = OmegaConf.select(own, "upcycle.seed_recipe", default="") or ""
    merged = OmegaConf.merge(_load_yaml(_recipe_path(seed, RECIPES_DIR), "seed recipe"), own) if seed else own
    ep = OmegaConf.select(merged, "parallel.ep_degree", default=1)
    if OmegaConf.select(merged, "parallel.ep_degree") is not None:
        del merged.parallel["ep_degree"]
    rest = []
    for a in argv:
        if a.startswith("parallel.ep_degree="):
            ep = a.split("=", 1)[1]
        elif not a.startswith("recipe="):
            rest.append(a)
    try:
        ep = int(ep)
    except ValueError as e:
        raise ConfigError(f"invalid parallel.ep_degree={ep!r}: must be a positive integer") from e
    with tempfile.TemporaryDirectory() as tmp:
        combined = Path(tmp) / f"{path.stem}.yaml"  # same stem: cfg.recipe stays the BAM recipe's name
        combined.write_text(OmegaConf.to_yaml(merged))
        cfg = load_config([f"recipe={combined}", *rest])
    cfg.parallel.ep_degree = ep
    cfg.upcycle.validate()
    return cfg


@dataclass
class Plan:
    """Every run of the pipeline, derived and validated at start-up (see :func:`make_plan`)."""

    cfg: object
    root: Path
    dense: object
    union_filter: str
    parent_cfg: object | None
    parent_given: Path | None
    branch_cfgs: dict = field(default_factory=dict)
    branch_given: dict = field(default_factory=dict)
    moe_cfgs: dict = field(default_factory=dict)
    tokenizer: str = ""

    @property
    def parent_dir(self) -> Path:
        return self.root / "parent"

    def branch_dir(self, name: str) -> Path:
        return self.root / f"branch_{name}"

    def moe_dir(self, variant: str) -> Path:
        return self.root / variant_dir_name(variant)

    @property
    def needs_parent(self) -> bool:
        return self.cfg.upcycle.shared_expert or any(b.name not in self.branch_given for b in self.cfg.upcycle.branches)


def _stage_cfg(cfg, out_dir: Path, steps: int, doc_filter: str, model=None, dense: bool = True):
    from lctrain.config import validate

    c = copy.deepcopy(cfg)
    c.train.out_dir = str(out_dir)
    c.train.max_steps = steps
    c.train.resume = "auto"
    c.data.filter = doc_filter
    if model is not None:
        c.model = copy.deepcopy(model)
    if dense:
        c.parallel.ep_degree = 1  # expert parallelism is for the upcycled models
    validate(c)
    return c


def _check_filters(cfg, union: str) -> None:
    """Every branch filter (each alternative) selects documents, domains are disjoint, val splits exist."""
    from lctrain.data.corpus import load_documents, parse_filter

    d, cache = cfg.data, Path(cfg.data.cache_dir)
    total = 0
    for i, b in enumerate(cfg.upcycle.branches):
        for a in range(len(parse_filter(b.filter))):
            try:
                docs = load_documents(d.path, d.text_key, d.split, cache, doc_filter=b.filter, filter_alternative=a)
            except ConfigError as e:
                raise ConfigError(f"upcycle.branches.{i}.filter ({b.name}): {e}") from e
            total += len(docs)
            if len(docs) < 2:
                raise ConfigError(
                    f"upcycle.branches.{i}.filter ({b.name}) = {b.filter!r} selects {len(docs)} document; its held-out "
                    f"split needs at least 2 (one stays for training)"
                )
    union_docs = sum(
        len(load_documents(d.path, d.text_key, d.split, cache, doc_filter=union, filter_alternative=a))
        for a in range(len(parse_filter(union)))
    )
    if union_docs != total:
        raise ConfigError(
            f"the upcycle.branches filters overlap: together they select {total} documents but only {union_docs} "
            f"distinct ones; make the domains disjoint (e.g. add a clause like ';author!=...')"
        )


def _compare_arch(reference, other, what: str, ref_what: str) -> None:
    from lctrain.upcycle.mix import architecture_differences

    diffs = architecture_differences(reference, other)
    if diffs:
        raise ConfigError(
            f"seeds with different architectures: {what} differs from {ref_what} in " + ", ".join(diffs[:8])
            + (f" and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        )


def make_plan(cfg) -> Plan:
    """Check the BAM config and derive every stage's RunConfig; raises ConfigError before any training.

    Checks: the ``upcycle`` section; ``train.resume`` and ``data.filter`` left to the pipeline;
    ``data.val_fraction > 0``; a given parent / branch checkpoint exists, is complete and passes
    its checksums (:func:`lctrain.checkpoint.open_checkpoint`); given checkpoints are dense seeds
    of one architecture; every branch filter selects documents and the
    domains are disjoint; every derived run config validates (e.g. ``parallel.ep_degree`` must
    divide the number of branches).
    """
    from lctrain.checkpoint import checkpoint_model_config, open_checkpoint, resolve_checkpoint
    from lctrain.upcycle.mix import check_dense_seed, upcycled_model_config

    u = cfg.upcycle
    u.validate()
    if cfg.train.resume != "auto":
        raise ConfigError(
            f"train.resume={cfg.train.resume!r}: launch/upcycle.py resumes every stage from its own directory "
            f"(train.resume=auto); use a new train.out_dir to start over"
        )
    if cfg.data.filter:
        raise ConfigError(
            f"data.filter={cfg.data.filter!r}: launch/upcycle.py sets the filter of each stage (a branch's own, the "
            f"union of upcycle.branches for the parent and the upcycled models); remove data.filter"
        )
    if not cfg.data.val_fraction > 0:
        raise ConfigError("data.val_fraction=0: the per-domain evaluation needs held-out documents (e.g. 0.05)")
    root = Path(cfg.train.out_dir)
    cfg = copy.deepcopy(cfg)
    cfg.data.cache_dir = cfg.data.cache_dir or str(root / ".cache" / "data")

    dense, dense_what = cfg.model, "the recipe's model"
    parent_given = None
    if u.parent:
        parent_given = resolve_checkpoint(u.parent, "upcycle.parent")
        dense, dense_what = checkpoint_model_config(parent_given, "upcycle.parent"), f"the parent {parent_given}"
    check_dense_seed(dense, dense_what)
    branch_given = {}
    for i, b in enumerate(u.branches):
        if b.checkpoint:
            path = resolve_checkpoint(b.checkpoint, f"upcycle.branches.{i}.checkpoint ({b.name})")
            seed_cfg = checkpoint_model_config(path, f"upcycle.branches.{i}.checkpoint")
            check_dense_seed(seed_cfg, f"seed '{b.name}' ({path})")
            _compare_arch(dense, seed_cfg, f"seed '{b.name}' ({path})", dense_what)
            branch_given[b.name] = path
    # the given checkpoints' files (sizes, checksums), once their configs passed the cheaper checks above
    if parent_given is not None:
        open_checkpoint(parent_given, "upcycle.parent")
    for i, b in enumerate(u.branches):
        if b.name in branch_given:
            open_checkpoint(branch_given[b.name], f"upcycle.branches.{i}.checkpoint ({b.name})")

    union = "|".join(b.filter for b in u.branches)
    _rank0_first(lambda: _check_filters(cfg, union))
    plan = Plan(cfg=cfg, root=root, dense=dense, union_filter=union, parent_cfg=None, parent_given=parent_given,
                branch_given=branch_given)
    if plan.needs_parent and parent_given is None:
        plan.parent_cfg = _stage_cfg(cfg, plan.parent_dir, u.parent_steps, union, model=dense)
    for b in u.branches:
        if b.name not in branch_given:
            plan.branch_cfgs[b.name] = _stage_cfg(cfg, plan.branch_dir(b.name), u.branch_steps, b.filter, model=dense)
    for v in u.variants:
        moe_model = upcycled_model_config(dense, len(u.branches), v, shared_expert=u.shared_expert, routing=cfg.model)
        plan.moe_cfgs[v] = _stage_cfg(cfg, plan.moe_dir(v), u.moe_steps, union, model=moe_model, dense=False)
    return plan


# --------------------------------------------------------------------------------------- tokenizer


def _saved_data_cfg(path: Path):
    from lctrain.checkpoint import checkpoint_state, saved_config
    from lctrain.config import DataConfig

    saved = checkpoint_state(path).get("config", {}).get("data", {})
    data = saved_config(DataConfig, saved, f"the data config saved in {path}")
    if not data.cache_dir:  # the trainer's default: <out_dir>/../.cache/data, out_dir = <ckpt>/../..
        data.cache_dir = str(path.parent.parent.parent / ".cache" / "data")
    return data


def _tokenizer_of(data_cfg, vocab_size: int):
    from lctrain.data import build_data

    return _rank0_first(lambda: build_data(data_cfg, data_cfg.seq_len, vocab_size, data_cfg.cache_dir)[0])


def resolve_tokenizer(plan: Plan) -> str:
    """The tokenizer file every run shares (the parent's); sets it in every derived config.

    The parent's: the trained parent's data config (built now, cached for its training), or the
    saved data config of ``upcycle.parent``; with no parent, the given seeds' (which must agree).

    Raises:
        ConfigError: the given parent / seeds used tokenizers that differ.
    """
    vocab = plan.dense.vocab_size
    sources = []
    if plan.parent_cfg is not None:
        sources.append(("the parent", _tokenizer_of(plan.parent_cfg.data, vocab)))
    elif plan.parent_given is not None:
        sources.append((f"the parent {plan.parent_given}", _tokenizer_of(_saved_data_cfg(plan.parent_given), vocab)))
    for name, path in plan.branch_given.items():
        sources.append((f"seed '{name}' ({path})", _tokenizer_of(_saved_data_cfg(path), vocab)))
    first_what, tok = sources[0]
    for what, other in sources[1:]:
        if other.fingerprint != tok.fingerprint:
            raise ConfigError(f"{what} used another tokenizer than {first_what} ({other.path} vs {tok.path}); "
                              f"upcycled seeds must share one vocabulary")
    if tok.path is None:
        raise ConfigError(f"the tokenizer of {first_what} has no file to share with the other runs")
    plan.tokenizer = str(tok.path)
    for c in [*plan.branch_cfgs.values(), *plan.moe_cfgs.values()]:
        c.data.tokenizer = plan.tokenizer
    return plan.tokenizer


# --------------------------------------------------------------------------------------- stages


def _write_recipe(c) -> None:
    if _is_main():
        from lctrain.config import to_yaml

        r = copy.deepcopy(c)
        r.scale = ""  # sizes are already resolved: a scale preset must not apply again
        Path(c.train.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(c.train.out_dir) / "recipe.yaml").write_text(
            "# written by launch/upcycle.py: python launch/train.py recipe=<this file> continues this run\n" + to_yaml(r)
        )


def _finished_checkpoint(run_dir: Path, steps: int, what: str, hint: str) -> Path:
    from lctrain.checkpoint import checkpoint_state, find_latest_checkpoint

    ckpt = find_latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise ConfigError(f"{what}: missing checkpoint, {run_dir}/checkpoints holds none; {hint}")
    step = checkpoint_state(ckpt)["train_state"]["step"]
    if step < steps:
        raise ConfigError(f"{what}: the newest checkpoint {ckpt} is at step {step} of {steps}; {hint}")
    return ckpt


def parent_checkpoint(plan: Plan) -> Path:
    """The parent's checkpoint (given, or the finished parent run's newest)."""
    if plan.parent_given is not None:
        return plan.parent_given
    return _finished_checkpoint(plan.parent_dir, plan.cfg.upcycle.parent_steps, "the parent",
                                "run upcycle.stage=branch first")


def seed_checkpoints(plan: Plan) -> dict[str, Path]:
    """Each branch's final checkpoint, in ``upcycle.branches`` order.

    Raises:
        ConfigError: a branch that is missing or unfinished (names ``upcycle.stage=branch``).
    """
    out = {}
    for b in plan.cfg.upcycle.branches:
        out[b.name] = plan.branch_given.get(b.name) or _finished_checkpoint(
            plan.branch_dir(b.name), plan.cfg.upcycle.branch_steps, f"seed '{b.name}'", "run upcycle.stage=branch first")
    return out


def run_branch_stage(plan: Plan) -> None:
    """Train the parent (unless given), then each branch from the parent's weights."""
    from lctrain.checkpoint import find_latest_checkpoint, load_model_weights
    from lctrain.train.init_checkpoint import write_init_checkpoint
    from lctrain.train.trainer import train

    if plan.parent_cfg is not None:
        _log(f"parent: {plan.cfg.upcycle.parent_steps} steps on '{plan.union_filter}' -> {plan.parent_dir}")
        train(plan.parent_cfg)
    if not plan.branch_cfgs:
        return
    parent_sd = None
    for name, c in plan.branch_cfgs.items():
        if find_latest_checkpoint(Path(c.train.out_dir) / "checkpoints") is None:
            if parent_sd is None:
                parent_sd = load_model_weights(parent_checkpoint(plan), plan.dense)
            write_init_checkpoint(c, parent_sd)
        _write_recipe(c)
        _log(f"branch {name}: {c.train.max_steps} steps on '{c.data.filter}' -> {c.train.out_dir}")
        train(c)


def run_mix_stage(plan: Plan) -> None:
    """Write each variant's upcycled step-0 checkpoint (and its per-domain losses before training)."""
    from lctrain.checkpoint import checkpoint_model_config, find_latest_checkpoint, load_model_weights
    from lctrain.train.init_checkpoint import write_init_checkpoint
    from lctrain.upcycle.mix import mix_state_dicts

    u = plan.cfg.upcycle
    seeds = seed_checkpoints(plan)
    for name, path in seeds.items():  # seeds trained by an earlier invocation: same architecture as now?
        _compare_arch(plan.dense, checkpoint_model_config(path, f"seed '{name}'"), f"seed '{name}' ({path})",
                      "the recipe's model" if plan.parent_given is None else f"the parent {plan.parent_given}")
    todo = [v for v in u.variants if find_latest_checkpoint(plan.moe_dir(v) / "checkpoints") is None]
    for v in u.variants:
        if v not in todo:
            _log(f"mix {v}: {plan.moe_dir(v)} already has checkpoints; left as it is")
    if not todo:
        return
    seed_sds = [load_model_weights(p, plan.dense) for p in seeds.values()]
    parent_sd = load_model_weights(parent_checkpoint(plan), plan.dense) if u.shared_expert else None
    val_sets = domain_val_sets(plan)
    for v in todo:
        c = plan.moe_cfgs[v]
        _log(f"mix {v}: {len(seed_sds)} seeds ({', '.join(seeds)}) -> {plan.moe_dir(v)}/checkpoints/step_00000000")
        sd = mix_state_dicts(seed_sds, c.model, names=list(seeds), parent=parent_sd, router_init=u.router_init,
                             router_seed=u.router_seed)
        write_init_checkpoint(c, sd)
        _write_recipe(c)
        at_init = evaluate_state_dict(c.model, sd, val_sets, plan.cfg)
        if _is_main():
            (plan.moe_dir(v) / "upcycle_init.json").write_text(json.dumps(
                {"variant": v, "seeds": {k: str(p) for k, p in seeds.items()}, "val_loss": at_init}, indent=1))


def run_train_stage(plan: Plan) -> None:
    """Train every upcycled model from its step-0 checkpoint (``upcycle.moe_steps`` each)."""
    from lctrain.checkpoint import find_latest_checkpoint
    from lctrain.train.trainer import train

    for v, c in plan.moe_cfgs.items():
        if find_latest_checkpoint(plan.moe_dir(v) / "checkpoints") is None:
            raise ConfigError(f"upcycled model {v}: missing checkpoint in {plan.moe_dir(v)}/checkpoints; run "
                              f"upcycle.stage=mix first")
    for v, c in plan.moe_cfgs.items():
        _log(f"train {v}: {c.train.max_steps} steps on '{c.data.filter}' -> {c.train.out_dir}")
        train(c)


# --------------------------------------------------------------------------------------- evaluation


def domain_val_sets(plan: Plan) -> dict:
    """``{branch name: PackedDataset}`` of each domain's held-out split (the shared tokenizer)."""
    from lctrain.data import build_data

    out = {}
    for b in plan.cfg.upcycle.branches:
        d = copy.deepcopy(plan.cfg.data)
        d.filter, d.tokenizer = b.filter, plan.tokenizer
        out[b.name] = _rank0_first(lambda d=d: build_data(d, d.seq_len, plan.dense.vocab_size, d.cache_dir)[2])
    return out


@torch.no_grad()
def evaluate_state_dict(model_cfg, state_dict, val_sets: dict, cfg) -> dict[str, float | None]:
    """Mean next-token loss of a model on each validation set, as :meth:`Trainer.evaluate` computes it.

    Args:
        model_cfg: the model's ModelConfig.
        state_dict: its weights (CPU tensors).
        val_sets: ``{name: PackedDataset}``.
        cfg: RunConfig giving ``train.eval_batches``, ``train.micro_batch_size``, ``train.dtype``
            and the device (one process, or every torchrun rank: windows ``r, r + world, ...``,
            sums all-reduced).

    Returns:
        ``{name: loss}`` (None for a set without a single window).
    """
    from lctrain.data import IGNORE_INDEX, collate_packed
    from lctrain.models import HybridLM
    from lctrain.parallel.mesh import init_distributed

    env = init_distributed(cfg.parallel)
    model = HybridLM(model_cfg).to(env.device)
    model.load_state_dict({k: v.to(env.device) for k, v in state_dict.items()})
    model.eval()
    t = cfg.train
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and env.device.type == "cuda")
    out = {}
    for name, ds in val_sets.items():
        n = min(len(ds), t.eval_batches * t.micro_batch_size)
        mine = list(range(env.rank, n, env.world_size))
        loss_sum, count = 0.0, 0.0
        for s in range(0, len(mine), t.micro_batch_size):
            batch = collate_packed([ds[i] for i in mine[s: s + t.micro_batch_size]])
            batch = {k: (v.to(env.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16):  # the model's summed loss
                loss_sum += float(model(batch["input_ids"], position_ids=batch["position_ids"],
                                        cu_seqlens=batch["cu_seqlens"], labels=batch["labels"], ignore_index=IGNORE_INDEX))
            count += float(batch["num_tokens"])
        sums = torch.tensor([loss_sum, count], dtype=torch.float64, device=env.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        out[name] = float(sums[0] / sums[1]) if sums[1] > 0 else None
    return out


def _run_record(ckpt: Path, model_cfg, cfg) -> dict:
    from lctrain.checkpoint import checkpoint_state
    from lctrain.models import HybridLM

    s = checkpoint_state(ckpt)["train_state"]
    with torch.device("meta"):
        m = HybridLM(model_cfg)
    return {"checkpoint": str(ckpt), "steps": int(s["step"]), "tokens": int(s["tokens"]),
            "num_params": sum(p.numel() for p in m.parameters()),
            "flops_per_token": m.flops_per_token(cfg.data.seq_len)}


def evaluate_all(plan: Plan) -> dict:
    """Evaluate the parent, the seeds and the trained upcycled models on every domain; write the summary."""
    from lctrain.checkpoint import load_model_weights

    u = plan.cfg.upcycle
    val_sets = domain_val_sets(plan)
    models: dict[str, dict] = {}
    entries = []
    if plan.parent_given is not None or plan.parent_cfg is not None:
        entries.append(("parent", "dense parent", parent_checkpoint(plan), plan.dense))
    for name, path in seed_checkpoints(plan).items():
        entries.append((f"seed_{name}", f"dense seed, branch '{name}'", path, plan.dense))
    for v, c in plan.moe_cfgs.items():
        ckpt = _finished_checkpoint(plan.moe_dir(v), u.moe_steps, f"upcycled model {v}", "run upcycle.stage=train")
        entries.append((MODEL_NAMES[v], f"upcycled ({v})", ckpt, c.model))
    parent_rec = None
    for key, kind, ckpt, model_cfg in entries:
        _log(f"evaluating {key} on {', '.join(val_sets)}")
        rec = {"kind": kind, **_run_record(ckpt, model_cfg, plan.cfg)}
        rec["val_loss"] = evaluate_state_dict(model_cfg, load_model_weights(ckpt, model_cfg), val_sets, plan.cfg)
        vals = [x for x in rec["val_loss"].values() if x is not None]
        rec["mean_val_loss"] = sum(vals) / len(vals) if vals else None
        if key == "parent":
            parent_rec = rec
        models[key] = rec
    # cumulative budget: a seed = parent + its branch; an upcycled model = parent + every branch + its own steps
    base_steps = parent_rec["steps"] if parent_rec else 0
    base_tokens = parent_rec["tokens"] if parent_rec else 0
    seeds = [k for k in models if k.startswith("seed_")]
    for key, rec in models.items():
        if key.startswith("seed_"):
            rec["total_steps"], rec["total_tokens"] = base_steps + rec["steps"], base_tokens + rec["tokens"]
        elif key != "parent":
            rec["total_steps"] = base_steps + sum(models[s]["steps"] for s in seeds) + rec["steps"]
            rec["total_tokens"] = base_tokens + sum(models[s]["tokens"] for s in seeds) + rec["tokens"]
            init = plan.moe_dir(next(v for v in plan.moe_cfgs if MODEL_NAMES[v] == key)) / "upcycle_init.json"
            rec["val_loss_at_upcycle"] = json.loads(init.read_text())["val_loss"] if init.is_file() else None
        else:
            rec["total_steps"], rec["total_tokens"] = rec["steps"], rec["tokens"]
    return {
        "recipe": plan.cfg.recipe, "scale": plan.cfg.scale, "out_dir": str(plan.root),
        "domains": {b.name: b.filter for b in u.branches},
        "val_windows_per_domain": {k: min(len(ds), plan.cfg.train.eval_batches * plan.cfg.train.micro_batch_size)
                                   for k, ds in val_sets.items()},
        "tokens_per_step": plan.cfg.train.global_batch_size * plan.cfg.data.seq_len,
        "steps": {"parent": u.parent_steps, "branch": u.branch_steps, "moe": u.moe_steps},
        "router_init": u.router_init, "shared_expert": u.shared_expert,
        "models": models,
    }


def format_table(summary: dict) -> str:
    """The per-domain validation losses of a summary as a fixed-width text table."""
    domains = list(summary["domains"])
    head = f"{'model':<22}" + "".join(f"{d[:12]:>13}" for d in domains) + f"{'mean':>9}{'steps':>8}{'tokens':>11}" \
        f"{'total steps':>12}{'params':>10}"
    lines = [head, "-" * len(head)]
    for key, rec in summary["models"].items():
        vals = "".join(f"{rec['val_loss'][d]:>13.4f}" if rec["val_loss"][d] is not None else f"{'-':>13}"
                       for d in domains)
        mean = f"{rec['mean_val_loss']:>9.4f}" if rec["mean_val_loss"] is not None else f"{'-':>9}"
        lines.append(f"{key:<22}{vals}{mean}{rec['steps']:>8}{rec['tokens']:>11}{rec['total_steps']:>12}"
                     f"{rec['num_params'] / 1e6:>9.2f}M")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- entry


def run_pipeline(cfg, argv: list[str] | None = None) -> dict | None:
    """Run ``cfg.upcycle.stage`` (``branch`` | ``mix`` | ``train`` | ``all``); returns the summary after ``train``.

    Raises:
        ConfigError: start-up checks (:func:`make_plan`), a missing or unfinished checkpoint of an
            earlier stage, seeds of different architectures or tokenizers.
        NonFiniteLossError: from a training run.
    """
    from lctrain.parallel.mesh import init_distributed

    t0 = time.perf_counter()
    init_distributed(cfg.parallel)  # torchrun: the process group every stage shares
    plan = make_plan(cfg)
    stage = cfg.upcycle.stage
    if stage in ("mix", "train"):  # fail before any work when an earlier stage is missing
        seed_checkpoints(plan)
        if cfg.upcycle.shared_expert:
            parent_checkpoint(plan)
    resolve_tokenizer(plan)
    times = {}
    for name, fn in (("branch", run_branch_stage), ("mix", run_mix_stage), ("train", run_train_stage)):
        if stage in (name, "all"):
            s = time.perf_counter()
            fn(plan)
            times[name] = time.perf_counter() - s
    if stage not in ("train", "all"):
        return None
    s = time.perf_counter()
    summary = evaluate_all(plan)
    times["evaluate"] = time.perf_counter() - s
    summary["command"] = " ".join(["launch/upcycle.py", *(argv or [])])
    summary["wall_time_s"] = {**times, "total_this_invocation": time.perf_counter() - t0}
    if _is_main():
        plan.root.mkdir(parents=True, exist_ok=True)
        tmp = plan.root / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(plan.root / SUMMARY_FILE)
        print("\nper-domain validation loss (nats/token, held-out documents of each domain)\n" + format_table(summary),
              flush=True)
        print(f"[upcycle] summary: {plan.root / SUMMARY_FILE}", flush=True)
    return summary


def upcycle_main(argv: list[str]) -> int:
    """``launch/upcycle.py`` / torchrun entry: returns the exit code (0 done, 2 bad input, 3 non-finite loss)."""
    if any(a in ("-h", "--help") for a in argv):
        print("usage: [torchrun --nproc_per_node=N] launch/upcycle.py recipe=bam_hybrid_gdn_3to1 [scale=NAME] "
              "[upcycle.stage=branch|mix|train|all] [key=value ...]\n\n" + __doc__)
        return 0
    from lctrain.cli import run_with_exit_codes

    return run_with_exit_codes(lambda: run_pipeline(load_upcycle_config(argv), argv))

