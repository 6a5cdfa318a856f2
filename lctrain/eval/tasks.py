"""Evaluation tasks: ``perplexity``, ``mqar``, ``passkey``, ``niah``; their parameters, runners and results.

Each task is a :class:`Task` in :data:`TASKS` with default parameters (the values' types are
the parameters' types: command-line strings are converted to them), a ``run(ctx, params) ->
result`` function and a ``plot(result, path)`` function. A result is a JSON-ready dict with the
headline figure under a plain key (``loss`` and ``ppl`` for perplexity, ``accuracy`` for the
recall tasks), the parameters used and the breakdowns the plots draw.

Task specs are written ``name`` or ``name?key=value&key=value`` (lists comma-separated), e.g.
``passkey?lengths=256,512&trials=2``; :func:`parse_task_spec` reads them.

Everything is generated from seeds; the same parameters give the same examples on any machine,
so every data-parallel rank can run the same evaluation (see :func:`lctrain.eval.run.run_training_eval`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lctrain.data.synthetic import (
    IGNORE_INDEX,
    STREAMS,
    MQARSpec,
    coerce,
    is_synthetic,
    mqar_batch,
    parse_query,
    parse_synthetic,
)
from lctrain.errors import ConfigError
from lctrain.eval import haystack as hs
from lctrain.eval.scoring import MODES, _device_of, logits_at, score_forced, score_generate


@dataclass
class EvalContext:
    """What the tasks may use.

    Attributes:
        model: ``model(input_ids [B,T]) -> logits [B,T,V]`` (see :mod:`lctrain.eval.scoring`).
        tokenizer: the run's tokenizer (``encode``, ``decode``, ``eos_id``, ``vocab_size``), or None.
        cfg: the run's :class:`lctrain.config.RunConfig`, or None.
        decode_model: the unwrapped :class:`HybridLM` for ``mode=generate`` (None: forced only).
        val_tokens: the run's validation token stream (documents joined by EOS), or None.
        val_dataset: the run's validation dataset (used for synthetic runs), or None.
        cache_dir: the run's data cache (for ``perplexity`` on another ``path``).
        vocab: the model's vocabulary size when there is no config (test doubles); 0 = from the config.
        rank, world: data-parallel evaluation (``torchrun launch/eval.py``): rank ``r`` of ``world``
            scores every ``world``-th batch / example and the partial results are gathered, so
            every rank returns the whole result. The model must then run forwards independently on
            each rank (a plain model per rank, as ``launch/eval.py`` loads it, or a DDP model in
            eval mode); the training hook keeps ``world = 1`` for FSDP, DeepSpeed and expert
            parallelism (their forwards are collective).
    """

    model: Any
    tokenizer: Any = None
    cfg: Any = None
    decode_model: Any = None
    val_tokens: np.ndarray | None = None
    val_dataset: Any = None
    cache_dir: Path | None = None
    vocab: int = 0
    rank: int = 0
    world: int = 1

    def mine(self, n: int) -> range:
        """The indices ``0 .. n-1`` this rank handles: ``rank, rank + world, ...``."""
        return range(self.rank, n, self.world)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (``[obj]`` without data parallelism; collective otherwise)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    @property
    def synthetic_spec(self) -> MQARSpec | None:
        """The MQAR spec of a ``synthetic:mqar`` run, else None."""
        if self.cfg is None or not is_synthetic(self.cfg.data.path):
            return None
        return parse_synthetic(self.cfg.data.path, seq_len=self.cfg.data.seq_len,
                               vocab_size=self.cfg.model.vocab_size, seed=self.cfg.data.seed).spec

    @property
    def seq_len(self) -> int:
        """The run's training sequence length (512 without a config)."""
        return int(self.cfg.data.seq_len) if self.cfg is not None else 512

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size (``vocab``, else from the config, else the tokenizer)."""
        if self.vocab:
            return int(self.vocab)
        if self.cfg is not None:
            return int(self.cfg.model.vocab_size)
        if self.tokenizer is not None:
            return int(self.tokenizer.vocab_size)
        raise ValueError("the vocabulary size is unknown: pass a config or a tokenizer")


@dataclass(frozen=True)
class Task:
    """One evaluation task.

    Attributes:
        name: its name in ``task=``.
        description: one line.
        defaults: parameter name -> default (its type is the parameter's type).
        run: ``run(ctx, params) -> result dict``.
        plot: ``plot(result, png_path) -> None``.
        headline: result keys of the headline figures (logged by the trainer hook).
    """

    name: str
    description: str
    defaults: dict[str, Any]
    run: Callable[[EvalContext, dict], dict]
    plot: Callable[[dict, Path], None]
    headline: tuple[str, ...] = ("accuracy",)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` (replacing one of the same name)."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """Raises ConfigError for an unknown name (listing the known ones)."""
    if name not in TASKS:
        raise ConfigError(f"unknown eval task '{name}'; available: {', '.join(TASKS)}")
    return TASKS[name]


def resolve_params(task: Task, given: dict[str, Any]) -> dict[str, Any]:
    """Defaults updated with ``given`` (strings converted to the default's type).

    Raises:
        ConfigError: an unknown parameter (listing the task's) or a bad value.
    """
    params = dict(task.defaults)
    for key, value in given.items():
        if key not in params:
            raise ConfigError(f"task '{task.name}' has no parameter '{key}'; its parameters: {', '.join(params)}")
        params[key] = coerce(value, params[key], f"{task.name}.{key}") if isinstance(value, str) else value
    if "mode" in params and params["mode"] not in MODES:
        raise ConfigError(f"invalid {task.name}.mode={params['mode']!r}: allowed values are {', '.join(MODES)}")
    return params


def parse_task_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"passkey?lengths=256,512"`` -> ``("passkey", {"lengths": "256,512"})``; checks the name exists.

    Raises:
        ConfigError: unknown task or a malformed query.
    """
    name, _, query = spec.strip().partition("?")
    get_task(name)
    return name, parse_query(query)


def _bucket_edges(n: int, kind: str = "log2") -> list[tuple[int, int]]:
    """Half-open buckets covering ``[0, n)``: ``[0,1), [1,2), [2,4), ...`` (log2) or 8 equal ones (linear)."""
    if kind == "linear":
        step = max(1, -(-n // 8))
        return [(s, min(n, s + step)) for s in range(0, n, step)]
    edges, lo = [], 0
    hi = 1
    while lo < n:
        edges.append((lo, min(hi, n)))
        lo, hi = hi, hi * 2
    return edges


def _accuracy_table(records: list[dict], row: str, col: str) -> dict:
    rows = sorted({r[row] for r in records})
    cols = sorted({r[col] for r in records})
    table = []
    for a in rows:
        line = []
        for b in cols:
            vals = [r["score"] for r in records if r[row] == a and r[col] == b]
            line.append(sum(vals) / len(vals) if vals else None)
        table.append(line)
    return {"rows": rows, "cols": cols, "accuracy": table}


# ------------------------------------------------------------------------------------------ perplexity
def _documents_for_perplexity(ctx: EvalContext, params: dict) -> tuple[list[np.ndarray], str]:
    """Token arrays (each ending with EOS) of the documents to score, and a description of the source."""
    if params["path"]:
        from lctrain.data.corpus import load_documents

        if ctx.tokenizer is None:
            raise ValueError("perplexity on a path needs the run's tokenizer")
        docs = load_documents(params["path"], params["text_key"], cache_dir=ctx.cache_dir)
        if params["max_docs"]:
            docs = docs[: params["max_docs"]]
        eos = ctx.tokenizer.eos_id
        return [np.asarray(ids + [eos], dtype=np.int64) for ids in ctx.tokenizer.encode_batch(docs)], params["path"]
    if ctx.val_tokens is None or len(ctx.val_tokens) == 0:
        raise ValueError("this run has no validation split (data.val_fraction=0?); pass perplexity.path=...")
    stream = np.asarray(ctx.val_tokens, dtype=np.int64)
    ends = np.flatnonzero(stream == ctx.tokenizer.eos_id) + 1
    starts = np.concatenate([[0], ends[:-1]])
    docs = [stream[s:e] for s, e in zip(starts, ends, strict=True) if e - s >= 2]
    return docs, "validation split"


@torch.no_grad()
def run_perplexity(ctx: EvalContext, params: dict) -> dict:
    """Next-token loss per document and by position within the context window.

    Each document (tokens + EOS) is cut into windows of ``seq_len`` inputs (each window a fresh
    context, consecutive windows overlapping by one token like the training windows); every token
    after a window's first is predicted once. ``max_tokens`` caps the predicted tokens (documents
    in order; 0 = no cap). A synthetic run (``data.path=synthetic:...``) is scored on its
    validation examples, counting the labelled (answer) tokens only.
    """
    L = params["seq_len"] or ctx.seq_len
    device = _device_of(ctx.model)
    windows: list[tuple[int, np.ndarray, np.ndarray]] = []  # (doc, inputs, labels)
    budget = params["max_tokens"]
    if ctx.synthetic_spec is not None:
        source = "synthetic validation examples"
        ds = ctx.val_dataset
        n = min(len(ds), params["max_docs"] or len(ds))
        if budget:
            n = min(n, max(1, budget // ds.seq_len))
        for i in range(n):
            item = ds[i]
            windows.append((i, item["input_ids"].numpy(), item["labels"].numpy()))
        L = ds.seq_len
    else:
        docs, source = _documents_for_perplexity(ctx, params)
        if params["max_docs"]:
            docs = docs[: params["max_docs"]]
        used = 0
        for d, toks in enumerate(docs):
            for s in range(0, len(toks) - 1, L):
                w = toks[s:s + L + 1]
                if budget and used + len(w) - 1 > budget:
                    w = w[: budget - used + 1]
                if len(w) < 2:
                    break
                windows.append((d, w[:-1], w[1:]))
                used += len(w) - 1
            if budget and used >= budget:
                break
    if not windows:
        raise ValueError("perplexity: no tokens to score")
    edges = _bucket_edges(L, params["buckets"])
    pos_sum, pos_cnt = np.zeros(L), np.zeros(L)
    doc_sum: dict[int, float] = {}
    doc_cnt: dict[int, int] = {}
    bs = max(1, params["batch_size"])
    starts = list(range(0, len(windows), bs))
    for s in (starts[i] for i in ctx.mine(len(starts))):
        chunk = windows[s:s + bs]
        T = max(len(w[1]) for w in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.int64)
        lab = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.int64)
        for b, (_, x, y) in enumerate(chunk):
            ids[b, :len(x)] = torch.from_numpy(np.ascontiguousarray(x))
            lab[b, :len(y)] = torch.from_numpy(np.ascontiguousarray(y))
        logits = ctx.model(ids.to(device)).float()
        ce = F.cross_entropy(logits.flatten(0, 1), lab.to(device).flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view(len(chunk), T).cpu().double().numpy()
        mask = (lab != IGNORE_INDEX).numpy()
        pos_sum[:T] += (ce * mask).sum(0)
        pos_cnt[:T] += mask.sum(0)
        for b, (d, _, _) in enumerate(chunk):
            doc_sum[d] = doc_sum.get(d, 0.0) + float((ce[b] * mask[b]).sum())
            doc_cnt[d] = doc_cnt.get(d, 0) + int(mask[b].sum())
    if ctx.world > 1:  # every rank's partial sums
        parts = ctx.gather((pos_sum, pos_cnt, doc_sum, doc_cnt))
        pos_sum, pos_cnt = sum(p[0] for p in parts), sum(p[1] for p in parts)
        doc_sum, doc_cnt = {}, {}
        for _, _, ds, dc in parts:
            for d in ds:
                doc_sum[d] = doc_sum.get(d, 0.0) + ds[d]
                doc_cnt[d] = doc_cnt.get(d, 0) + dc[d]
    total, count = float(pos_sum.sum()), float(pos_cnt.sum())
    if count == 0:
        raise ValueError("perplexity: no labelled tokens")
    loss = total / count
    by_pos = []
    for lo, hi in edges:
        c = float(pos_cnt[lo:hi].sum())
        by_pos.append({"start": lo, "end": hi, "tokens": int(c), "loss": float(pos_sum[lo:hi].sum() / c) if c else None})
    per_doc = [{"doc": d, "tokens": doc_cnt[d], "loss": doc_sum[d] / doc_cnt[d],
                "ppl": math.exp(min(doc_sum[d] / doc_cnt[d], 700.0))} for d in sorted(doc_sum) if doc_cnt[d]]
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(count), "num_docs": len(per_doc),
            "source": source, "seq_len": L, "by_position": by_pos, "per_document": per_doc}


# ------------------------------------------------------------------------------------------ mqar
def _mqar_spec(ctx: EvalContext, params: dict) -> MQARSpec:
    base = ctx.synthetic_spec
    spec = MQARSpec(
        vocab=params["vocab"] or (base.vocab if base else ctx.vocab_size),
        num_pairs=params["num_pairs"] or (base.num_pairs if base else 8),
        seq_len=params["seq_len"] or (base.seq_len if base else min(ctx.seq_len, 256)),
        power_a=params["power_a"] if params["power_a"] > 0 else (base.power_a if base else 0.01),
        noise=params["noise"] or (base.noise if base else "random"),
        seed=params["seed"],
    )
    spec.validate(prefix="mqar")
    if spec.vocab > ctx.vocab_size:
        raise ConfigError(f"mqar.vocab={spec.vocab} exceeds the model's vocabulary ({ctx.vocab_size})")
    return spec


@torch.no_grad()
def run_mqar(ctx: EvalContext, params: dict) -> dict:
    """MQAR accuracy: the argmax at each query position must be its key's value (Zoology's metric).

    Parameters left at 0 / empty take the run's ``synthetic:mqar`` values (or vocab = the model's,
    8 pairs, seq_len = min(data.seq_len, 256)); examples come from the evaluation stream, never
    seen in training. Also reports accuracy by key-to-query distance (log2 buckets) and two chance
    levels: uniform over the value half of the vocabulary, and uniform over the ``num_pairs``
    values present in the context.
    """
    spec = _mqar_spec(ctx, params)
    device = _device_of(ctx.model)
    correct = total = 0
    by_dist: dict[int, list[int]] = {}
    n, bs = params["num_examples"], max(1, params["batch_size"])
    starts = list(range(0, n, bs))
    for s in (starts[i] for i in ctx.mine(len(starts))):
        ids, _, examples = mqar_batch(spec, s, min(bs, n - s), STREAMS["eval"])
        rows = [ex.query_pos.tolist() for ex in examples]
        out = logits_at(ctx.model, ids.to(device), rows)
        for b, ex in enumerate(examples):
            pred = out[b].argmax(-1).cpu().numpy()
            gold = ex.labels[ex.query_pos]
            hit = pred == gold
            correct += int(hit.sum())
            total += len(hit)
            for h, dist in zip(hit, ex.query_pos - ex.pair_pos, strict=True):
                key = math.floor(math.log2(max(int(dist), 1)))
                by_dist.setdefault(key, [0, 0])
                by_dist[key][0] += int(h)
                by_dist[key][1] += 1
    if ctx.world > 1:
        parts = ctx.gather((correct, total, by_dist))
        correct, total, by_dist = sum(p[0] for p in parts), sum(p[1] for p in parts), {}
        for _, _, bd in parts:
            for key, (c, q) in bd.items():
                by_dist.setdefault(key, [0, 0])
                by_dist[key][0] += c
                by_dist[key][1] += q
    buckets = [{"start": 2 ** k, "end": 2 ** (k + 1), "queries": c[1], "accuracy": c[0] / c[1]}
               for k, c in sorted(by_dist.items())]
    return {"accuracy": correct / total, "queries": total, "examples": n,
            "chance_uniform_values": 1.0 / (spec.vocab - spec.vocab // 2), "chance_in_context": 1.0 / spec.num_pairs,
            "spec": {"vocab": spec.vocab, "num_pairs": spec.num_pairs, "seq_len": spec.seq_len,
                     "power_a": spec.power_a, "noise": spec.noise, "seed": spec.seed},
            "by_distance": buckets}


# ------------------------------------------------------------------------------------------ text recall
def _score(ctx: EvalContext, params: dict, examples: list[hs.RecallExample]) -> tuple[list[float], list[str] | None]:
    """Scores (and generated texts for ``mode=generate``) of ``examples``; this rank scores its share."""
    if params["mode"] == "generate" and ctx.decode_model is None:
        raise ConfigError("mode=generate needs the unwrapped model (launch/eval.py); the training hook scores "
                          "mode=forced only")
    part = (ctx.rank, ctx.world)
    if params["mode"] == "generate":
        scores, texts = score_generate(ctx.decode_model, ctx.tokenizer, examples, params["batch_size"], part=part)
    else:
        scores = score_forced(ctx.model, examples, params["batch_size"], pad_id=getattr(ctx.tokenizer, "eos_id", 0),
                              part=part)
        texts = None
    if ctx.world > 1:  # each rank scored its batches: take every example's score from the rank that has it
        for part_scores, part_texts in ctx.gather((scores, texts)):
            for i, sc in enumerate(part_scores):
                if sc is not None:
                    scores[i] = sc
                    if texts is not None:
                        texts[i] = part_texts[i]
    return scores, texts


def _need_tokenizer(ctx: EvalContext, name: str):
    if ctx.tokenizer is None:
        raise ValueError(f"{name} needs the run's tokenizer")
    return hs.make_pieces(ctx.tokenizer)


@torch.no_grad()
def run_passkey(ctx: EvalContext, params: dict) -> dict:
    """Passkey retrieval accuracy by prompt length and key depth (``trials`` random keys per cell).

    ``lengths`` are prompt tokens (instruction + filler + key line + question); lengths above the
    run's ``data.seq_len`` test length extrapolation. Chance is 1e-5 (a 5-digit key).
    """
    pieces = _need_tokenizer(ctx, "passkey")
    rng = np.random.default_rng(params["seed"])
    examples = [hs.passkey_example(ctx.tokenizer, L, d, rng, pieces)
                for L in params["lengths"] for d in params["depths"] for _ in range(params["trials"])]
    scores, texts = _score(ctx, params, examples)
    records = [{"length": e.meta["length"], "depth": e.meta["depth"], "actual_depth": e.meta["actual_depth"],
                "key": e.meta["key"], "score": s, **({"output": texts[i]} if texts else {})}
               for i, (e, s) in enumerate(zip(examples, scores, strict=True))]
    table = _accuracy_table(records, "depth", "length")
    return {"accuracy": float(np.mean(scores)), "chance": 1e-5, "mode": params["mode"], "train_seq_len": ctx.seq_len,
            "depths": table["rows"], "lengths": table["cols"], "grid": table["accuracy"],
            "by_length": {str(L): float(np.mean([r["score"] for r in records if r["length"] == L]))
                          for L in table["cols"]},
            "examples": records}


@torch.no_grad()
def run_niah(ctx: EvalContext, params: dict) -> dict:
    """RULER-style needle-in-a-haystack subset (see :mod:`lctrain.eval.haystack`): accuracy by subtask and length.

    An example's score is the fraction of its expected items recalled (1 item for ``single`` and
    ``multikey``); the headline ``accuracy`` averages subtasks and lengths equally.
    """
    pieces = _need_tokenizer(ctx, "niah")
    bad = sorted(set(params["subtasks"]) - set(hs.NIAH_SUBTASKS))
    if bad:
        raise ConfigError(f"unknown niah.subtasks {bad}; allowed: {', '.join(hs.NIAH_SUBTASKS)}")
    rng = np.random.default_rng(params["seed"])
    examples = [hs.niah_example(ctx.tokenizer, sub, L, rng, params["num_keys"], params["num_values"],
                                params["vt_hops"], pieces)
                for sub in params["subtasks"] for L in params["lengths"] for _ in range(params["trials"])]
    scores, texts = _score(ctx, params, examples)
    records = [{"subtask": e.meta["subtask"], "length": e.meta["length"], "expected": e.expected, "score": s,
                **({"output": texts[i]} if texts else {})}
               for i, (e, s) in enumerate(zip(examples, scores, strict=True))]
    by_sub: dict[str, dict[str, float]] = {}
    for sub in params["subtasks"]:
        by_sub[sub] = {str(L): float(np.mean([r["score"] for r in records if r["subtask"] == sub and r["length"] == L]))
                       for L in params["lengths"]}
    cell_means = [v for d in by_sub.values() for v in d.values()]
    return {"accuracy": float(np.mean(cell_means)), "mode": params["mode"], "train_seq_len": ctx.seq_len,
            "by_subtask": by_sub, "lengths": list(params["lengths"]),
            "subtask_accuracy": {k: float(np.mean(list(v.values()))) for k, v in by_sub.items()},
            "examples": records}


def _plot(name: str) -> Callable[[dict, Path], None]:
    def draw(result: dict, path: Path) -> None:
        from lctrain.eval import plots

        getattr(plots, f"plot_{name}")(result, path)

    return draw


register_task(Task("perplexity", "next-token loss per document and by position (default: the run's validation split)",
                   {"path": "", "text_key": "text", "seq_len": 0, "max_tokens": 65536, "max_docs": 0,
                    "batch_size": 4, "buckets": "log2"}, run_perplexity, _plot("perplexity"), ("loss", "ppl")))
register_task(Task("mqar", "multi-query associative recall (Zoology), accuracy on the queried values",
                   {"vocab": 0, "num_pairs": 0, "seq_len": 0, "power_a": 0.0, "noise": "", "num_examples": 256,
                    "batch_size": 16, "seed": 1234}, run_mqar, _plot("mqar")))
register_task(Task("passkey", "passkey retrieval (Mohtashami & Jaggi 2023) by length and depth",
                   {"lengths": [256, 512, 1024], "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "trials": 3, "seed": 0,
                    "mode": "forced", "batch_size": 4}, run_passkey, _plot("passkey")))
register_task(Task("niah", "RULER-style needle in a haystack: single, multikey, multivalue, variable tracking",
                   {"subtasks": list(hs.NIAH_SUBTASKS), "lengths": [256, 512, 1024], "trials": 3, "num_keys": 4,
                    "num_values": 4, "vt_hops": 4, "seed": 0, "mode": "forced", "batch_size": 4},
                   run_niah, _plot("niah")))


@dataclass
class TaskResult:
    """A finished task: its name, parameters and result (plus where its files went, if written)."""

    name: str
    params: dict
    result: dict
    files: list[Path] = field(default_factory=list)


def run_tasks(ctx: EvalContext, specs: list[tuple[str, dict[str, Any]]], out_dir: Path | None = None,
              plots: bool = True, meta: dict | None = None) -> list[TaskResult]:
    """Run each ``(name, params)``; with ``out_dir`` write ``<name>.json`` (and ``<name>.png`` if ``plots``).

    The JSON is the result plus ``task``, ``params`` and ``meta`` (e.g. run, checkpoint, step).

    Raises:
        ConfigError: unknown task or parameter; ValueError: a task that cannot run on this run.
    """
    import json

    done = []
    for name, given in specs:
        task = get_task(name)
        params = resolve_params(task, given)
        result = {"task": name, **task.run(ctx, params), "params": params, **({"meta": meta} if meta else {})}
        files = []
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            js = out_dir / f"{name}.json"
            js.write_text(json.dumps(result, indent=1, default=str))
            files.append(js)
            if plots:
                png = out_dir / f"{name}.png"
                task.plot(result, png)
                files.append(png)
        done.append(TaskResult(name, params, result, files))
    return done
