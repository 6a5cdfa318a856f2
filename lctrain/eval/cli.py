"""Command lines: ``launch/eval.py`` (evaluation tasks) and ``launch/generate.py`` (try a model).

Evaluation::

    python launch/eval.py run=RUN_DIR task=NAME[,NAME...] [checkpoint=PATH|latest|none] [out=DIR]
                          [device=auto|cpu|cuda] [dtype=fp32|bf16] [key=value ...] [TASK.key=value ...]

``key=value`` sets that parameter of every listed task that has it (an error if none has it);
``TASK.key=value`` sets it for one task. Lists are comma-separated (``passkey.lengths=256,512``).
Writes ``<task>.json`` and ``<task>.png`` to ``out`` (default ``RUN_DIR/eval``) and prints the
headline figures. Tasks and parameters: ``python launch/eval.py --help``. Data-parallel:
``torchrun --nproc_per_node=N launch/eval.py ...`` loads the model on every rank (``cuda:LOCAL_RANK``
on GPUs, gloo on CPU), each rank scores every N-th batch or example and rank 0 writes the merged
results, which equal a single process's (up to the order of floating-point sums).

Generation::

    python launch/generate.py run=RUN_DIR prompt="..." [checkpoint=PATH] [max_new_tokens=64]
                              [temperature=0.8] [top_k=0] [top_p=0.95] [num_samples=1] [seed=0]
                              [prefill_chunk=0] [device=auto] [dtype=fp32]

prints the prompt's continuation(s) (``temperature=0``: greedy). For a synthetic run the prompt
is token ids separated by spaces. Exit codes of both: 0 done, 2 bad arguments, configuration or
input (the message says which).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lctrain.errors import ConfigError


def _parse(argv: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in argv:
        if "=" not in item:
            raise ConfigError(f"argument '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if key in out:
            raise ConfigError(f"'{key}' is given twice")
        out[key] = value
    return out


def _help_tasks() -> str:
    from lctrain.eval.tasks import TASKS

    lines = ["tasks:"]
    for t in TASKS.values():
        params = ", ".join(f"{k}={v}" for k, v in t.defaults.items())
        lines.append(f"  {t.name}: {t.description}\n      {params}")
    return "\n".join(lines)


def split_task_params(names: list[str], params: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """Assign command-line ``key=value`` / ``TASK.key=value`` parameters to the tasks ``names``.

    Raises:
        ConfigError: unknown task, a parameter no listed task has, or ``TASK.key`` for a task not listed.
    """
    from lctrain.eval.tasks import get_task

    for n in names:
        get_task(n)
    specs: list[tuple[str, dict[str, str]]] = [(n, {}) for n in dict.fromkeys(names)]
    by_name = dict(specs)
    for key, value in params.items():
        if "." in key:
            task, _, sub = key.partition(".")
            if task not in names:
                raise ConfigError(f"'{key}': task '{task}' is not among task={','.join(names)}")
            if sub not in get_task(task).defaults:
                raise ConfigError(f"task '{task}' has no parameter '{sub}'; its parameters: "
                                  f"{', '.join(get_task(task).defaults)}")
            by_name[task][sub] = value
            continue
        takers = [n for n in names if key in get_task(n).defaults]
        if not takers:
            raise ConfigError(f"no task among {', '.join(names)} has a parameter '{key}'\n{_help_tasks()}")
        for n in takers:
            by_name[n][key] = value
    return specs


def eval_main(argv: list[str]) -> int:
    """``launch/eval.py``: run tasks on a trained run; returns the exit code."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\n" + _help_tasks())
        return 0
    from lctrain.eval.run import load_run
    from lctrain.eval.tasks import get_task, run_tasks

    world = 1
    try:
        args = _parse(argv)
        run_dir = args.pop("run", None)
        names = [n for n in args.pop("task", "").split(",") if n]
        if not run_dir or not names:
            raise ConfigError("pass run=RUN_DIR and task=NAME[,NAME...] (see --help)")
        checkpoint = args.pop("checkpoint", None)
        out = Path(args.pop("out", "") or Path(run_dir) / "eval")
        device, dtype = args.pop("device", "auto"), args.pop("dtype", "fp32")
        specs = split_task_params(names, args)
        t0 = time.perf_counter()
        from lctrain.config import ParallelConfig
        from lctrain.parallel.mesh import init_distributed

        env = init_distributed(ParallelConfig())  # torchrun's ranks (NCCL on GPUs, gloo on CPU), or one process
        rank, world = env.rank, env.world_size
        if world > 1 and env.device.type == "cuda" and device in ("auto", "cuda"):
            device = str(env.device)  # this rank's GPU
        run = load_run(run_dir, checkpoint, device, dtype)
        meta = {"run": str(run_dir), "checkpoint": str(run.checkpoint) if run.checkpoint else None, "step": run.step,
                "world_size": world}
        say = print if rank == 0 else (lambda *a, **k: None)
        say(f"[lctrain eval] {run_dir} step {run.step} ({run.checkpoint or 'initial weights'}), "
            f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f} M parameters, {world} rank(s)", flush=True)
        ctx = run.context()
        ctx.rank, ctx.world = rank, world
        for name, given in specs:
            t1 = time.perf_counter()
            (r,) = run_tasks(ctx, [(name, given)], out_dir=out if rank == 0 else None, meta=meta)
            head = ", ".join(f"{k} {r.result[k]:.4g}" for k in get_task(name).headline if k in r.result)
            say(f"[lctrain eval] {name}: {head} ({time.perf_counter() - t1:.1f}s) -> "
                f"{', '.join(str(f) for f in r.files)}", flush=True)
        say(f"[lctrain eval] done in {time.perf_counter() - t0:.1f}s", flush=True)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if world > 1:
            from lctrain.parallel.mesh import destroy

            destroy()
    return 0


