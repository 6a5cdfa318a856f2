"""Typed run configuration: dataclasses are the schema, recipes (YAML) select values.

A run is configured by one recipe file in ``lctrain/recipes/`` plus ``key=value`` overrides, the
form Hydra users know::

    torchrun --nproc_per_node=2 launch/train.py recipe=hybrid_gdn_3to1 scale=cpu train.max_steps=50

Merge order (later wins): dataclass defaults -> recipe YAML -> ``scale`` file
(``lctrain/recipes/scale/<name>.yaml``, chosen by the recipe's ``scale:`` key or a ``scale=`` override)
-> command-line overrides. Merging goes through OmegaConf structured configs, so an unknown
key or a value of the wrong type fails at start-up; :func:`validate` then checks values that
types cannot express (choices, ranges, divisibility) and names the allowed values.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lctrain.data.sources import check_data_path
from lctrain.errors import ConfigError
from lctrain.kernels.plan import resolve_kernel_plan
from lctrain.layers.attention import AttentionConfig
from lctrain.layers.gated_deltanet import GatedDeltaNetConfig
from lctrain.layers.lightning import LightningConfig
from lctrain.layers.lora_mixer import LoRAMixerConfig
from lctrain.layers.moa import MoAConfig
from lctrain.layers.moba import MoBAConfig
from lctrain.layers.moh import MoHConfig
from lctrain.layers.moe import MoEConfig, moe_layer_indices
from lctrain.layers.registry import MIXERS, describe_mixers, mixer_config
from lctrain.upcycle.config import UpcycleConfig

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "MoEConfig", "OptimConfig", "ParallelConfig", "RunConfig",
    "TrainConfig", "available_recipes", "available_scales", "check_cp_layout", "load_config", "moe_layer_indices",
    "to_dict", "to_yaml", "validate",
]

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # package data: present in every install


@dataclass
class ModelConfig:
    """Model shape: shared keys plus one section per token mixer.

    ``layer_pattern`` letters name registered mixers (:mod:`lctrain.layers.registry`): ``G``
    Gated DeltaNet (section ``gdn``), ``A`` softmax attention (``attn``), ``L`` Lightning
    Attention (``lightning``), ``M`` MoBA block-sparse attention (``moba``), ``H``
    mixture-of-head attention (``moh``), ``E`` mixture of attention experts (``moa``). The pattern is
    tiled to ``n_layers`` (``GGGA`` with 8 layers -> ``GGGAGGGA``); ``n_layers`` must be a
    multiple of the pattern length. ``final_layers`` (letters, default none) then replaces the
    last ``len(final_layers)`` layers (``GM`` + ``A`` at 4 layers -> ``GMGA``: MoBA's hybrid
    schedule with a full-attention last layer). ``moe`` turns the FFNs
    of chosen blocks into mixtures of experts. ``ffn_hidden_size = 0`` means round(8/3 *
    d_model) up to a multiple of 64. ``lora_mixer`` wraps the projections of chosen mixers with
    routed LoRA experts. ``kernels``: compute path of every op (``auto`` picks Triton
    on CUDA, or fla-core's kernels for Gated DeltaNet and Lightning where installed, and torch
    elsewhere; ``fla``: fla-core's kernels for those two, ``pip install -e ".[fla]"``), resolved
    once at model build into the kernel plan
    (:mod:`lctrain.kernels.plan`). ``kernel_plan_device``: the device type the plan is resolved
    for (``auto``: the run's device; ``cuda`` on a CPU machine runs the CUDA plan with the Triton
    kernels under ``TRITON_INTERPRET=1``, for tests). ``activation_checkpointing``: recompute each block in backward
    (applied from outside by the parallel package's ``parallelize()``). ``parallel_block``: each block
    computes ``x + mixer(norm(x)) + ffn(norm(x))`` (parallel layers, GPT-J / PaLM) instead of the
    sequential pre-norm residual pair. ``loss_chunk_size``: > 0 computes the training loss from the
    final hidden states ``loss_chunk_size`` tokens at a time, recomputing each chunk's logits in
    backward (:mod:`lctrain.kernels.cross_entropy`), so the ``[tokens, vocab]`` logits, their
    log-softmax and gradient never exist whole; 0 materialises the logits.
    """

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    layer_pattern: str = "GGGA"
    final_layers: str = ""
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    ffn_hidden_size: int = 0
    kernels: str = "auto"
    kernel_plan_device: str = "auto"
    activation_checkpointing: bool = False
    parallel_block: bool = False
    loss_chunk_size: int = 0
    attn: AttentionConfig = field(default_factory=AttentionConfig)
    gdn: GatedDeltaNetConfig = field(default_factory=GatedDeltaNetConfig)
    lightning: LightningConfig = field(default_factory=LightningConfig)
    moba: MoBAConfig = field(default_factory=MoBAConfig)
    moh: MoHConfig = field(default_factory=MoHConfig)
    moa: MoAConfig = field(default_factory=MoAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    lora_mixer: LoRAMixerConfig = field(default_factory=LoRAMixerConfig)


# Flat model keys of lctrain <= 0.1 and where each lives now (a recipe or override using one fails
# with this message instead of a bare "unknown key").
RENAMED_KEYS: dict[str, str] = {
    "model.num_heads": "model.attn.num_heads (and model.lightning.num_heads for L layers)",
    "model.num_kv_heads": "model.attn.num_kv_heads",
    "model.head_dim": "model.attn.head_dim (and model.lightning.head_dim for L layers)",
    "model.rope_theta": "model.attn.rope_theta",
    "model.attn_output_gate": "model.attn.output_gate",
    "model.gdn_num_heads": "model.gdn.num_heads",
    "model.gdn_head_dim": "model.gdn.head_dim",
    "model.gdn_expand_v": "model.gdn.expand_v",
    "model.conv_size": "model.gdn.conv_size",
    "model.chunk_size": "model.gdn.chunk_size (and model.lightning.chunk_size for L layers)",
}


@dataclass
class DataConfig:
    """Corpus, tokenizer and packing.

    ``path``: a built-in corpus name (``pd_english``), a local file or directory
    (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.txt``, ``.parquet``), ``hf:<owner/name>`` for a
    Hugging Face hub dataset (needs network), or ``megatron:PREFIX`` / ``megatron:W1,PREFIX_1,W2,PREFIX_2``
    for Megatron indexed datasets (``.bin`` / ``.idx`` from ``launch/preprocess.py`` or Megatron-LM;
    :mod:`lctrain.data.megatron`).
    """

    path: str = "pd_english"
    text_key: str = "text"
    split: str = "train"
    seq_len: int = 512
    val_fraction: float = 0.02
    tokenizer: str = "auto"  # "auto": train a sentencepiece BPE on the corpus and cache it, or a .model path
    cache_dir: str = ""  # default: <out_dir>/../.cache/data, shared by runs
    seed: int = 1234
    # document selection by metadata field, e.g. "author=William Shakespeare" (syntax: lctrain.data.corpus.FILTER_SYNTAX);
    # each '|' alternative gets its own val_fraction split. Empty: every document.
    filter: str = ""


@dataclass
class ParallelConfig:
    """Device mesh. ``dp_degree = -1`` takes all ranks not used by other axes."""

    dp_degree: int = -1
    dp_impl: str = "ddp"  # ddp | fsdp | deepspeed (ZeRO, keys zero_* / offload_* below)
    cp_degree: int = 1
    cp_impl: str = "ring"  # ring | ulysses | usp
    ulysses_degree: int = 1
    ep_degree: int = 1
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    # DeepSpeed ZeRO (dp_impl=deepspeed only; the parallel package's deepspeed module generates the DeepSpeed
    # config from these keys and train.* / optim.*, see docs/deepspeed_megatron.md). Sizes count elements.
    zero_stage: int = 2  # 1 (optimizer states partitioned) | 2 (+ gradients) | 3 (+ parameters)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and fp32 master weights on CPU
    offload_params: bool = False  # parameters on CPU between uses (zero_stage=3 only)
    zero_reduce_bucket_size: int = 500_000_000  # gradient reduce / reduce-scatter bucket
    zero_allgather_bucket_size: int = 500_000_000  # stages 1-2: parameter all-gather bucket after the step
    zero_prefetch_bucket_size: int = 50_000_000  # stage 3: parameters prefetched ahead of their use
    zero_param_persistence_threshold: int = 100_000  # stage 3: parameters smaller than this stay whole on every rank


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay (Loshchilov & Hutter, 2019) and an LR schedule.

    ``schedule``: ``cosine`` (linear warmup, cosine decay to ``min_lr_ratio * lr``), ``wsd``
    (warmup-stable-decay: linear warmup, constant, then linear decay over the last
    ``decay_fraction`` of steps), or ``constant`` (warmup then constant).
    """

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    fused: str = "auto"  # auto | true | false


@dataclass
class TrainConfig:
    """Run length, batch, checkpoints and logging.

    ``global_batch_size`` and ``micro_batch_size`` count sequences of ``data.seq_len`` tokens, as
    in Megatron: each optimizer step consumes ``global_batch_size`` sequences, split over the
    data-parallel ranks and ``global_batch_size / (micro_batch_size * dp)`` accumulation steps.
    Evaluation reads the first ``eval_batches * micro_batch_size`` validation windows, shared
    out over the data-parallel ranks, so the validation loss is the same at any world size.
    """

    max_steps: int = 200
    out_dir: str = "runs/default"
    seed: int = 0
    global_batch_size: int = 16
    micro_batch_size: int = 8
    checkpoint_every: int = 100
    # write a checkpoint at the end of the run (false: only the checkpoint_every ones, e.g. for benchmarks)
    save_final: bool = True
    keep_last: int = 2
    resume: str = "auto"  # auto | none | <path to a checkpoint directory>
    # crc32 of every checkpoint file in its COMPLETE marker, verified on resume (false: sizes only)
    checkpoint_checksum: bool = True
    # SIGTERM / SIGUSR1: every rank finishes the step, saves a checkpoint and exits with code 4
    save_on_signal: bool = True
    # under torchrun: a rank exits (code 6) when its launcher process dies, instead of training on
    exit_with_parent: bool = True
    # resume even though the corpus, tokenizer or packing differ from the checkpoint's (warning)
    allow_data_change: bool = False
    # fix glibc's mmap threshold (MiB) so freed activations leave the process (lctrain.train.host_memory); 0: glibc's
    malloc_mmap_threshold_mib: int = 4
    # CPU: hand the heap's free pages back to the system before each backward (glibc malloc_trim; host_memory)
    malloc_trim: bool = True
    eval_every: int = 50
    eval_batches: int = 4
    # names of lctrain.eval tasks run at each evaluation ("mqar", "passkey?lengths=256,512", ...)
    eval_tasks: list[str] = field(default_factory=list)
    log_every: int = 1
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    nan_policy: str = "stop"  # stop | skip
    tensorboard: bool = True
    progress: bool = True
    compile: bool = False  # torch.compile each block (applied by parallelize, before data parallelism)
    compile_backend: str = "inductor"  # inductor | aot_eager | eager (torch.compile backends)
    # rank 0 draws out_dir/curves.png (losses, learning rate, routing balance, eval tasks) at each checkpoint and
    # at the end, from out_dir/metrics.jsonl (lctrain.train.curves)
    curves: bool = True
    # Weights & Biases (pip install -e ".[wandb]"): rank 0 logs the TensorBoard scalars and the resolved config;
    # a resumed run continues the W&B run whose id is in out_dir/wandb_run_id (lctrain.train.wandb_logger)
    wandb: bool = False
    wandb_project: str = "lctrain"
    wandb_name: str = ""  # "" = the name of train.out_dir
    wandb_mode: str = "online"  # online | offline (files under out_dir/wandb, `wandb sync` later) | disabled


@dataclass
class RunConfig:
    """A whole run: the five recipe sections plus the recipe and scale names."""

    recipe: str = ""
    scale: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)  # BAM / BTX pipeline (launch/upcycle.py)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.kernels": ("auto", "triton", "torch", "fla"),
    "model.kernel_plan_device": ("auto", "cpu", "cuda"),
    "parallel.dp_impl": ("ddp", "fsdp", "deepspeed"),
    "parallel.cp_impl": ("ring", "ulysses", "usp"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "optim.fused": ("auto", "true", "false"),
    "train.dtype": ("auto", "fp32", "bf16"),
    "train.nan_policy": ("stop", "skip"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "train.wandb_mode": ("online", "offline", "disabled"),
}

CP_IMPLS = ("ring", "ulysses", "usp")


def available_recipes(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    """Names of the recipes in ``recipes_dir`` (YAML files at its top level)."""
    return sorted(p.stem for p in recipes_dir.glob("*.yaml"))


def available_scales(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    """Names of the scale presets in ``recipes_dir/scale``."""
    return sorted(p.stem for p in (recipes_dir / "scale").glob("*.yaml"))


def _flat_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            keys += _flat_keys(value, name + ".")
        else:
            keys.append(name)
    return keys


def _section_keys(section: str) -> list[str]:
    obj: Any = RunConfig()
    for part in section.split(".") if section else []:  # nested sections such as model.moe
        obj = getattr(obj, part, None)
    if obj is None or not dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(RunConfig)]
    return [f.name for f in dataclasses.fields(obj)]


def _friendly(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", "") or ""
    msg = getattr(err, "msg", str(err)).split("\n")[0]
    if key in RENAMED_KEYS:
        return ConfigError(f"'{key}' in {source} was renamed: use {RENAMED_KEYS[key]}")
    if "not in" in msg or "Key '" in msg and "not" in msg:
        section = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = ", ".join(_section_keys(section))
        where = f"section '{section}'" if section else "the top level"
        return ConfigError(f"unknown key '{key}' in {source}; keys allowed in {where}: {allowed}")
    return ConfigError(f"bad value for '{key}' in {source}: {msg}")


def _load_yaml(path: Path, what: str) -> Any:
    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors come from the yaml library
        raise ConfigError(f"cannot parse {what} {path}: {e}") from e


def _merge(base: Any, other: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        raise _friendly(e, source) from e


def _recipe_path(name: str, recipes_dir: Path) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = recipes_dir / f"{name}.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError(
        f"unknown recipe '{name}'; available recipes: {', '.join(available_recipes(recipes_dir))} "
        f"(or a path to a .yaml file)"
    )


def load_config(args: list[str], recipes_dir: Path = RECIPES_DIR) -> RunConfig:
    """Build a validated :class:`RunConfig` from ``recipe=NAME scale=NAME key=value ...``.

    Args:
        args: command-line style items. ``recipe=`` names a file in ``recipes_dir`` (or a path to
            a YAML file); ``scale=`` a file in ``recipes_dir/scale``; every other item is a dotted
            key such as ``train.max_steps=100``.
        recipes_dir: where recipes live (default: the package's ``lctrain/recipes/``).

    Returns:
        The merged, validated configuration as dataclasses.

    Raises:
        ConfigError: unknown recipe/scale/key, wrong type, or an impossible value.
    """
    recipe = None
    scale = None
    overrides: list[str] = []
    for item in args:
        if "=" not in item:
            raise ConfigError(f"argument '{item}' is not of the form key=value (e.g. train.max_steps=100)")
        key, value = item.split("=", 1)
        if key == "recipe":
            recipe = value
        elif key == "scale":
            scale = value
        else:
            overrides.append(item)
    if recipe is None:
        raise ConfigError(f"no recipe given; pass recipe=NAME, one of: {', '.join(available_recipes(recipes_dir))}")

    schema = OmegaConf.structured(RunConfig)
    path = _recipe_path(recipe, recipes_dir)
    cfg = _merge(schema, _load_yaml(path, "recipe"), f"recipe {path.name}")
    cfg.recipe = path.stem
    scale = scale if scale is not None else cfg.scale
    if scale:
        spath = recipes_dir / "scale" / f"{scale}.yaml"
        if not spath.exists():
            raise ConfigError(f"unknown scale '{scale}'; available scales: {', '.join(available_scales(recipes_dir))}")
        cfg = _merge(cfg, _load_yaml(spath, "scale"), f"scale {spath.name}")
        cfg.scale = scale
    try:
        cli = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e}") from e
    cfg = _merge(cfg, cli, "command-line overrides")
    run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(run)
    return run


def _require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"invalid {key}={value!r}: {allowed}")


def check_cp_layout(cp_degree: int, cp_impl: str, ulysses_degree: int, seq_len: int | None = None) -> int:
    """Check the mixer-independent part of a context-parallel layout; return the Ulysses degree ``U``.

    Args:
        cp_degree: P.
        cp_impl: ``ring`` (U = 1) | ``ulysses`` (U = P) | ``usp`` (U = ``ulysses_degree``).
        ulysses_degree: ``parallel.ulysses_degree``.
        seq_len: tokens of one sequence (must split into ``2P`` zigzag chunks).

    Raises:
        ConfigError: the message names the key to change and a value that works.
    """
    if cp_impl not in CP_IMPLS:
        raise ConfigError(f"parallel.cp_impl={cp_impl!r}: allowed values are {', '.join(CP_IMPLS)}")
    P = cp_degree
    if cp_impl == "ring":
        U = 1
    elif cp_impl == "ulysses":
        if ulysses_degree not in (1, P):
            raise ConfigError(
                f"parallel.cp_impl=ulysses uses all parallel.cp_degree={P} ranks for the all-to-all; "
                f"leave parallel.ulysses_degree=1 (or {P}), or use parallel.cp_impl=usp for a 2-D split"
            )
        U = P
    else:
        U = ulysses_degree
        if P % U:
            divisors = [d for d in range(1, P + 1) if P % d == 0]
            raise ConfigError(
                f"parallel.ulysses_degree={U} must divide parallel.cp_degree={P} (cp_impl=usp: Ulysses inside, "
                f"ring across); choose one of {divisors}"
            )
    if seq_len is not None and P > 1 and seq_len % (2 * P):
        raise ConfigError(
            f"data.seq_len={seq_len} must be a multiple of 2 x parallel.cp_degree = {2 * P} (zigzag load balancing "
            f"cuts each sequence into {2 * P} chunks); e.g. data.seq_len={2 * P * max(1, round(seq_len / (2 * P)))}"
        )
    return U


def check_mixers_context_parallel(m: ModelConfig, cp_degree: int, cp_impl: str, ulysses_degree: int,
                                  seq_len: int) -> None:
    """Layout checks of every mixer in ``m.layer_pattern`` (their ``check_context_parallel`` hooks).

    Raises:
        ConfigError: from :func:`check_cp_layout` or a mixer section's hook.
    """
    U = check_cp_layout(cp_degree, cp_impl, ulysses_degree, seq_len)
    for letter in dict.fromkeys(m.layer_pattern + m.final_layers):
        spec = MIXERS[letter]
        section = mixer_config(m, spec)
        hook = getattr(section, "check_context_parallel", None)
        if hook is not None:
            hook(cp_degree=cp_degree, cp_impl=cp_impl, ulysses_degree=U, seq_len=seq_len,
                 prefix=f"model.{spec.section}")


def check_mixers_kernel_limits(m: ModelConfig, choice: dict[str, str]) -> None:
    """Start-up checks of every mixer in ``m.layer_pattern`` against the kernels the plan picked.

    Each mixer section's ``check_kernel_limits(choice, prefix)`` hook compares its sizes with the
    limits of :mod:`lctrain.kernels.limits` (head dims, chunk sizes), so a limit that only a GPU
    kernel has stops the run before anything is built.

    Args:
        m: the model section.
        choice: :attr:`lctrain.kernels.plan.KernelPlan.choice` (op name -> ``triton`` | ``torch``).

    Raises:
        ConfigError: naming the key, its limit and the alternative.
    """
    for letter in dict.fromkeys(m.layer_pattern + m.final_layers):
        spec = MIXERS[letter]
        hook = getattr(mixer_config(m, spec), "check_kernel_limits", None)
        if hook is not None:
            hook(choice, prefix=f"model.{spec.section}")


def _check_kernel_limits(m: ModelConfig) -> None:
    """The kernel plan's limits for the target device (``model.kernel_plan_device``; ``auto``: CUDA
    when this process sees a GPU), checked with the rest of the config (the trainer checks again
    with the run's device)."""
    target = m.kernel_plan_device
    if target == "auto":
        target = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        plan = resolve_kernel_plan(m.kernels, target, expert_impl=m.moe.expert_impl)
    except (ImportError, ValueError) as e:  # e.g. triton or fla-core missing, fla on a CPU target
        raise ConfigError(f"model.kernels={m.kernels}: {e}") from None
    check_mixers_kernel_limits(m, plan.choice)


WANDB_INSTALL_HINT = 'pip install -e ".[wandb]" (or pip install wandb)'


def check_wandb_installed() -> None:
    """Raise :class:`ConfigError` (naming the ``wandb`` extra) when the wandb package cannot be imported.

    Called by :func:`validate` for ``train.wandb=true``, so the run stops at start-up, and by
    :class:`lctrain.train.wandb_logger.WandbRun`.
    """
    try:
        found = importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):  # a broken install, or sys.modules["wandb"] = None
        found = False
    if not found:
        raise ConfigError(
            f"train.wandb=true needs the wandb package, which is not installed: {WANDB_INSTALL_HINT}; "
            f"or set train.wandb=false"
        )


def validate(cfg: RunConfig) -> None:
    """Check values types cannot express; raise :class:`ConfigError` naming the key and allowed values.

    Shared keys are checked here; each mixer section used by ``model.layer_pattern`` (and
    ``model.moe``) by its own ``validate`` next to its layer.
    """
    # optim.fused=true reaches a str field as 'True' (OmegaConf parses the literal first)
    cfg.optim.fused = str(cfg.optim.fused).lower()
    for key, choices in CHOICES.items():
        *path, name = key.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part)
        value = getattr(obj, name)
        _require(value in choices, key, value, f"allowed values are {', '.join(choices)}")
    m, d, p, o, t = cfg.model, cfg.data, cfg.parallel, cfg.optim, cfg.train
    for key, value in [
        ("model.vocab_size", m.vocab_size), ("model.d_model", m.d_model), ("model.n_layers", m.n_layers),
        ("data.seq_len", d.seq_len),
        ("train.max_steps", t.max_steps), ("train.global_batch_size", t.global_batch_size),
        ("train.micro_batch_size", t.micro_batch_size), ("train.keep_last", t.keep_last),
        ("train.log_every", t.log_every), ("parallel.cp_degree", p.cp_degree),
        ("parallel.ulysses_degree", p.ulysses_degree), ("parallel.ep_degree", p.ep_degree),
    ]:
        _require(value >= 1, key, value, "must be a positive integer")
    bad = sorted(set(m.layer_pattern) - set(MIXERS))
    _require(bool(m.layer_pattern) and not bad, "model.layer_pattern", m.layer_pattern,
             "letters allowed: " + describe_mixers())
    _require(
        m.n_layers % len(m.layer_pattern) == 0, "model.n_layers", m.n_layers,
        f"must be a multiple of len(model.layer_pattern)={len(m.layer_pattern)} ('{m.layer_pattern}')",
    )
    bad = sorted(set(m.final_layers) - set(MIXERS))
    _require(not bad and len(m.final_layers) <= m.n_layers, "model.final_layers", m.final_layers,
             f"letters allowed: {describe_mixers()}; at most model.n_layers={m.n_layers} of them")
    for letter in dict.fromkeys(m.layer_pattern + m.final_layers):  # each mixer section in use, validated by its layer
        spec = MIXERS[letter]
        mixer_config(m, spec).validate(prefix=f"model.{spec.section}")
    m.moe.validate(m.n_layers)
    _check_kernel_limits(m)  # after the sections that name kernels (model.moe.expert_impl)
    m.lora_mixer.validate()
    _require(m.ffn_hidden_size >= 0, "model.ffn_hidden_size", m.ffn_hidden_size, "must be >= 0 (0 = 8/3 d_model)")
    _require(m.loss_chunk_size >= 0, "model.loss_chunk_size", m.loss_chunk_size,
             "must be >= 0 (0 = whole logits; > 0 = tokens per chunk of the chunked loss)")
    _require(0.0 <= d.val_fraction < 0.5, "data.val_fraction", d.val_fraction, "must be in [0, 0.5)")
    _require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _require(0.0 < o.decay_fraction <= 1.0, "optim.decay_fraction", o.decay_fraction, "must be in (0, 1]")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    _require(
        t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size", t.global_batch_size,
        f"must be a multiple of train.micro_batch_size={t.micro_batch_size} (times the data-parallel degree)",
    )
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every, "must be >= 0 (0 = only at the end)")
    _require(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0 = only at the end)")
    _require(0 <= t.malloc_mmap_threshold_mib <= 32, "train.malloc_mmap_threshold_mib", t.malloc_mmap_threshold_mib,
             "must be in [0, 32] MiB (0 keeps glibc's dynamic threshold)")
    _require(t.eval_batches >= 1, "train.eval_batches", t.eval_batches,
             "must be >= 1 (to skip validation set data.val_fraction=0)")
    _require(t.resume in ("auto", "none") or Path(t.resume).is_dir(), "train.resume", t.resume,
             "allowed values are auto (the newest complete checkpoint of train.out_dir, if any), none, or the path "
             "of an existing checkpoint directory (e.g. runs/x/checkpoints/step_00000100)")
    check_data_path(d.path)  # by its source in lctrain.data.sources.SOURCES, the table build_data reads
    if t.wandb:
        check_wandb_installed()  # ConfigError naming the extra
    _require(p.dp_degree == -1 or p.dp_degree >= 1, "parallel.dp_degree", p.dp_degree, "must be -1 (auto) or >= 1")
    if p.cp_degree > 1 or p.ulysses_degree > 1:  # zigzag chunks, Ulysses head split, conv halo
        check_mixers_context_parallel(m, p.cp_degree, p.cp_impl, p.ulysses_degree, d.seq_len)
    if p.ep_degree > 1:
        _require(m.moe.num_experts > 0, "parallel.ep_degree", p.ep_degree,
                 "expert parallelism needs an MoE model: set model.moe.num_experts > 0 or parallel.ep_degree=1")
        _require(m.moe.num_experts % p.ep_degree == 0, "parallel.ep_degree", p.ep_degree,
                 f"must divide model.moe.num_experts={m.moe.num_experts} (each EP rank holds num_experts / "
                 f"ep_degree experts); pick ep_degree among "
                 f"{[d for d in range(1, m.moe.num_experts + 1) if m.moe.num_experts % d == 0]}")
        _require(p.dp_impl == "ddp", "parallel.dp_impl", p.dp_impl,
                 f"parallel.ep_degree={p.ep_degree} needs parallel.dp_impl=ddp (expert weights are excluded from DDP "
                 f"and reduced over their expert-data-parallel group); "
                 + ("DeepSpeed ZeRO would partition and average the expert shards as if they were replicated, so "
                    "EP with parallel.dp_impl=deepspeed is refused" if p.dp_impl == "deepspeed"
                    else "FSDP with EP is not supported yet"))
    _validate_deepspeed(p)
    _require(not (m.loss_chunk_size and p.dp_impl == "deepspeed" and p.zero_stage == 3), "model.loss_chunk_size",
             m.loss_chunk_size, "the chunked loss reads lm_head.weight outside lm_head's forward, which ZeRO-3 "
             "partitions; use model.loss_chunk_size=0 with parallel.zero_stage=3 (or stage 1-2, DDP or FSDP)")


