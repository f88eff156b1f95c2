"""Needle in a haystack: the synthetic task a small model trains on, and the placement rule that the
evaluation harness (train/evaluate.py) shares with text haystacks.

Synthetic sample (one row of seq_len + 1 tokens, no padding):

    ^ <haystack: filler letters with N needles "@" + key + "=" + value> ? key = value $

Filler letters and keys come from LETTERS (16 letters), values from DIGITS. Keys are distinct within a
sample; "@" and "=" only occur in needles and the question, so the asked key's value is unique. The loss
counts only the value tokens of the answer (teacher-forced sequence error = some value token wrong).

Placement (`place_needles`, the same for text haystacks in tokens): the haystack is F filler units plus N
needles; the asked needle goes after round(depth * F) filler units (depth 0: first thing, 1: last), each
other needle after a uniformly random number of filler units in [0, F], so the other needles may land on
either side of it (ties: the asked needle first if depth <= 0.5, else last). Samples are a pure function
of (seed, index[, depth]); training draws depth uniformly in [0, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from train.toy import decode_chars, encode_chars

LETTERS = "abcdefghijklmnop"  # filler and keys
DIGITS = "0123456789"  # values
NEEDLE, EQUALS, QUESTION = "@", "=", "?"
PAD, BOS_CHAR, EOS_CHAR = "_", "^", "$"
VOCAB = LETTERS + DIGITS + NEEDLE + EQUALS + QUESTION + PAD + BOS_CHAR + EOS_CHAR  # token id = index
NEEDLE_ID, EQUALS_ID, QUESTION_ID, PAD_ID, BOS_ID, EOS_ID = (
    VOCAB.index(c) for c in (NEEDLE, EQUALS, QUESTION, PAD, BOS_CHAR, EOS_CHAR)
)
VOCAB_SIZE = len(VOCAB)  # 32


def encode(text: str) -> np.ndarray:
    """Characters of VOCAB ("^" = BOS, "$" = EOS) -> int32 ids [len(text)]."""
    return encode_chars(text, VOCAB)


def decode(ids: Any) -> str:
    """int ids [n] -> their characters."""
    return decode_chars(ids, VOCAB, "needle")


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def check_depth(depth: Any, name: str = "depth") -> float:
    if isinstance(depth, bool) or not isinstance(depth, int | float) or not 0.0 <= depth <= 1.0:
        rule = "must be a number in [0, 1] (a fraction of the context)"
        raise ValueError(f"{name}={depth!r} is invalid: {rule}")
    return float(depth)


def place_needles(
    rng: np.random.Generator, num_filler: int, num_needles: int, asked: int, depth: float
) -> np.ndarray:
    """How many filler units come before each needle: int [num_needles], the asked one round(depth * F).

    Among needles at the same offset the asked one comes first when depth <= 0.5, else last (see
    interleave), so depth 0 and 1 put it at the very start and end of the haystack.
    """
    offsets = rng.integers(0, num_filler + 1, size=num_needles)
    offsets[asked] = round(depth * num_filler)
    return offsets


def interleave(
    filler: list, needles: list[list], offsets: np.ndarray, asked: int, depth: float
) -> tuple[list, list[int]]:
    """filler units with needle i inserted after offsets[i] of them -> (sequence, start of each needle).

    Ties: needles in index order, the asked one first if depth <= 0.5, else last."""
    asked_rank = -1 if depth <= 0.5 else 1
    order = sorted(range(len(needles)), key=lambda i: (offsets[i], asked_rank if i == asked else 0, i))
    out, starts, used = [], [0] * len(needles), 0
    for i in order:
        out.extend(filler[used : offsets[i]])
        used = max(used, int(offsets[i]))
        starts[i] = len(out)
        out.extend(needles[i])
    out.extend(filler[used:])
    return out, starts


def validate(
    seq_len: Any,
    num_needles: Any,
    key_len: Any,
    value_len: Any,
    *,
    names: tuple[str, str, str, str] = ("seq_len", "num_needles", "key_len", "value_len"),
) -> None:
    """Raise ValueError (naming the field by `names`) unless the values make a sample that fits."""
    t_name, n_name, k_name, v_name = names
    if not _is_int(key_len) or not 1 <= key_len <= 4:
        raise ValueError(f"{k_name}={key_len!r} is invalid: must be an integer in [1, 4] (letters per key)")
    if not _is_int(num_needles) or not 1 <= num_needles <= len(LETTERS) ** key_len:
        raise ValueError(
            f"{n_name}={num_needles!r} is invalid: must be an integer in [1, {len(LETTERS) ** key_len}] "
            f"(distinct keys of {k_name}={key_len} letters)"
        )
    if not _is_int(value_len) or not 1 <= value_len <= 8:
        rule = "must be an integer in [1, 8] (digits per value)"
        raise ValueError(f"{v_name}={value_len!r} is invalid: {rule}")
    need = num_needles * (key_len + value_len + 2) + key_len + value_len + 3
    if not _is_int(seq_len) or seq_len < need:
        raise ValueError(
            f"{t_name}={seq_len!r} is invalid: {num_needles} needle(s) with {k_name}={key_len} and "
            f"{v_name}={value_len} need seq_len >= {need}"
        )


@dataclasses.dataclass(frozen=True)
class NeedleSample:
    """One drawn sample: text without BOS/EOS, each needle's start in that text, keys, values, asked."""

    text: str
    starts: list[int]
    keys: list[str]
    values: list[str]
    asked: int
    filler_before_asked: int


