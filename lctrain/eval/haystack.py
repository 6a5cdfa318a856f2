"""Text recall prompts built at the token level: passkey retrieval and a RULER-style needle-in-a-haystack subset.

Everything is generated offline from fixed templates and a seed (no download):

* **passkey** (the format of Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access
  Infinite Context Length for Transformers", Sec. 4.2): an instruction, the filler sentences
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
  repeated, a line "The pass key is K. Remember it. K is the pass key." with a random 5-digit
  key ``K`` placed at a chosen depth of the filler, and the question "What is the pass key? The
  pass key is"; the answer is ``K``.
* **niah**, a subset of RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
  Long-Context Language Models?") that needs no downloaded haystack: the *noise* haystack (the
  same filler sentences) with needles "One of the special magic numbers for KEY is: VALUE."
  (KEY an adjective-noun word pair, VALUE a 7-digit number):

  - ``single``: one needle, asked for its value;
  - ``multikey``: ``num_keys`` needles with different keys, asked for one key's value;
  - ``multivalue``: ``num_values`` needles of the same key, asked for all its values;
  - ``vt`` (variable tracking): a chain ``VAR X1 = N.``, ``VAR X2 = VAR X1.``, ... of
    ``vt_hops`` assignments scattered in order, asked for every variable holding ``N``.

A prompt of requested length ``L`` has exactly ``L`` tokens (instruction + haystack + needles +
question; the answer is not counted): the haystack is the filler token stream cut to the length
left over, and needles are inserted at boundaries between whole filler passages (so no sentence
is split, except the last passage, which is cut where the budget ends). Pieces are tokenised
separately and concatenated, and an item asked for (key, value, variable name) is always the
same token ids in the needle and in the answer, so recall means copying those ids.

Each example carries ``answer`` (the expected continuation, token ids) with ``groups`` (per
answer token: the index of the expected item it belongs to, -1 for separators) and ``expected``
(the items as strings, for scoring generated text).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there.\n")
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. I will "
              "quiz you about the numbers afterwards.\n")
VT_INTRO = "Memorize and track the chain of variable assignments hidden in the following text.\n"
NIAH_SUBTASKS = ("single", "multikey", "multivalue", "vt")

_ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lively",
    "mellow", "narrow", "olive", "proud", "quiet", "rapid", "silver", "tidy", "upper", "vivid", "wooden", "young",
    "bitter", "crimson", "distant", "early", "fuzzy", "golden",
)
_NOUNS = (
    "anchor", "basket", "candle", "desert", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "ladder", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle", "tunnel", "valley", "window",
    "yard", "bridge", "castle", "forest", "lantern", "mirror", "pillow", "tower",
)


@dataclass
class RecallExample:
    """One prompt and what the model should continue it with.

    Attributes:
        prompt: token ids of the context and question (``len == meta["length"]``).
        answer: token ids of the expected continuation.
        groups: int per answer token: index into ``expected`` of the item it spells, -1 for
            separators that are not scored.
        expected: the items as strings (passkey, values, variable names).
        meta: ``length``, ``depth`` (passkey: needle start / haystack tokens), ``subtask`` ...
    """

    prompt: list[int]
    answer: list[int]
    groups: list[int]
    expected: list[str]
    meta: dict = field(default_factory=dict)


class _Pieces:
    """Tokenised template pieces of one tokenizer (encoded once)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.filler = tokenizer.encode(FILLER)
        if not self.filler:
            raise ValueError("the tokenizer encodes the filler text to no tokens")
        self._cache: dict[str, list[int]] = {}

    def enc(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok.encode(text)
        return self._cache[text]


def _check_text_tokenizer(tokenizer) -> None:
    try:
        ids = tokenizer.encode("The grass is green.")
    except ValueError as e:
        raise ValueError(f"text recall tasks need a text tokenizer; this run's tokenizer cannot encode text ({e}). "
                         f"Synthetic runs are evaluated with task=mqar") from None
    if not ids:
        raise ValueError("text recall tasks need a tokenizer that encodes text")


def _haystack(pieces: _Pieces, n: int) -> list[int]:
    unit = pieces.filler
    reps = -(-n // len(unit)) if n > 0 else 0
    return (unit * reps)[:n]


def _assemble(pieces: _Pieces, intro: list[int], needles: list[list[int]], question: list[int], length: int,
              fractions: list[float]) -> tuple[list[int], list[int]]:
    """``intro + haystack-with-needles + question`` of exactly ``length`` tokens.

    ``fractions[i]`` in [0, 1] places needle ``i`` at that depth of the haystack, snapped down to a
    filler-passage boundary (``1.0``: right after the haystack). Needles keep their order.

    Returns:
        ``(tokens, starts)``: the prompt and the haystack offset at which each needle was inserted.

    Raises:
        ValueError: ``length`` too short for the fixed parts.
    """
    fixed = len(intro) + sum(map(len, needles)) + len(question)
    n = length - fixed
    if n < 0:
        raise ValueError(f"a prompt of {length} tokens cannot hold its {fixed} tokens of instruction, needles and "
                         f"question; use a larger length")
    hay = _haystack(pieces, n)
    u = len(pieces.filler)
    offsets = []
    for f in fractions:
        off = n if f >= 1.0 else min(n, round(f * (n // u)) * u)
        offsets.append(off)
    out = list(intro)
    prev = 0
    for off, needle in sorted(zip(offsets, needles, strict=True), key=lambda p: p[0]):
        out += hay[prev:off] + needle
        prev = off
    out += hay[prev:] + question
    assert len(out) == length
    return out, offsets


def passkey_example(tokenizer, length: int, depth: float, rng: np.random.Generator,
                    pieces: _Pieces | None = None) -> RecallExample:
    """A passkey prompt of exactly ``length`` tokens with the key line at ``depth`` (0 = start, 1 = end).

    Raises:
        ValueError: ``depth`` outside [0, 1], a length too short, or a tokenizer that cannot encode text.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    pieces = pieces or _Pieces(tokenizer)
    key = str(int(rng.integers(10000, 100000)))
    key_ids = pieces.enc(" " + key)
    needle = (pieces.enc("\nThe pass key is") + key_ids + pieces.enc(". Remember it.") + key_ids
              + pieces.enc(" is the pass key.\n"))
    question = pieces.enc("\nWhat is the pass key? The pass key is")
    prompt, (off,) = _assemble(pieces, pieces.enc(PASSKEY_INTRO), [needle], question, length, [depth])
    hay = length - len(pieces.enc(PASSKEY_INTRO)) - len(needle) - len(question)
    return RecallExample(prompt, list(key_ids), [0] * len(key_ids), [key],
                         {"length": length, "depth": depth, "actual_depth": off / hay if hay else 0.0,
                          "needle_start": len(pieces.enc(PASSKEY_INTRO)) + off, "key": key})


def _word_key(rng: np.random.Generator) -> str:
    return f"{_ADJECTIVES[int(rng.integers(len(_ADJECTIVES)))]}-{_NOUNS[int(rng.integers(len(_NOUNS)))]}"


def _number(rng: np.random.Generator, digits: int = 7) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _distinct(make, rng, count: int) -> list[str]:
    seen: list[str] = []
    while len(seen) < count:
        x = make(rng)
        if x not in seen:
            seen.append(x)
    return seen


def niah_example(tokenizer, subtask: str, length: int, rng: np.random.Generator, num_keys: int = 4,
                 num_values: int = 4, vt_hops: int = 4, pieces: _Pieces | None = None) -> RecallExample:
    """A RULER-style prompt of exactly ``length`` tokens (see the module docstring for the subtasks).

    Needles sit at random filler-passage boundaries (in order for ``vt``).

    Raises:
        ValueError: unknown ``subtask``, counts < 1, or a length too short for the needles.
    """
    if subtask not in NIAH_SUBTASKS:
        raise ValueError(f"unknown niah subtask {subtask!r}; allowed: {', '.join(NIAH_SUBTASKS)}")
    if min(num_keys, num_values, vt_hops) < 1:
        raise ValueError(f"num_keys, num_values and vt_hops must be >= 1, got {num_keys}, {num_values}, {vt_hops}")
    pieces = pieces or _Pieces(tokenizer)
    enc = pieces.enc

    def needle(key_ids: list[int], value_ids: list[int]) -> list[int]:
        return enc("\nOne of the special magic numbers for") + key_ids + enc(" is:") + value_ids + enc(".\n")

    meta = {"length": length, "subtask": subtask}
    if subtask in ("single", "multikey"):
        keys = _distinct(_word_key, rng, 1 if subtask == "single" else num_keys)
        values = [_number(rng) for _ in keys]
        needles = [needle(enc(" " + k), enc(" " + v)) for k, v in zip(keys, values, strict=True)]
        target = int(rng.integers(len(keys)))
        key_ids = enc(" " + keys[target])
        question = (enc(f"\nWhat is the special magic number for {keys[target]} mentioned in the provided text? "
                        "The special magic number for") + key_ids + enc(" is:"))
        answer = enc(" " + values[target])
        groups, expected, intro = [0] * len(answer), [values[target]], enc(NIAH_INTRO)
    elif subtask == "multivalue":
        key = _word_key(rng)
        values = _distinct(_number, rng, num_values)
        key_ids = enc(" " + key)
        needles = [needle(key_ids, enc(" " + v)) for v in values]
        question = (enc(f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                        "The special magic numbers for") + key_ids + enc(" are:"))
        answer, groups = [], []
        for i, v in enumerate(values):
            if i:
                sep = enc(",")
                answer += sep
                groups += [-1] * len(sep)
            ids = enc(" " + v)
            answer += ids
            groups += [i] * len(ids)
        expected, intro = values, enc(NIAH_INTRO)
    else:  # variable tracking
        names = _distinct(lambda r: "".join(chr(65 + int(c)) for c in r.integers(0, 26, size=5)), rng, vt_hops + 1)
        value = _number(rng, 5)
        name_ids = [enc(" " + n) for n in names]
        needles = [enc("\nVAR") + name_ids[0] + enc(" =") + enc(" " + value) + enc(".\n")]
        needles += [enc("\nVAR") + name_ids[i] + enc(" = VAR") + name_ids[i - 1] + enc(".\n")
                    for i in range(1, len(names))]
        question = enc(f"\nQuestion: Find all variables that are assigned the value {value} in the text above.\n"
                       f"Answer: According to the chain of variable assignments in the text above, {len(names)} "
                       f"variables are assigned the value {value}, they are:")
        answer = [t for ids in name_ids for t in ids]
        groups = [i for i, ids in enumerate(name_ids) for _ in ids]
        expected, intro = names, enc(VT_INTRO)
    fractions = sorted(float(f) for f in rng.random(len(needles)))
    if subtask != "vt":
        rng.shuffle(needles)  # random order for multi-needle tasks; the chain stays in order
    prompt, _ = _assemble(pieces, intro, needles, question, length, fractions)
    return RecallExample(prompt, answer, groups, expected, meta)


def make_pieces(tokenizer) -> _Pieces:
    """Tokenised templates for repeated calls with one tokenizer (raises ValueError for a non-text tokenizer)."""
    _check_text_tokenizer(tokenizer)
    return _Pieces(tokenizer)