def _validate_deepspeed(p: ParallelConfig) -> None:
    """The ``parallel.zero_*`` / ``offload_*`` keys (used by ``parallel.dp_impl=deepspeed`` only)."""
    _require(p.zero_stage in (1, 2, 3), "parallel.zero_stage", p.zero_stage, "allowed values are 1, 2, 3")
    for key in ("zero_reduce_bucket_size", "zero_allgather_bucket_size", "zero_prefetch_bucket_size"):
        _require(getattr(p, key) >= 1, f"parallel.{key}", getattr(p, key), "must be a positive number of elements")
    _require(p.zero_param_persistence_threshold >= 0, "parallel.zero_param_persistence_threshold",
             p.zero_param_persistence_threshold, "must be >= 0 (elements)")
    if p.dp_impl != "deepspeed":
        for key in ("offload_optimizer", "offload_params"):
            _require(not getattr(p, key), f"parallel.{key}", getattr(p, key),
                     f"CPU offload is a DeepSpeed ZeRO feature: set parallel.dp_impl=deepspeed (now {p.dp_impl})")
        return
    _require(not p.offload_params or p.zero_stage == 3, "parallel.offload_params", p.offload_params,
             f"parameter offload needs parallel.zero_stage=3 (now {p.zero_stage}); with stages 1-2 use "
             f"parallel.offload_optimizer=true")
    _require(p.cp_degree == 1, "parallel.cp_degree", p.cp_degree,
             "context parallelism is not supported with parallel.dp_impl=deepspeed yet; use parallel.dp_impl=ddp "
             "or fsdp with parallel.cp_degree > 1")


def to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict of a config (for logging and checkpoints)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML text (written to the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
