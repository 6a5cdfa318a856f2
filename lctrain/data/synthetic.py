"""Synthetic token-level data: MQAR examples, the ``synthetic:`` data source and its stand-in tokenizer.

The generators serve training (the ``synthetic:`` entry of :data:`lctrain.data.sources.SOURCES`)
and evaluation (the ``mqar`` task of :mod:`lctrain.eval.tasks` imports them from here).

MQAR, multi-query associative recall (Arora et al. 2023, "Zoology: Measuring and Improving
Recall in Efficient Language Models", Sec. 3), in the layout of the paper's generator:

* the vocabulary ``[0, V)`` is split in halves: keys come from ``[1, V/2)``, values from
  ``[V/2, V)`` (id 0 is kept free: it is the stand-in tokenizer's EOS and never a key or value);
* the sequence starts with ``n = num_pairs`` key-value pairs ``k_1 v_1 k_2 v_2 ... k_n v_n`` (keys
  distinct, values distinct, each drawn uniformly without replacement);
* the remaining ``seq_len - 2n`` positions hold each key once more, as a *query*, at even offsets
  ``2 s`` of that region; the slots ``s`` are drawn without replacement with probability
  ``p(s) ~ (s + 1)^(power_a - 1)`` (a power law favouring queries soon after the pairs; Zoology
  uses ``power_a = 0.01``); the other positions are filled with tokens drawn uniformly from
  ``[1, V)`` (``noise="random"``) or left 0 (``noise="zero"``);
* the label at a query's position is its key's value (the model must output it as the next
  token); every other label is :data:`lctrain.data.IGNORE_INDEX`, so a trainer's loss counts only
  the answers.

Requirements: ``V >= 4`` even-split sizes with ``num_pairs < V/2`` keys available and
``num_pairs <= (seq_len - 2 num_pairs) / 2`` query slots (``seq_len >= 4 num_pairs``).

Each example is drawn from its own ``numpy.random.Generator`` seeded by ``(seed, stream, index)``,
so example ``i`` is the same whatever else is generated, and the training (stream 0),
validation (stream 1) and evaluation (stream 2) examples are independent draws.

The data source ``data.path=synthetic:mqar?vocab=V&num_pairs=N&seq_len=T&...`` (quote it in a
shell: ``&``) makes :func:`lctrain.data.build_data` return (:func:`build_synthetic_data`) a
:class:`SyntheticTokenizer` and two :class:`SyntheticDataset` of fixed-length examples in the
:class:`lctrain.data.PackedDataset` item format, so the trainer trains on MQAR unchanged. Keys of
the query string: ``vocab`` (default ``model.vocab_size``), ``num_pairs`` (8), ``seq_len``
(default ``data.seq_len``; if given it must equal it), ``power_a`` (0.01), ``noise``
(``random`` | ``zero``), ``num_train`` (100000 examples per epoch), ``num_val`` (256), ``seed``
(default ``data.seed``), ``loss`` (``answers``: labels only at queries; ``all``: also every
next token of the pairs, as plain language modelling would).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch

from lctrain.data.packing import IGNORE_INDEX
from lctrain.errors import ConfigError

PREFIX = "synthetic:"
TASKS = ("mqar",)
STREAMS = {"train": 0, "val": 1, "eval": 2}


def parse_query(query: str) -> dict[str, str]:
    """``"a=1&b=x"`` -> ``{"a": "1", "b": "x"}`` (empty string -> ``{}``).

    Raises:
        ConfigError: a part without ``=``, or a key given twice.
    """
    out: dict[str, str] = {}
    if not query:
        return out
    for part in query.split("&"):
        if "=" not in part:
            raise ConfigError(f"'{part}' in '{query}' is not key=value")
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key in out:
            raise ConfigError(f"key '{key}' is given twice in '{query}'")
        out[key] = value
    return out


def coerce(value: str, like: Any, what: str) -> Any:
    """Convert the string ``value`` to the type of ``like`` (bool, int, float, str, or a list of those).

    Lists are comma- or colon-separated (``"256,512"`` or ``"256:512"``; the colon form fits inside an
    OmegaConf list such as ``train.eval_tasks=[passkey?lengths=256:512]``, where a bare comma would
    split the item). Raises ConfigError naming ``what`` on a bad value.
    """
    try:
        if isinstance(like, bool):
            low = value.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return low in ("true", "1", "yes")
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
        if isinstance(like, (list, tuple)):
            elem = like[0] if like else ""
            return [coerce(v, elem, what) for v in str(value).replace(":", ",").split(",") if v.strip() != ""]
        return str(value)
    except ValueError:
        kind = type(like).__name__ if not isinstance(like, (list, tuple)) else f"comma list of {type(like[0]).__name__}"
        raise ConfigError(f"invalid {what}={value!r}: expected {kind}") from None


@dataclass
class MQARSpec:
    """Parameters of MQAR examples (see the module docstring).

    Attributes:
        vocab: V, token ids ``[0, V)``; keys ``[1, V//2)``, values ``[V//2, V)``.
        num_pairs: key-value pairs per example (also the number of queries).
        seq_len: tokens per example.
        power_a: power-law exponent of the query slots (``p(s) ~ (s+1)^(a-1)``).
        noise: ``random`` (uniform tokens in ``[1, V)`` between queries) or ``zero``.
        num_train, num_val: examples in the training epoch / validation set of the data source.
        seed: base seed.
        loss: ``answers`` (labels at queries only) or ``all`` (also the pair tokens' next tokens).
    """

    vocab: int = 8192
    num_pairs: int = 8
    seq_len: int = 256
    power_a: float = 0.01
    noise: str = "random"
    num_train: int = 100_000
    num_val: int = 256
    seed: int = 0
    loss: str = "answers"

    def validate(self, prefix: str = "mqar") -> None:
        """Raise :class:`ConfigError` naming the bad key and what is allowed."""
        if self.num_pairs < 1:
            raise ConfigError(f"invalid {prefix}.num_pairs={self.num_pairs}: must be >= 1")
        if self.vocab < 4 or self.vocab // 2 - 1 < self.num_pairs:
            raise ConfigError(
                f"invalid {prefix}.vocab={self.vocab}: the key half [1, vocab/2) must hold num_pairs={self.num_pairs} "
                f"distinct keys, so vocab >= {2 * (self.num_pairs + 1)}"
            )
        if self.seq_len < 4 * self.num_pairs:
            raise ConfigError(
                f"invalid {prefix}.seq_len={self.seq_len}: {self.num_pairs} pairs and their queries need seq_len >= "
                f"4 x num_pairs = {4 * self.num_pairs}"
            )
        if not self.power_a > 0:
            raise ConfigError(f"invalid {prefix}.power_a={self.power_a}: must be > 0")
        if self.noise not in ("random", "zero"):
            raise ConfigError(f"invalid {prefix}.noise={self.noise!r}: allowed values are random, zero")
        if self.loss not in ("answers", "all"):
            raise ConfigError(f"invalid {prefix}.loss={self.loss!r}: allowed values are answers, all")
        if self.num_train < 1 or self.num_val < 0:
            raise ConfigError(f"invalid {prefix}.num_train/num_val={self.num_train}/{self.num_val}: need >= 1 / >= 0")


@dataclass
class MQARExample:
    """One MQAR sequence.

    Attributes:
        input_ids: int64 [T].
        labels: int64 [T]: the value at each query position, IGNORE_INDEX elsewhere (and, with
            ``loss="all"``, the next token inside the pair region).
        query_pos: int64 [n] position of each query (sorted).
        pair_pos: int64 [n] position of the key of the pair each query asks for.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    query_pos: np.ndarray
    pair_pos: np.ndarray


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(stream), int(index)])


