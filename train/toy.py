"""The toy task of the MTA paper (spec section 6): find the block that holds the query letters.

A sample is K blocks of N distinct random letters joined by ".", then "#", then L query letters drawn
(in random order) from one target block, then the answer: the target block's letters ("all"), its first
letter ("first") or its last ("last"). No other block holds all the query letters, so the target is
unique. Tokens: BOS + text + EOS, then "_" padding up to seq_len + 1 tokens; the loss counts only the
answer tokens and EOS. K is as large as fits: N=5, L=2, "all" and seq_len=320 give the paper's
319 characters (52 blocks).

Samples are a pure function of (seed, index): nothing is stored.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import numpy as np

LETTERS = string.ascii_lowercase
SEP, QUERY, PAD = ".", "#", "_"
BOS_CHAR, EOS_CHAR = "^", "$"  # how decode() writes BOS and EOS
VOCAB = LETTERS + SEP + QUERY + PAD + BOS_CHAR + EOS_CHAR  # token id = index in this string
SEP_ID, QUERY_ID, PAD_ID, BOS_ID, EOS_ID = (VOCAB.index(c) for c in (SEP, QUERY, PAD, BOS_CHAR, EOS_CHAR))
VOCAB_SIZE = len(VOCAB)  # 31
ANSWERS = ("all", "first", "last")


def encode_chars(text: str, vocab: str) -> np.ndarray:
    """Characters of a character vocabulary -> int32 ids [len(text)] (id = index in vocab)."""
    bad = sorted(set(text) - set(vocab))
    if bad:
        raise ValueError(f"text={text!r} is invalid: characters {bad} are not in the vocabulary {vocab!r}")
    return np.asarray([vocab.index(c) for c in text], np.int32)


def decode_chars(ids: Any, vocab: str, task: str) -> str:
    """int ids [n] of a character vocabulary -> their characters; `task` names the vocabulary in errors."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= len(vocab)):
        raise ValueError(f"ids={ids.tolist()!r} is invalid: {task} token ids lie in [0, {len(vocab)})")
    return "".join(vocab[i] for i in ids.tolist())


def encode(text: str) -> np.ndarray:
    """Characters of VOCAB ("^" = BOS, "$" = EOS) -> int32 ids [len(text)]."""
    return encode_chars(text, VOCAB)


def decode(ids: Any) -> str:
    """int ids [n] -> the string of their characters (BOS as "^", EOS as "$", padding as "_")."""
    return decode_chars(ids, VOCAB, "toy")


def answer_len(block_size: int, answer: str) -> int:
    return block_size if answer == "all" else 1


def num_blocks(seq_len: int, block_size: int, query_len: int, answer: str) -> int:
    """The most blocks K with BOS + K*N letters + (K-1) "." + "#" + L + answer + EOS <= seq_len + 1."""
    return (seq_len + 1 - query_len - answer_len(block_size, answer) - 2) // (block_size + 1)


def validate(
    block_size: Any,
    query_len: Any,
    answer: Any,
    seq_len: Any,
    *,
    names: tuple[str, str, str, str] = ("block_size", "query_len", "answer", "seq_len"),
) -> None:
    """Raise ValueError (naming the field by `names`) unless the values make a solvable toy task."""

    def is_int(x: Any) -> bool:
        return isinstance(x, int | np.integer) and not isinstance(x, bool)

    n_name, l_name, a_name, t_name = names
    if not is_int(block_size) or not 1 <= block_size < len(LETTERS):
        raise ValueError(
            f"{n_name}={block_size!r} is invalid: must be an integer in [1, {len(LETTERS) - 1}] "
            "(distinct letters per block, and other blocks must be able to miss a query letter)"
        )
    if not is_int(query_len) or not 1 <= query_len <= block_size:
        raise ValueError(f"{l_name}={query_len!r} is invalid: must be an integer in [1, {block_size}] (<= N)")
    if answer not in ANSWERS:
        raise ValueError(f"{a_name}={answer!r} is invalid: must be one of {ANSWERS}")
    if not is_int(seq_len) or num_blocks(seq_len, block_size, query_len, answer) < 2:
        need = 2 * (block_size + 1) + query_len + answer_len(block_size, answer) + 1
        raise ValueError(
            f"{t_name}={seq_len!r} is invalid: the toy task needs at least 2 blocks, "
            f"so seq_len >= {need} for {n_name}={block_size}, {l_name}={query_len}, {a_name}={answer!r}"
        )


