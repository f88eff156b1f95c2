"""Teacher-forced scoring of token rows by a model: perplexity and bits per byte of text, and LAMBADA-style
last-word accuracy. The rules (windows, what is scored, the JSON Lines format) are in train/evaluate.py's
docstring; the CLI is there too."""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# (inputs int32 [B, T], targets int32 [B, T]) -> (nats float [B, T], argmax == target bool [B, T])
Scorer = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
Row = tuple[np.ndarray, np.ndarray, np.ndarray]  # inputs [n], targets [n], weights [n] (1 = scored)


def invalid(name: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: {rule}")


def logits_scorer(logits_fn: Callable[[np.ndarray], Any]) -> Scorer:
    """A Scorer from any tokens [B, T] -> logits [B, T, V] function, computed in float64 numpy."""

    def score(inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = np.asarray(logits_fn(inputs), np.float64)
        top = logits.max(axis=-1, keepdims=True)
        log_z = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[..., 0]
        picked = np.take_along_axis(logits, targets[..., None].astype(np.int64), axis=-1)[..., 0]
        return log_z - picked, logits.argmax(axis=-1) == targets

    return score


def model_scorer(model) -> Scorer:
    """A Scorer for an MTATransformer: one jitted forward pass; the logits never leave the device. Models of
    one config share the compiled program (the graph is a static argument, the parameters traced)."""
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    def run(inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nats, hits = _jitted_score()(
            graphdef, state, jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32)
        )
        return np.asarray(nats, np.float64), np.asarray(hits)

    return run


@functools.cache
def _jitted_score():
    """(graphdef, state, inputs [B, T], targets [B, T]) -> (nats [B, T], hits [B, T]), jitted once."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    def score(graphdef, state, inputs, targets):
        logits = nnx.merge(graphdef, state)(inputs)
        nats = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return nats, jnp.argmax(logits, axis=-1) == targets

    return jax.jit(score, static_argnums=0)


def padded_length(n: int) -> int:
    """Rows are padded to a power of two (at least 16) so that few shapes are compiled."""
    return max(16, 1 << (n - 1).bit_length())


def score_rows(
    scorer: Scorer, rows: Sequence[Row], *, batch: int, pad_id: int = 0, length: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(nats [n], hits [n]) of every row, in order; rows of a batch are padded to one length (`length`, or
    padded_length of the longest) and batches to `batch` rows, so that shapes repeat."""
    if not isinstance(batch, int) or batch < 1:
        raise invalid("batch", batch, "must be a positive integer")
    out = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        t = length or padded_length(max(len(row[0]) for row in chunk))
        inputs = np.full((batch, t), pad_id, np.int32)
        targets = np.full((batch, t), pad_id, np.int32)
        for i, (x, y, _) in enumerate(chunk):
            inputs[i, : len(x)], targets[i, : len(y)] = x, y
        nats, hits = scorer(inputs, targets)
        out.extend((nats[i, : len(x)], hits[i, : len(x)]) for i, (x, _, _) in enumerate(chunk))
    return out


# ------------------------------------------------------------------------------------------------ tokenizing


def body_ids(tokenizer: Any, text: str) -> np.ndarray:
    """text -> int32 ids without the BOS/EOS that tokenizer.encode adds."""
    ids = np.asarray(tokenizer.encode(text), np.int32)
    if getattr(tokenizer, "bos_id", None) is not None and ids.size and ids[0] == tokenizer.bos_id:
        ids = ids[1:]
    if getattr(tokenizer, "eos_id", None) is not None and ids.size and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return ids


def bos_ids(tokenizer: Any) -> list[int]:
    return [] if getattr(tokenizer, "bos_id", None) is None else [int(tokenizer.bos_id)]


def pad_id_of(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return 0 if pad is None else int(pad)


# ------------------------------------------------------------------------------------------------ perplexity


def windows(ids: np.ndarray, seq_len: int, stride: int | None = None) -> list[Row]:
    """Rows that score every target ids[1:] exactly once, each with at most seq_len inputs.

    stride None (= seq_len): non-overlapping windows; stride S: each later window scores the next S targets
    after seq_len - S tokens of context (the first window scores its seq_len targets).
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise invalid("seq_len", seq_len, "must be a positive integer")
    stride = seq_len if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= seq_len:
        raise invalid("stride", stride, f"must be an integer in [1, seq_len={seq_len}]")
    rows, first = [], 1  # first: the index in ids of the next target to score
    while first < len(ids):
        last = min(first + (seq_len if first == 1 else stride), len(ids)) - 1
        begin = max(0, last - seq_len)
        inputs, targets = ids[begin:last], ids[begin + 1 : last + 1]
        weights = (np.arange(begin + 1, last + 1) >= first).astype(np.float32)
        rows.append((inputs, targets, weights))
        first = last + 1
    return rows


def perplexity(
    scorer: Scorer,
    documents: Sequence[str],
    tokenizer: Any,
    *,
    seq_len: int,
    batch: int = 8,
    stride: int | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Token cross-entropy of the documents (see the module docstring): documents, windows (rows scored),
    tokens, bytes, nats_per_token, perplexity, bits_per_token, bits_per_byte, token_accuracy, seq_len,
    stride."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise invalid("max_tokens", max_tokens, "must be a positive integer or None")
    rows, num_bytes, num_docs, left = [], 0, 0, max_tokens
    special = {getattr(tokenizer, n, None) for n in ("bos_id", "eos_id", "pad_id")} - {None}
    for doc in documents:
        ids = np.asarray(tokenizer.encode(doc), np.int32)
        if left is not None and len(ids) - 1 > left:
            ids = ids[: left + 1]
            kept = [int(i) for i in ids[1:] if int(i) not in special]
            num_bytes += len(tokenizer.decode(kept).encode("utf-8"))
        else:
            num_bytes += len(doc.encode("utf-8"))
        rows.extend(windows(ids, seq_len, stride))
        num_docs += 1
        if left is not None:
            left -= len(ids) - 1
            if left <= 0:
                break
    if not rows:
        raise invalid("text", f"{len(documents)} document(s)", "holds no token to score")
    scored = score_rows(scorer, rows, batch=batch, pad_id=pad_id_of(tokenizer), length=seq_len)
    nats = sum(float((n * w).sum()) for (n, _), (_, _, w) in zip(scored, rows, strict=True))
    hits = sum(float((h * w).sum()) for (_, h), (_, _, w) in zip(scored, rows, strict=True))
    tokens = int(sum(w.sum() for _, _, w in rows))
    return {
        "documents": num_docs,
        "windows": len(rows),
        "tokens": tokens,
        "bytes": num_bytes,
        "nats_per_token": nats / tokens,
        "perplexity": math.exp(nats / tokens),
        "bits_per_token": nats / tokens / math.log(2),
        "bits_per_byte": nats / math.log(2) / max(num_bytes, 1),
        "token_accuracy": hits / tokens,
        "seq_len": seq_len,
        "stride": stride or seq_len,
    }


# --------------------------------------------------------------------------------------------------- lambada

_LAST_WORD = re.compile(r"(.*\S)(\s+\S+)", re.DOTALL)


def split_last_word(text: str) -> tuple[str, str]:
    """(context, target): target = the whitespace and the last whitespace-separated word of text."""
    match = _LAST_WORD.fullmatch(text.rstrip()) if isinstance(text, str) else None
    if match is None:
        raise invalid("text", text, "needs a context and a last word separated by whitespace")
    return match.group(1), match.group(2)


def read_lambada(path: str | Path) -> list[str]:
    """The "text" of every line of a JSON Lines file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise invalid("file", str(path), "no such file")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise invalid("file", f"{path}:{number}", f"not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise invalid("file", f"{path}:{number}", 'each line must be an object with a "text" string')
        texts.append(item["text"])
    if not texts:
        raise invalid("file", str(path), "holds no examples")
    return texts


def lambada_row(tokenizer: Any, text: str, max_len: int) -> Row:
    """BOS + context tokens + target tokens, the oldest context cut to fit max_len inputs; weights on the
    target tokens."""
    context, target = split_last_word(text)
    target_ids = body_ids(tokenizer, target)
    if target_ids.size == 0 or target_ids.size > max_len:
        raise invalid(
            "text", text, f"the target {target!r} has {target_ids.size} tokens (need 1 to {max_len})"
        )
    seq = np.concatenate([bos_ids(tokenizer), body_ids(tokenizer, context), target_ids]).astype(np.int32)
    seq = seq[-(max_len + 1) :]
    weights = np.zeros(len(seq) - 1, np.float32)
    weights[-target_ids.size :] = 1.0
    return seq[:-1], seq[1:], weights


def lambada(scorer: Scorer, texts: Sequence[str], tokenizer: Any, *, seq_len: int, batch: int = 8) -> dict:
    """examples, accuracy, perplexity (per word), nats_per_word, target_tokens, nats_per_target_token."""
    rows = [lambada_row(tokenizer, text, seq_len) for text in texts]
    scored = score_rows(scorer, rows, batch=batch, pad_id=pad_id_of(tokenizer))
    word_nats = [float((n * w).sum()) for (n, _), (_, _, w) in zip(scored, rows, strict=True)]
    right = [bool(h[w > 0].all()) for (_, h), (_, _, w) in zip(scored, rows, strict=True)]
    tokens = int(sum(w.sum() for _, _, w in rows))
    return {
        "examples": len(rows),
        "accuracy": sum(right) / len(rows),
        "perplexity": math.exp(sum(word_nats) / len(rows)),
        "nats_per_word": sum(word_nats) / len(rows),
        "target_tokens": tokens,
        "nats_per_target_token": sum(word_nats) / tokens,
    }
