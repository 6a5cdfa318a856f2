"""Scorers: logits at chosen positions, teacher-forced answer checks, greedy-generation string match,
continuation log-likelihoods (:func:`continuation_loglikelihoods`, as lm-evaluation-harness scores them).

A *model* here is anything callable as ``model(input_ids int64 [B, T]) -> logits [B, T, V]``: a
:class:`lctrain.models.HybridLM` (then only the needed rows go through the LM head), a wrapped one
(DDP / FSDP: the full forward is called, so every rank can run the same evaluation), or a test
double.

Teacher-forced scoring (``mode="forced"``, the default): the prompt and the expected answer are
fed in one forward pass and an answer token counts as correct when it is the argmax of the logits
before it. An item (a key, a value, a variable name) is recalled when all its tokens are. This
equals exact-match scoring of *greedy generation* for a single-item answer (greedy decoding emits
the answer exactly when each of its tokens is the argmax after the previous correct ones), and
for a multi-item answer it scores each item given the correct earlier ones.

Generation scoring (``mode="generate"``, RULER's ``string_match_all``): greedy decoding with
:func:`lctrain.generate.generate` from the prompt, then the fraction of expected strings found in
the decoded text. It needs the unwrapped model (decode states).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lctrain.eval.haystack import RecallExample

MODES = ("forced", "generate")


def _is_plain_hybrid(model) -> bool:
    from lctrain.models import HybridLM

    return type(model) is HybridLM  # FSDP2 swaps the class; DDP wraps it: both use the full forward


@torch.no_grad()
def logits_at(model, input_ids: torch.Tensor, rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Logits at chosen positions of each sequence.

    Args:
        model: see the module docstring.
        input_ids: int64 [B, T].
        rows: for each of the B sequences, the positions wanted.

    Returns:
        B fp32 tensors ``[len(rows[b]), V]`` (on the model's device).
    """
    if _is_plain_hybrid(model):
        h = model.hidden_states(input_ids)
        return [model.lm_head(h[b, list(r)]).float() for b, r in enumerate(rows)]
    logits = model(input_ids)
    return [logits[b, list(r)].float() for b, r in enumerate(rows)]


def _device_of(model, default: torch.device | str = "cpu") -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device(default)


def _batches(order: list[int], size: int):
    for s in range(0, len(order), size):
        yield order[s:s + size]


def _mine(batches, part: tuple[int, int]):
    rank, world = part
    for i, b in enumerate(batches):
        if i % world == rank:
            yield b


@torch.no_grad()
def score_forced(model, examples: Sequence[RecallExample], batch_size: int = 4,
                 pad_id: int = 0, part: tuple[int, int] = (0, 1)) -> list[float | None]:
    """Teacher-forced recall score of each example: the fraction of its items whose tokens are all argmax-correct.

    Sequences of a batch are right-padded with ``pad_id`` (causal: padding never reaches the
    scored positions); examples are batched by length.

    Args:
        part: ``(rank, world)``: score only batches ``rank, rank + world, ...`` (data-parallel
            evaluation; the batches are those of one process, so merged scores equal its scores).

    Returns:
        A score in [0, 1] per example, in the input order (None for examples of other parts).
    """
    device = _device_of(model)
    scores: list[float | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].answer))
    for idx in _mine(_batches(order, max(1, batch_size)), part):
        seqs = [examples[i].prompt + examples[i].answer for i in idx]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.int64)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s, dtype=torch.int64)
        rows = [range(len(examples[i].prompt) - 1, len(examples[i].prompt) - 1 + len(examples[i].answer)) for i in idx]
        out = logits_at(model, ids.to(device), rows)
        for b, i in enumerate(idx):
            ex = examples[i]
            ok = (out[b].argmax(-1).cpu() == torch.tensor(ex.answer)).tolist()
            items = sorted({g for g in ex.groups if g >= 0})
            hit = [all(c for c, g in zip(ok, ex.groups, strict=True) if g == item) for item in items]
            scores[i] = sum(hit) / len(items) if items else 0.0
    return scores


@torch.no_grad()
def score_generate(model: nn.Module, tokenizer, examples: Sequence[RecallExample], batch_size: int = 4,
                   extra_tokens: int = 4, part: tuple[int, int] = (0, 1)) -> tuple[list[float | None], list[str | None]]:
    """Greedy-generation score of each example: the fraction of ``expected`` strings in the decoded output.

    Examples of equal prompt length are decoded together, ``len(answer) + extra_tokens`` new
    tokens each (stopping early at EOS). ``part=(rank, world)`` decodes only every ``world``-th
    batch (as :func:`score_forced`).

    Returns:
        ``(scores, outputs)``: per example a score in [0, 1] and the generated text (None for
        examples of other parts).

    Raises:
        NotImplementedError: a mixer without decode rules (see :mod:`lctrain.generate`).
    """
    from lctrain.generate import generate

    device = _device_of(model)
    scores: list[float | None] = [None] * len(examples)
    texts: list[str | None] = [None] * len(examples)
    by_len: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_len.setdefault(len(ex.prompt), []).append(i)
    batches = [idx for _, members in sorted(by_len.items()) for idx in _batches(members, max(1, batch_size))]
    for idx in _mine(batches, part):
        ids = torch.tensor([examples[i].prompt for i in idx], dtype=torch.int64, device=device)
        new = max(len(examples[i].answer) for i in idx) + extra_tokens
        out = generate(model, ids, new, temperature=0.0, eos_id=getattr(tokenizer, "eos_id", None))
        for b, i in enumerate(idx):
            text = tokenizer.decode(out[b, ids.shape[1]:].tolist())
            texts[i] = text
            exp = examples[i].expected
            scores[i] = sum(e in text for e in exp) / len(exp) if exp else 0.0
    return scores, texts


def split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and ``continuation`` as lm-evaluation-harness splits them for a causal LM.

    Trailing whitespace of the context moves to the continuation; the whole text is encoded once
    and the continuation's tokens are those after the context's own encoding (so a token that
    spans the boundary belongs to the continuation).

    Raises:
        ValueError: empty ``context`` (the harness then conditions on an end-of-text token instead).
    """
    if not context:
        raise ValueError("context must not be empty")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def continuation_loglikelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation given its context: lctrain's ``loglikelihood`` request.

    For every ``(context, continuation)``: the sum over the continuation's tokens (split by
    :func:`split_continuation`) of ``log p(token | everything before it)`` in nats, from one
    forward pass of context + continuation, and whether every continuation token is the argmax
    (greedy decoding would produce it). The same quantities as lm-evaluation-harness's
    ``loglikelihood`` requests, so an exported model scored by the harness can be checked against
    lctrain's own model.

    Args:
        model: see the module docstring (in eval mode).
        tokenizer: the run's tokenizer (``encode(str) -> list[int]``).
        pairs: ``(context, continuation)`` strings.

    Returns:
        ``(log-likelihood, is_greedy)`` per pair, in order.
    """
    device = _device_of(model)
    out = []
    for context, continuation in pairs:
        ctx, cont = split_continuation(tokenizer, context, continuation)
        ids = torch.tensor([ctx + cont], dtype=torch.int64, device=device)
        (logits,) = logits_at(model, ids, [range(len(ctx) - 1, len(ctx) + len(cont) - 1)])
        logp = torch.log_softmax(logits.double(), dim=-1)
        target = torch.tensor(cont, dtype=torch.int64, device=logp.device)
        ll = float(logp.gather(-1, target[:, None]).sum())
        out.append((ll, bool((logp.argmax(-1) == target).all())))
    return out
