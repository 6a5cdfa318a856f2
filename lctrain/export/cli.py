"""Command lines of ``launch/export.py`` (lctrain run -> transformers) and ``launch/import_hf.py`` (back).

Export::

    python launch/export.py run=RUN_DIR out=DIR [checkpoint=PATH] [dtype=fp32|bf16] [tokenizer=auto|none|PATH]
                            [max_shard_size=5GB] [max_position_embeddings=N]

writes a ``Qwen3NextForCausalLM`` directory (``config.json``, safetensors weights, tokenizer)
from the newest complete checkpoint of ``RUN_DIR`` (or ``checkpoint``; any DDP / FSDP / expert-
parallel / ZeRO-3 DCP checkpoint: DCP stores global tensors, read in one process).
``tokenizer=auto`` takes the run's SentencePiece model (``data.tokenizer``, or the cached one the
trainer built; none for synthetic data); ``max_position_embeddings`` defaults to the run's
``data.seq_len`` (at least 4096).

Import::

    python launch/import_hf.py path=HF_DIR out=RUN_DIR [recipe=qwen3_next] [key=value ...]

writes ``RUN_DIR/checkpoints/step_00000000`` (weights, fresh optimizer state, step 0),
``RUN_DIR/config.yaml`` and ``RUN_DIR/recipe.yaml``: ``python launch/train.py
recipe=RUN_DIR/recipe.yaml`` (or torchrun) continues training from it (``train.resume=auto``),
``launch/eval.py run=RUN_DIR`` evaluates it. The model section comes from ``config.json``; the
other sections from ``recipe`` (scale presets are not applied) and the ``key=value`` overrides
(``data.path=...``, ``train.max_steps=...``; ``model.kernels`` and other ``model.*`` keys that do
not change shapes). A SentencePiece ``tokenizer.model`` in ``HF_DIR`` is copied to
``RUN_DIR/tokenizer.model`` and becomes ``data.tokenizer``; without one (e.g. Qwen's own
byte-level BPE, which lctrain cannot run) ``data.tokenizer`` stays as the recipe sets it and a
note says so.

Exit codes of both: 0 done, 2 bad arguments, configuration or input (one ``error:`` line naming
the key, the block and option that Qwen3-Next cannot express, or the missing file).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from lctrain.data.synthetic import is_synthetic
from lctrain.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _parse(argv: list[str], allowed: tuple[str, ...] | None) -> tuple[dict[str, str], list[str]]:
    """``key=value`` items: the launcher's own keys, and (``allowed=None`` rest) dotted config overrides."""
    own: dict[str, str] = {}
    rest: list[str] = []
    for item in argv:
        if "=" not in item:
            raise ConfigError(f"argument '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if "." in key:
            rest.append(item)
            continue
        if allowed is not None and key not in allowed:
            raise ConfigError(f"unknown argument '{key}'; allowed: {', '.join(allowed)}")
        if key in own:
            raise ConfigError(f"'{key}' is given twice")
        own[key] = value
    return own, rest


def run_tokenizer(cfg, run_dir: Path, choice: str = "auto") -> Path | None:
    """The SentencePiece model to export with a run: ``choice`` ``none``, a path, or ``auto`` (the run's).

    ``auto``: ``data.tokenizer`` when it is a path; else the tokenizer the trainer cached for this
    corpus (rebuilt deterministically through :func:`lctrain.data.build_data` if the cache is
    gone, in the same cache directory as :func:`lctrain.eval.run.load_run`); None for synthetic
    data (no text tokenizer).

    Raises:
        ConfigError: a given path that does not exist.
    """
    if choice == "none":
        return None
    if choice != "auto":
        p = Path(choice).expanduser()
        if not p.is_file():
            raise ConfigError(f"tokenizer={choice}: no such file (a SentencePiece .model, auto or none)")
        return p
    if is_synthetic(cfg.data.path):
        print("[lctrain export] synthetic data: no text tokenizer to export", flush=True)
        return None
    if cfg.data.tokenizer != "auto":
        return Path(cfg.data.tokenizer).expanduser()
    from lctrain.data import build_data

    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir.parent / ".cache" / "data"
    tok, _, _ = build_data(cfg.data, cfg.data.seq_len, cfg.model.vocab_size, cache_dir)
    return getattr(tok, "path", None)


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | None = None, dtype: str = "fp32",
               tokenizer: str = "auto", max_shard_size: str | int = "5GB",
               max_position_embeddings: int | None = None) -> dict:
    """Export a run's checkpoint as a Qwen3-Next transformers directory; returns a summary dict.

    Raises:
        ConfigError: bad arguments, no run / checkpoint, a checkpoint file that is missing, truncated or
            fails its checksum (named), or a model Qwen3-Next cannot express (checked before any
            weight is read).
    """
    from lctrain.checkpoint import (
        checkpoint_model_config,
        load_model_weights,
        open_checkpoint,
        read_run_config,
        resolve_checkpoint,
    )
    from lctrain.export.qwen3_next import check_exportable, save_pretrained

    if dtype not in DTYPES:
        raise ConfigError(f"invalid dtype={dtype!r}: allowed values are {', '.join(DTYPES)}")
    run_dir = Path(run_dir)
    try:
        cfg = read_run_config(run_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    ckpt = resolve_checkpoint(checkpoint or run_dir, "checkpoint")
    m = checkpoint_model_config(ckpt, "checkpoint")
    check_exportable(m)
    tok = run_tokenizer(cfg, run_dir, tokenizer)
    open_checkpoint(ckpt, "checkpoint")  # sizes and checksums, as resume checks them, before the weights are read
    sd = load_model_weights(ckpt, m)
    ctx = int(max_position_embeddings) if max_position_embeddings else max(cfg.data.seq_len, 4096)
    files = save_pretrained(out, m, sd, dtype=DTYPES[dtype], tokenizer=tok, max_shard_size=max_shard_size,
                            max_position_embeddings=ctx)
    return {"checkpoint": str(ckpt), "out": str(out), "files": files, "tokenizer": str(tok) if tok else None}


def import_hf(path: str | Path, out: str | Path, recipe: str = "qwen3_next", overrides: list[str] | None = None):
    """Turn a Qwen3-Next directory into an lctrain run at step 0; returns ``(RunConfig, checkpoint path)``.

    See the module docstring for what is written. Collective under torchrun (every rank calls it;
    :func:`lctrain.train.init_checkpoint.write_init_checkpoint` writes the checkpoint).

    Raises:
        ConfigError: an inexpressible or inconsistent HF model, bad overrides, or ``out`` already
            holding a checkpoint.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from lctrain.checkpoint import find_latest_checkpoint
    from lctrain.config import load_config, to_yaml, validate
    from lctrain.export.qwen3_next import load_pretrained
    from lctrain.train.init_checkpoint import write_init_checkpoint

    overrides = list(overrides or [])
    out = Path(out)
    if find_latest_checkpoint(out / "checkpoints") is not None:
        raise ConfigError(f"out={out} already holds checkpoints; import into a new directory")
    m, sd, tok, _ = load_pretrained(path)
    model_over = [o[len("model."):] for o in overrides if o.startswith("model.")]
    other = [o for o in overrides if not o.startswith("model.")]
    extra = []
    if tok is not None and not any(o.startswith("data.tokenizer=") for o in other):
        out.mkdir(parents=True, exist_ok=True)
        dst = out / "tokenizer.model"
        shutil.copyfile(tok, dst)
        extra.append(f"data.tokenizer={dst.resolve()}")
    elif tok is None:
        print(f"[lctrain import] {path} has no SentencePiece tokenizer.model: data.tokenizer is left as the recipe "
              f"sets it (lctrain runs SentencePiece tokenizers only)", flush=True)
    cfg = load_config([f"recipe={recipe}", "scale=", *extra, *other, f"train.out_dir={out}"])
    # keys config.json does not carry: the recipe's (training and kernel choices only, no shapes)
    m.kernels, m.activation_checkpointing = cfg.model.kernels, cfg.model.activation_checkpointing
    m.gdn.chunk_size = cfg.model.gdn.chunk_size
    m.moe.z_loss_coeff, m.moe.expert_impl = cfg.model.moe.z_loss_coeff, cfg.model.moe.expert_impl
    try:
        merged = OmegaConf.merge(OmegaConf.structured(m), OmegaConf.from_dotlist(model_over))
        cfg.model = OmegaConf.to_object(merged) if model_over else m
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad model override in {model_over}: {e}") from e
    cfg.scale = ""  # the shapes are the HF model's: a scale preset must not apply again
    validate(cfg)
    ckpt = write_init_checkpoint(cfg, sd)
    header = (f"# written by launch/import_hf.py from {Path(path).resolve()}: "
              f"python launch/train.py recipe=<this file> continues this run\n")
    (out / "recipe.yaml").write_text(header + to_yaml(cfg))
    (out / "config.yaml").write_text(to_yaml(cfg))
    return cfg, ckpt


def export_main(argv: list[str]) -> int:
    """``launch/export.py``; returns the exit code."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from lctrain.cli import run_with_exit_codes

    def run() -> None:
        args, rest = _parse(argv, ("run", "out", "checkpoint", "dtype", "tokenizer", "max_shard_size",
                                   "max_position_embeddings"))
        if rest:
            raise ConfigError(f"unknown arguments {rest}; launch/export.py takes run=, out=, checkpoint=, dtype=, "
                              f"tokenizer=, max_shard_size=, max_position_embeddings=")
        if not args.get("run") or not args.get("out"):
            raise ConfigError("pass run=RUN_DIR and out=DIR (see --help)")
        ctx = args.get("max_position_embeddings")
        if ctx is not None and (not ctx.isdigit() or int(ctx) < 1):
            raise ConfigError(f"invalid max_position_embeddings={ctx!r}: must be a positive integer")
        t0 = time.perf_counter()
        r = export_run(args["run"], args["out"], args.get("checkpoint"), args.get("dtype", "fp32"),
                       args.get("tokenizer", "auto"), args.get("max_shard_size", "5GB"), int(ctx) if ctx else None)
        print(f"[lctrain export] {r['checkpoint']} -> {r['out']} ({', '.join(r['files'])}) in "
              f"{time.perf_counter() - t0:.1f}s; load it with Qwen3NextForCausalLM.from_pretrained({r['out']!r})",
              flush=True)

    return run_with_exit_codes(run)


def import_main(argv: list[str]) -> int:
    """``launch/import_hf.py``; returns the exit code."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from lctrain.cli import run_with_exit_codes

    def run() -> None:
        args, rest = _parse(argv, ("path", "out", "recipe"))
        if not args.get("path") or not args.get("out"):
            raise ConfigError("pass path=HF_DIR and out=RUN_DIR (see --help)")
        t0 = time.perf_counter()
        _, ckpt = import_hf(args["path"], args["out"], args.get("recipe", "qwen3_next"), rest)
        print(f"[lctrain import] {args['path']} -> {ckpt} in {time.perf_counter() - t0:.1f}s; continue with: "
              f"python launch/train.py recipe={Path(args['out']) / 'recipe.yaml'}", flush=True)

    return run_with_exit_codes(run)