@dataclasses.dataclass(frozen=True)
class NeedleTask:
    """Rows of seq_len + 1 tokens (BOS ... EOS, no padding); inputs/targets are [:-1] / [1:]."""

    seq_len: int = 64
    num_needles: int = 2
    key_len: int = 2
    value_len: int = 2

    def __post_init__(self):
        validate(self.seq_len, self.num_needles, self.key_len, self.value_len)

    @property
    def needle_len(self) -> int:
        return self.key_len + self.value_len + 2  # "@" key "=" value

    @property
    def haystack_len(self) -> int:
        """Characters between BOS and the question: filler and needles."""
        return self.seq_len - self.key_len - self.value_len - 3

    @property
    def num_filler(self) -> int:
        return self.haystack_len - self.num_needles * self.needle_len

    def draw(self, seed: int, index: int, depth: float | None = None) -> NeedleSample:
        """The sample of (seed, index); depth None draws it uniformly in [0, 1]."""
        rng = np.random.default_rng((seed, index))
        n, k = self.num_needles, self.key_len
        codes = rng.choice(len(LETTERS) ** k, size=n, replace=False)
        keys = ["".join(LETTERS[(c // len(LETTERS) ** j) % len(LETTERS)] for j in range(k)) for c in codes]
        values = ["".join(rng.choice(list(DIGITS), size=self.value_len)) for _ in range(n)]
        asked = int(rng.integers(n))
        drawn = float(rng.random())  # always drawn, so that a given depth moves only the needles
        depth = drawn if depth is None else check_depth(depth)
        filler = list(rng.choice(list(LETTERS), size=self.num_filler))
        offsets = place_needles(rng, self.num_filler, n, asked, depth)
        needles = [list(NEEDLE + key + EQUALS + value) for key, value in zip(keys, values, strict=True)]
        chars, starts = interleave(filler, needles, offsets, asked, depth)
        text = "".join(chars) + QUESTION + keys[asked] + EQUALS + values[asked]
        return NeedleSample(text, starts, keys, values, asked, int(offsets[asked]))

    def sample(self, seed: int, index: int, depth: float | None = None) -> dict[str, np.ndarray]:
        """One row of the batch contract (train/data.py), each [T]: weights 1 on the value tokens."""
        body = encode(self.draw(seed, index, depth).text)
        row = np.concatenate([[BOS_ID], body, [EOS_ID]]).astype(np.int32)
        weights = np.zeros(self.seq_len, np.float32)
        weights[self.seq_len - 1 - self.value_len : self.seq_len - 1] = 1.0  # targets = the value digits
        return {
            "inputs": row[:-1],
            "targets": row[1:],
            "weights": weights,
            "segment_ids": np.ones(self.seq_len, np.int32),
            "positions": np.arange(self.seq_len, dtype=np.int32),
        }