def generate_main(argv: list[str]) -> int:
    """``launch/generate.py``: sample continuations of a prompt from a trained run; returns the exit code."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    import torch

    from lctrain.data.synthetic import SyntheticTokenizer, coerce
    from lctrain.eval.run import load_run
    from lctrain.generate import generate

    defaults = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 0, "top_p": 0.95, "num_samples": 1, "seed": 0,
                "prefill_chunk": 0}
    try:
        args = _parse(argv)
        run_dir, prompt = args.pop("run", None), args.pop("prompt", None)
        if not run_dir or prompt is None:
            raise ConfigError('pass run=RUN_DIR and prompt="..." (see --help)')
        checkpoint = args.pop("checkpoint", None)
        device, dtype = args.pop("device", "auto"), args.pop("dtype", "fp32")
        opts = dict(defaults)
        for key, value in args.items():
            if key not in defaults:
                raise ConfigError(f"unknown argument '{key}'; allowed: run, prompt, checkpoint, device, dtype, "
                                  f"{', '.join(defaults)}")
            opts[key] = coerce(value, defaults[key], key)
        run = load_run(run_dir, checkpoint, device, dtype)
        ids = run.tokenizer.encode(prompt)
        if not ids:
            raise ConfigError("the prompt encodes to no tokens")
        dev = next(run.model.parameters()).device
        gen = torch.Generator(device=dev).manual_seed(opts["seed"])
        batch = torch.tensor([ids] * max(1, opts["num_samples"]), dtype=torch.int64, device=dev)
        t0 = time.perf_counter()
        out = generate(run.model, batch, opts["max_new_tokens"], temperature=opts["temperature"], top_k=opts["top_k"],
                       top_p=opts["top_p"], eos_id=run.tokenizer.eos_id, generator=gen,
                       prefill_chunk=opts["prefill_chunk"])
        dt = time.perf_counter() - t0
        print(f"[lctrain generate] {run_dir} step {run.step}, prompt {len(ids)} tokens, "
              f"{out.shape[1] - len(ids)} new tokens x {batch.shape[0]} in {dt:.2f}s", file=sys.stderr, flush=True)
        sep = " " if isinstance(run.tokenizer, SyntheticTokenizer) else ""  # ids are space-separated there
        for i in range(batch.shape[0]):
            if batch.shape[0] > 1:
                print(f"--- sample {i + 1}")
            print(prompt + sep + run.tokenizer.decode(out[i, len(ids):].tolist()), flush=True)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