def mqar_example(spec: MQARSpec, index: int, stream: int = 0) -> MQARExample:
    """Example ``index`` of ``stream`` (0 train, 1 val, 2 eval) for ``spec`` (deterministic).

    Raises:
        ConfigError: an invalid ``spec``.
    """
    n, T, V = spec.num_pairs, spec.seq_len, spec.vocab
    rng = _rng(spec.seed, stream, index)
    half = V // 2
    keys = rng.choice(np.arange(1, half), size=n, replace=False)
    values = rng.choice(np.arange(half, V), size=n, replace=False)
    ids = np.zeros(T, dtype=np.int64)
    ids[0:2 * n:2], ids[1:2 * n:2] = keys, values
    slots_available = (T - 2 * n) // 2
    p = np.arange(1, slots_available + 1, dtype=np.float64) ** (spec.power_a - 1.0)
    slots = rng.choice(slots_available, size=n, replace=False, p=p / p.sum())
    query_pos = 2 * n + 2 * slots  # query j asks for pair j
    if spec.noise == "random":
        region = np.arange(2 * n, T)
        ids[region] = rng.integers(1, V, size=region.size)
    ids[query_pos] = keys
    labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
    labels[query_pos] = values
    if spec.loss == "all":
        labels[: 2 * n - 1] = ids[1: 2 * n]
    order = np.argsort(query_pos)
    return MQARExample(ids, labels, query_pos[order], (2 * np.arange(n))[order])


