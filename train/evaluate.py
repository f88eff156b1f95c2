"""Evaluate a checkpoint: perplexity and bits per byte, LAMBADA-style last word, needle in a haystack.

    python -m train.evaluate perplexity --checkpoint runs/tiny_lm [--text FILE|DIR|GLOB] [--seq-len 256]
        [--stride 128] [--batch 8] [--max-tokens 100000] [--output ppl.json]
    python -m train.evaluate lambada --checkpoint runs/tiny_lm --file lambada.jsonl [--output l.json]
    python -m train.evaluate needles --checkpoint runs/needles_small [--haystack FILE] \\
        --context-lens 64 128 --depths 0 0.5 1 --needles 2 4 6 --samples 20 [--output n.json]

--checkpoint is a training run directory or a parameter directory (train/params_io.py); --step picks a
checkpoint of a run. The tokenizer is --tokenizer ("byte", a tokenizer.json or a SentencePiece *.model),
else the run's data.tokenizer, else bytes. Every number is from teacher forcing, one forward pass per row.

perplexity: the text (default: the run's held-out documents) is split into documents at --doc-separator
  (as training does), each encoded as BOS + tokens + EOS. Every token after BOS is scored, EOS included;
  BOS only gives context. Windows: rows of --seq-len inputs; without --stride they do not overlap, the
  first input of each window being the last target of the one before (scored there, context only here);
  with --stride S each window after the first scores the next S targets with the up to seq_len - S tokens
  before them as extra context. nats/token = total nats / scored tokens; perplexity = exp(nats/token);
  bits/byte = total nats / ln 2 / bytes, bytes = UTF-8 bytes of the scored documents' text (of the scored
  tokens' decoded text for a document cut by --max-tokens). With the byte tokenizer the scored tokens are
  the bytes plus one EOS per document, so bits/byte = bits/token * tokens / bytes.
lambada: a JSON Lines file, one object per line with a "text" string (the format of OpenAI's
  lambada_test.jsonl): {"text": "... she said, holding out the"} ... The target is the last
  whitespace-separated word (punctuation included) with the whitespace before it, the context everything
  before that, as lm-eval-harness does. Context and target are tokenized apart (BOS + context, then the
  target without BOS/EOS), contexts longer than --seq-len lose their oldest tokens. accuracy: every target
  token is the argmax given the true tokens before it (greedy decoding reproduces the word); perplexity:
  exp(total target nats / words).
needles: see train/needles.py for the placement rule. With --haystack (any text model) needle i is the
  sentence " The key K is V." (K: --key-len random lowercase letters, distinct; V: --value-len digits),
  filler is a window of the tokenized haystack file from a random place (wrapping around), and the
  question " What is the key K? The key K is" is followed by the answer " V". Without --haystack the
  synthetic task of train/needles.py (a run of data.kind=needles, or --synthetic) is used. Context length =
  the row's input tokens T: BOS up to the answer's last token but one (text), or up to the answer's last
  token, EOS being the last target (synthetic). A sample is right when every answer token is the argmax.
  Cells: --needles x --context-lens x --depths, --samples each (sample i is (--seed, i)).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import string
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train import needles as needles_lib

# (inputs int32 [B, T], targets int32 [B, T]) -> (nats float [B, T], argmax == target bool [B, T])
Scorer = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
Row = tuple[np.ndarray, np.ndarray, np.ndarray]  # inputs [n], targets [n], weights [n] (1 = scored)


def _error(name: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: {rule}")


# --------------------------------------------------------------------------------------------------- scoring


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
        raise _error("batch", batch, "must be a positive integer")
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


def _bos(tokenizer: Any) -> list[int]:
    return [] if getattr(tokenizer, "bos_id", None) is None else [int(tokenizer.bos_id)]


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return 0 if pad is None else int(pad)


# ------------------------------------------------------------------------------------------------ perplexity


def windows(ids: np.ndarray, seq_len: int, stride: int | None = None) -> list[Row]:
    """Rows that score every target ids[1:] exactly once, each with at most seq_len inputs.

    stride None (= seq_len): non-overlapping windows; stride S: each later window scores the next S targets
    after seq_len - S tokens of context (the first window scores its seq_len targets).
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise _error("seq_len", seq_len, "must be a positive integer")
    stride = seq_len if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= seq_len:
        raise _error("stride", stride, f"must be an integer in [1, seq_len={seq_len}]")
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
    """Token cross-entropy of the documents (see the module docstring): tokens, bytes, nats_per_token,
    perplexity, bits_per_token, bits_per_byte, token_accuracy, documents."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise _error("max_tokens", max_tokens, "must be a positive integer or None")
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
        raise _error("text", f"{len(documents)} document(s)", "holds no token to score")
    scored = score_rows(scorer, rows, batch=batch, pad_id=_pad_id(tokenizer), length=seq_len)
    nats = sum(float((n * w).sum()) for (n, _), (_, _, w) in zip(scored, rows, strict=True))
    hits = sum(float((h * w).sum()) for (_, h), (_, _, w) in zip(scored, rows, strict=True))
    tokens = int(sum(w.sum() for _, _, w in rows))
    return {
        "documents": num_docs,
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
        raise _error("text", text, "needs a context and a last word separated by whitespace")
    return match.group(1), match.group(2)


def read_lambada(path: str | Path) -> list[str]:
    """The "text" of every line of a JSON Lines file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise _error("file", str(path), "no such file")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error("file", f"{path}:{number}", f"not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise _error("file", f"{path}:{number}", 'each line must be an object with a "text" string')
        texts.append(item["text"])
    if not texts:
        raise _error("file", str(path), "holds no examples")
    return texts


def lambada_row(tokenizer: Any, text: str, max_len: int) -> Row:
    """BOS + context tokens + target tokens, the oldest context cut to fit max_len inputs; weights on the
    target tokens."""
    context, target = split_last_word(text)
    target_ids = body_ids(tokenizer, target)
    if target_ids.size == 0 or target_ids.size > max_len:
        raise _error(
            "text", text, f"the target {target!r} has {target_ids.size} tokens (need 1 to {max_len})"
        )
    seq = np.concatenate([_bos(tokenizer), body_ids(tokenizer, context), target_ids]).astype(np.int32)
    seq = seq[-(max_len + 1) :]
    weights = np.zeros(len(seq) - 1, np.float32)
    weights[-target_ids.size :] = 1.0
    return seq[:-1], seq[1:], weights


def lambada(scorer: Scorer, texts: Sequence[str], tokenizer: Any, *, seq_len: int, batch: int = 8) -> dict:
    """examples, accuracy, perplexity (per word), nats_per_word, target_tokens, nats_per_target_token."""
    rows = [lambada_row(tokenizer, text, seq_len) for text in texts]
    scored = score_rows(scorer, rows, batch=batch, pad_id=_pad_id(tokenizer))
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


# --------------------------------------------------------------------------------------------------- needles


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
            raise _error("key_len", key_len, "must be an integer in [1, 16] (letters per key)")
        if not isinstance(value_len, int) or not 1 <= value_len <= 16:
            raise _error("value_len", value_len, "must be an integer in [1, 16] (digits per value)")
        self.tokenizer, self.key_len, self.value_len = tokenizer, key_len, value_len
        self.haystack = body_ids(tokenizer, haystack)
        if self.haystack.size == 0:
            raise _error("haystack", haystack[:40], "holds no tokens")

    def row(self, context_len: int, num_needles: int, depth: float, seed: int, index: int) -> Row:
        if not isinstance(num_needles, int) or not 1 <= num_needles <= 26**self.key_len:
            raise _error(
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
        bos = _bos(tok)
        fixed = len(bos) + sum(len(n) for n in needle_ids) + len(question) + len(answer)
        if not isinstance(context_len, int) or context_len + 1 < fixed:
            rule = (
                f"{num_needles} needles, the question and the answer need context_len >= {fixed - 1} tokens"
            )
            raise _error("context_len", context_len, rule)
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
        raise _error("samples", samples, "must be a positive integer")
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


# ------------------------------------------------------------------------------------------------------- CLI


def _run_data_config(checkpoint: str):
    """The DataConfig of a run directory, or None for a parameter directory."""
    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        return None
    from train.config import load_train_config

    return load_train_config(path).data


def _tokenizer(args, data_cfg, vocab_size: int):
    from train.data import DataConfig, load_tokenizer

    if args.tokenizer is not None:
        tokenizer = load_tokenizer(DataConfig(kind="text", tokenizer=args.tokenizer))
    elif data_cfg is not None and data_cfg.kind == "text":
        tokenizer = load_tokenizer(data_cfg)
    elif data_cfg is not None:
        rule = f"the run trained on data.kind={data_cfg.kind!r}, not text; give --tokenizer to force one"
        raise _error("checkpoint", args.checkpoint, rule)
    else:
        tokenizer = load_tokenizer(DataConfig(kind="text"))
    if tokenizer.vocab_size > vocab_size:
        rule = f"emits {tokenizer.vocab_size} token ids, the model's vocab_size is {vocab_size}"
        raise _error("tokenizer", args.tokenizer or getattr(data_cfg, "tokenizer", "byte"), rule)
    return tokenizer


def _documents(args, data_cfg) -> list[str]:
    from train.data import DataConfig, read_documents, split_documents

    if args.text is not None:
        return read_documents(DataConfig(kind="text", path=args.text, doc_separator=args.doc_separator))
    if data_cfg is not None and data_cfg.kind == "text":
        return split_documents(data_cfg)[1]
    raise _error(
        "text", None, "give --text FILE|DIR|GLOB (only a text run has held-out documents to default to)"
    )


def _needle_source(args, data_cfg, tokenizer_fn):
    if args.haystack is not None:
        path = Path(args.haystack)
        if not path.is_file():
            raise _error("haystack", args.haystack, "no such file")
        lens = {k: v for k, v in (("key_len", args.key_len), ("value_len", args.value_len)) if v is not None}
        return TextNeedles(tokenizer_fn(), path.read_text(encoding="utf-8"), **lens)
    if data_cfg is not None and data_cfg.kind == "needles":
        key_len = args.key_len or data_cfg.needles_key_len
        return SyntheticNeedles(key_len, args.value_len or data_cfg.needles_value_len)
    if args.synthetic:
        return SyntheticNeedles(args.key_len or 2, args.value_len or 2)
    rule = "give --haystack FILE for a text model, or --synthetic for a model of the synthetic needle task"
    raise _error("checkpoint", args.checkpoint, rule)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="a run directory or a parameter directory")
    common.add_argument("--step", type=int, default=None, help="which checkpoint of a run (default: newest)")
    common.add_argument("--tokenizer", default=None, help='"byte", a tokenizer.json or a *.model file')
    common.add_argument("--batch", type=int, default=8, help="rows per forward pass")
    common.add_argument("--attention", default=None, help="attention_implementation override, e.g. reference")
    common.add_argument("--output", default=None, help="also write the results here as JSON")

    ppl = commands.add_parser(
        "perplexity", parents=[common], help="nats per token, perplexity, bits per byte"
    )
    ppl.add_argument(
        "--text", default=None, help="a file, a directory of *.txt or a glob (default: held out)"
    )
    ppl.add_argument("--doc-separator", default="\n\n", help="splits the text into documents")
    ppl.add_argument("--seq-len", type=int, default=256, help="inputs per window")
    ppl.add_argument("--stride", type=int, default=None, help="targets per later window (default: seq-len)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="stop after this many scored tokens")

    lam = commands.add_parser("lambada", parents=[common], help="last-word accuracy and perplexity")
    lam.add_argument("--file", required=True, help='JSON Lines, one {"text": ...} per line')
    lam.add_argument("--seq-len", type=int, default=1024, help="the most input tokens per example")

    ndl = commands.add_parser("needles", parents=[common], help="needle-in-a-haystack accuracy grid")
    ndl.add_argument("--haystack", default=None, help="a text file of filler (text models)")
    ndl.add_argument("--synthetic", action="store_true", help="the synthetic task of train/needles.py")
    ndl.add_argument("--context-lens", type=int, nargs="+", default=[64], help="input tokens per row")
    ndl.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ndl.add_argument("--needles", type=int, nargs="+", default=[2, 4, 6], help="needles per sample")
    ndl.add_argument("--samples", type=int, default=10, help="samples per cell")
    ndl.add_argument("--seed", type=int, default=0)
    ndl.add_argument("--key-len", type=int, default=None, help="key letters (synthetic: the run's; text: 6)")
    ndl.add_argument(
        "--value-len", type=int, default=None, help="value digits (synthetic: the run's; text: 4)"
    )
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs one evaluation from parsed arguments; returns what it prints and writes."""
    from train.params_io import load_model

    overrides = {} if args.attention is None else {"attention_implementation": args.attention}
    model = load_model(args.checkpoint, step=args.step, **overrides)
    vocab = model.cfg.vocab_size
    data_cfg = _run_data_config(args.checkpoint)
    scorer = model_scorer(model)
    result: dict[str, Any] = {"command": args.command, "checkpoint": str(args.checkpoint), "step": args.step}
    if args.command == "perplexity":
        tokenizer = _tokenizer(args, data_cfg, vocab)
        docs = _documents(args, data_cfg)
        kw = dict(seq_len=args.seq_len, batch=args.batch, stride=args.stride, max_tokens=args.max_tokens)
        result.update(perplexity(scorer, docs, tokenizer, **kw))
    elif args.command == "lambada":
        tokenizer = _tokenizer(args, data_cfg, vocab)
        result.update(
            lambada(scorer, read_lambada(args.file), tokenizer, seq_len=args.seq_len, batch=args.batch)
        )
    else:
        source = _needle_source(args, data_cfg, lambda: _tokenizer(args, data_cfg, vocab))
        if source.kind == "synthetic" and vocab < needles_lib.VOCAB_SIZE:
            raise _error(
                "checkpoint", args.checkpoint, f"vocab_size {vocab} < the task's {needles_lib.VOCAB_SIZE}"
            )
        pad = needles_lib.PAD_ID if source.kind == "synthetic" else _pad_id(source.tokenizer)
        cells = needle_grid(
            scorer,
            source,
            context_lens=args.context_lens,
            depths=args.depths,
            needle_counts=args.needles,
            samples=args.samples,
            seed=args.seed,
            batch=args.batch,
            pad_id=pad,
        )
        result.update({"task": source.kind, "key_len": source.key_len, "value_len": source.value_len})
        result["cells"] = cells
    return result


def _summary(result: dict[str, Any]) -> str:
    if result["command"] == "needles":
        return needle_table(result["cells"])
    skip = ("command", "checkpoint", "step")
    return "\n".join(
        f"{k:<24}{v:.6g}" if isinstance(v, float) else f"{k:<24}{v}"
        for k, v in result.items()
        if k not in skip
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_summary(result), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
