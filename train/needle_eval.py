"""Needle-in-a-haystack grids for any checkpoint: rows of the synthetic task (train/needles.py) or needles
in a tokenized haystack text, scored over needles x context lengths x depths. CLI: train/evaluate.py."""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from train import needles as needles_lib
from train.scoring import Row, Scorer, body_ids, bos_ids, invalid, score_rows


class SyntheticNeedles:
    """Rows of the synthetic task (train/needles.py) at any context length."""

    kind = "synthetic"

    def __init__(self, key_len: int = 2, value_len: int = 2):
        self.key_len, self.value_len = key_len, value_len

    def row(self, context_len: int, num_needles: int, depth: float, seed: int, index: int) -> Row:
        names = ("context_len", "needles", "key_len", "value_len")
        needles_lib.validate(context_len, num_needles, self.key_len, self.value_len, names=names)
        task = needles_lib.NeedleTask(context_len, num_needles, self.key_len, self.value_len)
        sample = task.sample(seed, index, depth)
        return sample["inputs"], sample["targets"], sample["weights"]


class TextNeedles:
    """Rows with needles " The key K is V." in a tokenized haystack text (any tokenizer)."""

    kind = "text"

    def __init__(self, tokenizer: Any, haystack: str, key_len: int = 6, value_len: int = 4):
        if not isinstance(key_len, int) or not 1 <= key_len <= 16:
            raise invalid("key_len", key_len, "must be an integer in [1, 16] (letters per key)")
        if not isinstance(value_len, int) or not 1 <= value_len <= 16:
            raise invalid("value_len", value_len, "must be an integer in [1, 16] (digits per value)")
        self.tokenizer, self.key_len, self.value_len = tokenizer, key_len, value_len
        self.haystack = body_ids(tokenizer, haystack)
        if self.haystack.size == 0:
            raise invalid("haystack", haystack[:40], "holds no tokens")

    def row(self, context_len: int, num_needles: int, depth: float, seed: int, index: int) -> Row:
        if not isinstance(num_needles, int) or not 1 <= num_needles <= 26**self.key_len:
            raise invalid(
                "needles", num_needles, f"must be an integer in [1, {26**self.key_len}] (distinct keys)"
            )
        depth = needles_lib.check_depth(depth)
        rng = np.random.default_rng((seed, index))
        keys: list[str] = []
        while len(keys) < num_needles:
            key = "".join(rng.choice(list(string.ascii_lowercase), size=self.key_len))
            keys += [key] if key not in keys else []
        values = ["".join(rng.choice(list(string.digits), size=self.value_len)) for _ in keys]
        asked = int(rng.integers(num_needles))
        tok = self.tokenizer
        needle_ids = [list(body_ids(tok, f" The key {k} is {v}.")) for k, v in zip(keys, values, strict=True)]
        question = list(body_ids(tok, f" What is the key {keys[asked]}? The key {keys[asked]} is"))
        answer = list(body_ids(tok, f" {values[asked]}"))
        bos = bos_ids(tok)
        fixed = len(bos) + sum(len(n) for n in needle_ids) + len(question) + len(answer)
        if not isinstance(context_len, int) or context_len + 1 < fixed:
            rule = (
                f"{num_needles} needles, the question and the answer need context_len >= {fixed - 1} tokens"
            )
            raise invalid("context_len", context_len, rule)
        num_filler = context_len + 1 - fixed
        start = int(rng.integers(self.haystack.size))
        filler = list(np.take(self.haystack, start + np.arange(num_filler), mode="wrap"))
        offsets = needles_lib.place_needles(rng, num_filler, num_needles, asked, depth)
        body, _ = needles_lib.interleave(filler, needle_ids, offsets, asked, depth)
        seq = np.asarray(bos + body + question + answer, np.int32)
        weights = np.zeros(context_len, np.float32)
        weights[context_len - len(answer) :] = 1.0
        return seq[:-1], seq[1:], weights


def needle_grid(
    scorer: Scorer,
    source: SyntheticNeedles | TextNeedles,
    *,
    context_lens: Sequence[int],
    depths: Sequence[float],
    needle_counts: Sequence[int],
    samples: int,
    seed: int = 0,
    batch: int = 8,
    pad_id: int = 0,
) -> list[dict[str, Any]]:
    """One result per (needles, context_len, depth) cell: accuracy (every answer token argmax) and
    answer_nats (mean nats of the answer), over `samples` samples (indices 0 .. samples - 1)."""
    if not isinstance(samples, int) or samples < 1:
        raise invalid("samples", samples, "must be a positive integer")
    cells = []
    for n in needle_counts:
        for length in context_lens:
            for depth in depths:
                rows = [source.row(length, n, depth, seed, i) for i in range(samples)]
                scored = score_rows(scorer, rows, batch=batch, pad_id=pad_id, length=length)
                right = [bool(h[w > 0].all()) for (_, h), (_, _, w) in zip(scored, rows, strict=True)]
                nats = [float((s * w).sum()) for (s, _), (_, _, w) in zip(scored, rows, strict=True)]
                cells.append(
                    {
                        "needles": n,
                        "context_len": length,
                        "depth": depth,
                        "samples": samples,
                        "accuracy": sum(right) / samples,
                        "answer_nats": sum(nats) / samples,
                    }
                )
    return cells


def needle_table(cells: Sequence[dict[str, Any]]) -> str:
    """Accuracy (%) per depth (rows) and context length (columns), one block per needle count."""
    lines = []
    for n in sorted({c["needles"] for c in cells}):
        mine = [c for c in cells if c["needles"] == n]
        lengths = sorted({c["context_len"] for c in mine})
        lines.append(f"{n} needles: accuracy % (rows: depth, columns: context length)")
        lines.append("depth  " + "".join(f"{length:>8}" for length in lengths))
        for depth in sorted({c["depth"] for c in mine}):
            row = {c["context_len"]: c["accuracy"] for c in mine if c["depth"] == depth}
            lines.append(f"{depth:<7.2f}" + "".join(f"{100 * row[length]:>8.1f}" for length in lengths))
    return "\n".join(lines)