def mqar_batch(spec: MQARSpec, start: int, count: int, stream: int = 2) -> tuple[torch.Tensor, torch.Tensor, list[MQARExample]]:
    """Examples ``start .. start+count-1`` stacked: ``(input_ids int64 [count, T], labels int64 [count, T], examples)``."""
    ex = [mqar_example(spec, start + i, stream) for i in range(count)]
    ids = torch.from_numpy(np.stack([e.input_ids for e in ex]))
    labels = torch.from_numpy(np.stack([e.labels for e in ex]))
    return ids, labels, ex


# --------------------------------------------------------------------------------------------- data source
@dataclass
class SyntheticSource:
    """A parsed ``synthetic:<task>?<query>`` path: the task name and its spec."""

    task: str
    spec: MQARSpec
    given: dict[str, str] = field(default_factory=dict)


def is_synthetic(path: str) -> bool:
    """Whether ``data.path`` names a synthetic source."""
    return str(path).startswith(PREFIX)


def parse_synthetic(path: str, seq_len: int | None = None, vocab_size: int | None = None,
                    seed: int | None = None) -> SyntheticSource:
    """Parse ``synthetic:mqar?vocab=...&num_pairs=...`` into a validated :class:`SyntheticSource`.

    ``seq_len``, ``vocab_size`` and ``seed`` (``data.seq_len``, ``model.vocab_size``,
    ``data.seed``) fill the keys the path leaves out.

    Raises:
        ConfigError: not a synthetic path, an unknown task or key, a bad value, a ``seq_len``
            different from ``data.seq_len``, or a ``vocab`` above ``model.vocab_size``.
    """
    if not is_synthetic(path):
        raise ConfigError(f"'{path}' is not a synthetic data path (synthetic:<task>?key=value&...)")
    body = path[len(PREFIX):]
    task, _, query = body.partition("?")
    if task not in TASKS:
        raise ConfigError(f"unknown synthetic task '{task}' in data.path='{path}'; available: {', '.join(TASKS)}")
    given = parse_query(query)
    spec = MQARSpec()
    if seq_len is not None:
        spec.seq_len = int(seq_len)
    if vocab_size is not None:
        spec.vocab = int(vocab_size)
    if seed is not None:
        spec.seed = int(seed)
    names = {f.name for f in fields(MQARSpec)}
    for key, value in given.items():
        if key not in names:
            raise ConfigError(f"unknown key '{key}' in data.path='{path}'; keys of {task}: {', '.join(sorted(names))}")
        spec = replace(spec, **{key: coerce(value, getattr(spec, key), f"{task}.{key}")})
    if seq_len is not None and spec.seq_len != seq_len:
        raise ConfigError(
            f"data.path='{path}' sets seq_len={spec.seq_len} but data.seq_len={seq_len}; leave seq_len out of the path "
            f"or set data.seq_len={spec.seq_len}"
        )
    if vocab_size is not None and spec.vocab > vocab_size:
        raise ConfigError(
            f"data.path='{path}' uses vocab={spec.vocab} token ids but model.vocab_size={vocab_size}; set "
            f"model.vocab_size={spec.vocab} or a smaller vocab"
        )
    spec.validate(prefix=f"data.path {task}")
    return SyntheticSource(task, spec, given)