@dataclasses.dataclass(frozen=True)
class ToyTask:
    """The toy task at one setting. Rows are seq_len + 1 tokens; inputs/targets are [:-1] / [1:]."""

    seq_len: int = 320
    block_size: int = 5  # N
    query_len: int = 2  # L
    answer: str = "all"  # "all" | "first" | "last"

    def __post_init__(self):
        validate(self.block_size, self.query_len, self.answer, self.seq_len)

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.seq_len, self.block_size, self.query_len, self.answer)

    @property
    def answer_len(self) -> int:
        return answer_len(self.block_size, self.answer)

    @property
    def text_len(self) -> int:
        """Characters between BOS and EOS (319 in the reference setting)."""
        k, n = self.num_blocks, self.block_size
        return k * n + (k - 1) + 1 + self.query_len + self.answer_len

    def blocks(self, seed: int, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        """The random draw: letters int [K, N] (distinct per row), target block t, query letters int [L]."""
        rng = np.random.default_rng((seed, index))
        k, n, q = self.num_blocks, self.block_size, self.query_len
        letters = np.argsort(rng.random((k, len(LETTERS))), axis=1)[:, :n]
        target = int(rng.integers(k))
        query = rng.choice(letters[target], size=q, replace=False)
        others = np.arange(k) != target
        while True:  # resample every other block that holds all the query letters
            holds = np.isin(letters, query).sum(axis=1) == q
            bad = np.flatnonzero(holds & others)
            if bad.size == 0:
                return letters, target, query
            letters[bad] = np.argsort(rng.random((bad.size, len(LETTERS))), axis=1)[:, :n]

    def text(self, seed: int, index: int) -> str:
        """The sample as text, without BOS/EOS/padding, e.g. "abcde.fghij#ig" + "fghij"."""
        letters, target, query = self.blocks(seed, index)
        block_strs = ["".join(LETTERS[i] for i in row) for row in letters]
        answer = {"all": block_strs[target], "first": block_strs[target][0], "last": block_strs[target][-1]}
        return ".".join(block_strs) + QUERY + "".join(LETTERS[i] for i in query) + answer[self.answer]

    def sample(self, seed: int, index: int) -> dict[str, np.ndarray]:
        """One row of the batch contract, each [T] with T = seq_len.

        inputs / targets int32 (targets = next token), weights float32 (1 on the answer tokens and EOS),
        segment_ids int32 (1 on real tokens, 0 on padding), positions int32 (0, 1, ... on real tokens; 0).
        """
        t = self.seq_len
        real = np.concatenate([[BOS_ID], encode(self.text(seed, index)), [EOS_ID]]).astype(np.int32)
        row = np.full(t + 1, PAD_ID, np.int32)
        row[: real.size] = real
        in_doc = np.arange(t) < real.size
        # targets row[i+1] for i in [answer_start - 1, real.size - 1) are the answer tokens and EOS
        weights = np.zeros(t, np.float32)
        weights[real.size - 2 - self.answer_len : real.size - 1] = 1.0
        return {
            "inputs": row[:-1],
            "targets": row[1:],
            "weights": weights,
            "segment_ids": in_doc.astype(np.int32),
            "positions": np.where(in_doc, np.arange(t), 0).astype(np.int32),
        }


def sequence_error(logits_or_predictions: Any, targets: Any, weights: Any) -> float:
    """Teacher-forced sequence error: the fraction of rows with any weighted token predicted wrong.

    logits_or_predictions: float [b, T, V] (argmax is taken) or int [b, T]; targets: int [b, T];
    weights: [b, T] (nonzero where the token counts). Rows without weight are left out; nan if none.
    """
    preds = np.asarray(logits_or_predictions)
    targets, weights = np.asarray(targets), np.asarray(weights)
    if preds.ndim == targets.ndim + 1:
        preds = preds.argmax(axis=-1)
    if preds.shape != targets.shape or weights.shape != targets.shape:
        raise ValueError(
            f"logits_or_predictions.shape={np.shape(logits_or_predictions)} is invalid: must be "
            f"targets.shape={targets.shape} (+ vocab axis), with weights.shape={weights.shape} equal to it"
        )
    if targets.ndim == 1:  # one row
        preds, targets, weights = preds[None], targets[None], weights[None]
    counted = weights != 0
    wrong = ((preds != targets) & counted).reshape(len(targets), -1).any(axis=1)
    rows = counted.reshape(len(targets), -1).any(axis=1)
    return float(wrong[rows].mean()) if rows.any() else float("nan")