class SyntheticTokenizer:
    """Stand-in tokenizer of a synthetic run: ids are written as decimal numbers separated by spaces.

    ``vocab_size`` ids, ``eos_id`` 0; ``encode("5 17 3") == [5, 17, 3]``; ``decode`` the inverse.
    Enough for :func:`lctrain.data.tokenizer.check_vocab` and for ``launch/generate.py`` on a
    synthetic run.
    """

    def __init__(self, vocab_size: int):
        self._vocab = int(vocab_size)
        self.path = None

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_id(self) -> int:
        return 0

    @property
    def fingerprint(self) -> str:
        return hashlib.blake2b(f"synthetic-{self._vocab}".encode(), digest_size=8).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Ids of whitespace-separated decimal numbers.

        Raises:
            ValueError: a word that is not an integer in ``[0, vocab_size)``.
        """
        ids = []
        for word in text.split():
            if not word.lstrip("-").isdigit() or not 0 <= int(word) < self._vocab:
                raise ValueError(f"a synthetic run's prompt is token ids in [0, {self._vocab}) separated by spaces; "
                                 f"got {word!r}")
            ids.append(int(word))
        return ids

    def encode_batch(self, texts, num_threads=None) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def __repr__(self) -> str:
        return f"SyntheticTokenizer(vocab_size={self._vocab})"


class SyntheticDataset(torch.utils.data.Dataset):
    """``count`` MQAR examples of one stream, in the :class:`lctrain.data.PackedDataset` item format.

    ``dataset[i]`` is ``{"input_ids", "labels", "position_ids"}`` int64 ``[T]`` and ``doc_lens``
    int32 ``[1] = [T]`` (each example is one document), generated on demand (nothing is stored).
    """

    def __init__(self, spec: MQARSpec, count: int, stream: int):
        self.spec, self.count, self.stream = spec, int(count), int(stream)
        self.seq_len = spec.seq_len
        self.eos_id = 0

    def __len__(self) -> int:
        return self.count

    @property
    def num_tokens(self) -> int:
        return self.count * self.spec.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.count <= i < self.count:
            raise IndexError(f"example {i} out of range for a synthetic dataset of {self.count}")
        ex = mqar_example(self.spec, i % self.count, self.stream)
        T = self.spec.seq_len
        return {
            "input_ids": torch.from_numpy(ex.input_ids.copy()),
            "labels": torch.from_numpy(ex.labels.copy()),
            "position_ids": torch.arange(T, dtype=torch.int64),
            "doc_lens": torch.tensor([T], dtype=torch.int32),
        }


def build_synthetic_data(path: str, seq_len: int, vocab_size: int, seed: int = 0):
    """``(tokenizer, train_dataset, val_dataset)`` of a ``synthetic:`` data path (see the module docstring).

    Raises:
        ConfigError: as :func:`parse_synthetic`.
    """
    src = parse_synthetic(path, seq_len=seq_len, vocab_size=vocab_size, seed=seed)
    spec = src.spec
    return (SyntheticTokenizer(spec.vocab), SyntheticDataset(spec, spec.num_train, STREAMS["train"]),
            SyntheticDataset(spec, spec.num_val, STREAMS["val"]))
