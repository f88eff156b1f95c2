"""Grain input pipelines: the toy task (train/toy.py), the synthetic needle-in-a-haystack task
(train/needles.py) and packed text, for training and evaluation.

Every batch is a dict of numpy arrays for this process only (b = global_batch_size // process_count rows):
inputs int32 [b, T], targets int32 [b, T] (next tokens), weights float32 [b, T] (1 where the loss counts),
segment_ids int32 [b, T] (document within the row, from 1; 0 = padding), positions int32 [b, T]
(position within the document). T = DataConfig.seq_len. Padding: segment 0, weight 0, token = pad id.

Sharding: the (shuffled, repeated) stream of examples is split round-robin over processes, so at each
step the processes together read what one process would read with the whole global batch (exactly so
for the toy task; for text, packing then runs per process over its own documents).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import os
from pathlib import Path
from typing import Any

import grain
import numpy as np

from train import needles, toy

KINDS = ("toy", "text", "needles")
SYNTHETIC_KINDS = ("toy", "needles")  # generated from (seed, index); evaluated by sequence error too
BYTE_BOS, BYTE_EOS, BYTE_PAD = 256, 257, 258
BYTE_VOCAB_SIZE = 259
TOY_TRAIN_SIZE = 2**30  # training samples are toy indices [0, 2**30); evaluation ones start at 2**30
TOY_EVAL_START = TOY_TRAIN_SIZE
MIN_PACKING_BINS = 16  # first-fit packs into max(b, this) rows at a time
_HF_BOS = ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>")
_HF_EOS = ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


def _error(field: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{field}={value!r} is invalid: {rule}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how. Paths are checked when a pipeline is built, not here."""

    kind: str = "toy"  # "toy" | "text" | "needles"
    seq_len: int = 256  # T, tokens per row (inputs length)
    # text
    # a UTF-8 text file, a directory (all *.txt inside, sorted), or a glob; relative to the working directory
    path: str = ""
    tokenizer: str = "byte"  # "byte" | a Hugging Face tokenizer.json | a SentencePiece *.model
    doc_separator: str = "\n\n"  # splits the text into documents
    eval_fraction: float = 0.05  # the last fraction of documents is held out for evaluation
    # toy task (train/toy.py)
    toy_block_size: int = 5  # N
    toy_query_len: int = 2  # L
    toy_answer: str = "all"  # "all" | "first" | "last"
    # synthetic needle in a haystack (train/needles.py)
    needles_count: int = 2  # needles per sample
    needles_key_len: int = 2  # letters per key
    needles_value_len: int = 2  # digits per value
    # all
    shuffle: bool = True
    worker_count: int = 0  # grain worker processes (0 = in-process)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise _error("data.kind", self.kind, f"must be one of {KINDS}")
        if not _is_int(self.seq_len) or self.seq_len < 8:
            raise _error("data.seq_len", self.seq_len, "must be an integer >= 8")
        if not isinstance(self.path, str):
            raise _error("data.path", self.path, "must be a string (a file, a directory or a glob)")
        tok = self.tokenizer
        if not isinstance(tok, str) or not (tok == "byte" or tok.endswith((".json", ".model"))):
            raise _error(
                "data.tokenizer", tok, 'must be "byte", a tokenizer.json file or a SentencePiece *.model file'
            )
        if not isinstance(self.doc_separator, str) or not self.doc_separator:
            raise _error("data.doc_separator", self.doc_separator, "must be a non-empty string")
        frac = self.eval_fraction
        if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac < 1:
            raise _error("data.eval_fraction", frac, "must be a number in (0, 1)")
        names = ("data.toy_block_size", "data.toy_query_len", "data.toy_answer", "data.seq_len")
        # The toy values must always make sense; its seq_len rule applies only to kind="toy".
        seq_len = self.seq_len if self.kind == "toy" else 10**6
        toy.validate(self.toy_block_size, self.toy_query_len, self.toy_answer, seq_len, names=names)
        names = ("data.seq_len", "data.needles_count", "data.needles_key_len", "data.needles_value_len")
        seq_len = self.seq_len if self.kind == "needles" else 10**6
        needle_fields = (self.needles_count, self.needles_key_len, self.needles_value_len)
        needles.validate(seq_len, *needle_fields, names=names)
        if not isinstance(self.shuffle, bool):
            raise _error("data.shuffle", self.shuffle, "must be true or false")
        if not _is_int(self.worker_count) or self.worker_count < 0:
            raise _error("data.worker_count", self.worker_count, "must be an integer >= 0 (0 = in-process)")

    def toy_task(self) -> toy.ToyTask:
        return toy.ToyTask(self.seq_len, self.toy_block_size, self.toy_query_len, self.toy_answer)

    def needle_task(self) -> needles.NeedleTask:
        sizes = (self.needles_count, self.needles_key_len, self.needles_value_len)
        return needles.NeedleTask(self.seq_len, *sizes)

    def synthetic_task(self) -> toy.ToyTask | needles.NeedleTask:
        """The generator of a synthetic kind: .sample(seed, index) -> one row of the batch contract."""
        return self.needle_task() if self.kind == "needles" else self.toy_task()


# ---------------------------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255, BOS 256, EOS 257, pad 258."""

    vocab_size, bos_id, eos_id, pad_id = BYTE_VOCAB_SIZE, BYTE_BOS, BYTE_EOS, BYTE_PAD

    def encode(self, text: str) -> np.ndarray:
        """text -> int32 [n + 2]: BOS, the UTF-8 bytes, EOS."""
        body = np.frombuffer(text.encode("utf-8"), np.uint8)
        return np.concatenate([[BYTE_BOS], body, [BYTE_EOS]]).astype(np.int32)

    def decode(self, ids: Any) -> str:
        return bytes(i for i in np.asarray(ids).tolist() if i < 256).decode("utf-8", errors="replace")


class _FileTokenizer:
    """A tokenizer loaded from a file; pickles as its path (for Grain's worker processes)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise _error("data.tokenizer", path, "no such file")
        self.path = path
        self._load()

    def __getstate__(self) -> dict[str, str]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.path = state["path"]
        self._load()

    def _load(self) -> None:
        raise NotImplementedError

    def _ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        """text -> int32 [n]: BOS (if the tokenizer has one), the tokens, EOS (if it has one)."""
        bos = [self.bos_id] if self.bos_id is not None else []
        eos = [self.eos_id] if self.eos_id is not None else []
        return np.asarray(bos + self._ids(text) + eos, np.int32)


class HFTokenizer(_FileTokenizer):
    """A Hugging Face `tokenizers` tokenizer.json; BOS/EOS/pad found by their usual names."""

    def _load(self) -> None:
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(
                f"data.tokenizer={self.path!r} needs the `tokenizers` package: pip install 'mta-jax[text]'"
            ) from e
        self._tok = tokenizers.Tokenizer.from_file(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        def find(names: tuple[str, ...]) -> int | None:
            ids = [self._tok.token_to_id(n) for n in names]
            return next((i for i in ids if i is not None), None)

        self.bos_id, self.eos_id = find(_HF_BOS), find(_HF_EOS)
        pad = find(_HF_PAD)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def _ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Any) -> str:
        return self._tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece *.model; BOS/EOS/pad are the model's own (if enabled)."""

    def _load(self) -> None:
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(
                f"data.tokenizer={self.path!r} needs the `sentencepiece` package: pip install 'mta-jax[text]'"
            ) from e
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)

    def _ids(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Any) -> str:
        return self._sp.decode(np.asarray(ids).tolist())


def load_tokenizer(cfg: DataConfig) -> ByteTokenizer | HFTokenizer | SentencePieceTokenizer:
    """The tokenizer named by cfg.tokenizer: encode(str) -> int32 ids with BOS/EOS, decode, vocab_size."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer.endswith(".model"):
        return SentencePieceTokenizer(cfg.tokenizer)
    return HFTokenizer(cfg.tokenizer)


def vocab_size(cfg: DataConfig) -> int:
    """How many token ids the pipeline can emit (the model's vocab_size must be at least this)."""
    if cfg.kind in SYNTHETIC_KINDS:
        return needles.VOCAB_SIZE if cfg.kind == "needles" else toy.VOCAB_SIZE
    return load_tokenizer(cfg).vocab_size


# ------------------------------------------------------------------------------------------------ documents


def _text_files(path: str, name: str) -> list[Path]:
    if not path:
        raise _error(name, path, "empty; set it to a UTF-8 text file, a directory of *.txt or a glob")
    p = Path(path).expanduser()
    # A relative path is read from the working directory (not from the config file's directory): say so.
    where = "" if p.is_absolute() else f" (relative: resolved against the working directory {Path.cwd()})"
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob("*.txt") if f.is_file())
        if not files:
            raise _error(name, path, f"the directory holds no *.txt files{where}")
        return files
    if any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
        if not files:
            raise _error(name, path, f"the glob matches no files{where}")
        return files
    raise _error(name, path, f"no such file or directory{where}")


def read_documents(cfg: DataConfig, *, name: str = "data.path") -> list[str]:
    """All documents under cfg.path in file order: each file split on doc_separator, blank ones dropped.
    name: what errors call cfg.path (a command line's --text reads through here too)."""
    docs = []
    for f in _text_files(cfg.path, name):
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            rule = f"{str(f)!r} is not UTF-8 text ({e.reason} at byte {e.start})"
            raise _error(name, cfg.path, rule) from None
        docs.extend(d for d in text.split(cfg.doc_separator) if d.strip())
    if not docs:
        raise _error(name, cfg.path, "holds no documents (the files are empty or blank)")
    return docs


def split_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the last eval_fraction of them (at least 1) is held out."""
    docs = read_documents(cfg)
    if len(docs) < 2:
        rule = f"holds {len(docs)} document; need 2 or more (1 is held out for evaluation)"
        raise _error("data.path", cfg.path, rule)
    num_eval = min(max(1, round(len(docs) * cfg.eval_fraction)), len(docs) - 1)
    return docs[:-num_eval], docs[-num_eval:]


# ------------------------------------------------------------------------------------------------- pipelines


class _Chunk(grain.experimental.FlatMapTransform):
    """ids [n] -> chunks of at most `size` tokens, overlapping by one so every next-token target is kept.

    Chunks of fewer than 2 tokens (nothing to predict) are dropped.
    """

    max_fan_out = 1  # only read by FlatMapMapDataset; FlatMapIterDataset takes any fan-out

    def __init__(self, size: int):
        self.size = size

    def flat_map(self, ids: np.ndarray) -> list[dict[str, np.ndarray]]:
        step = self.size - 1
        return [{"tokens": ids[s : s + self.size]} for s in range(0, max(len(ids) - 1, 0), step)]


def _packed_to_batch_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row of T + 1 tokens (Grain's tokens, tokens_segment_ids, tokens_positions) -> the contract."""
    tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
    same_doc = (seg[:-1] > 0) & (seg[1:] == seg[:-1])  # the target is the next token of the same document
    return {
        "inputs": tokens[:-1].astype(np.int32),
        "targets": tokens[1:].astype(np.int32),
        "weights": same_doc.astype(np.float32),
        "segment_ids": seg[:-1].astype(np.int32),
        "positions": pos[:-1].astype(np.int32),
    }


def text_rows(
    docs: list[str],
    tokenizer: Any,
    seq_len: int,
    *,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    process_index: int,
    process_count: int,
    num_bins: int,
) -> grain.IterDataset:
    """Rows of the batch contract (each [T]) from docs, for num_epochs (None = forever).

    Documents are shuffled per epoch, dealt round-robin to processes, tokenized, chunked to T + 1 tokens,
    first-fit packed (num_bins rows at a time) into rows of T + 1 tokens and split into inputs / targets.
    """
    ds = grain.MapDataset.source(docs)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)[process_index::process_count].map(tokenizer.encode)
    ds = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(), _Chunk(seq_len + 1))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={"tokens": seq_len + 1},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle,
        padding_struct={"tokens": tokenizer.pad_id},
    )
    return ds.map(_packed_to_batch_row)


def _check_batching(global_batch_size: Any, seed: Any, process_index: Any, process_count: Any) -> int:
    if not _is_int(process_count) or process_count < 1:
        raise _error("process_count", process_count, "must be a positive integer")
    if not _is_int(process_index) or not 0 <= process_index < process_count:
        raise _error("process_index", process_index, f"must be in [0, process_count={process_count})")
    if not _is_int(global_batch_size) or global_batch_size < 1:
        raise _error("global_batch_size", global_batch_size, "must be a positive integer")
    if global_batch_size % process_count:
        rule = f"must be divisible by process_count={process_count}"
        raise _error("global_batch_size", global_batch_size, rule)
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise _error("seed", seed, "must be an integer in [0, 2**32)")
    return global_batch_size // process_count


def _toy_batch(task: Any, seed: int, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The synthetic samples (toy or needles) of `indices`, stacked: each field [len(indices), T]."""
    rows = [task.sample(seed, int(index)) for index in indices]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _finish(ds: grain.IterDataset, cfg: DataConfig, b: int | None) -> grain.IterDataset:
    """Rows -> batches of b rows (None: already batched), made in cfg.worker_count processes if > 0."""
    if cfg.worker_count > 0:  # rows are made in worker processes; batches here
        from absl import flags  # a Grain dependency

        # Grain 0.2.18's mp_prefetch reads an absl flag: it fails unless flags were parsed (grain#1355).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return ds if b is None else ds.batch(b, drop_remainder=True)


def train_iterator(
    cfg: DataConfig, global_batch_size: int, *, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Endless per-process training batches, reshuffled each epoch; deterministic given seed.

    The iterator has get_state() / set_state() (JSON-able dicts); save it with Orbax through
    grain.checkpoint.CheckpointSave / CheckpointRestore.
    """
    b = _check_batching(global_batch_size, seed, process_index, process_count)
    if cfg.kind in SYNTHETIC_KINDS:
        ds = grain.MapDataset.range(TOY_TRAIN_SIZE)
        if cfg.shuffle:
            ds = ds.shuffle(seed=seed)
        # Global batch i is samples [i*B, (i+1)*B) of the stream; process p takes rows [p*b, (p+1)*b) of it,
        # so the global batch (and each row's place in it) is the same for any number of processes.
        ds = ds.repeat().batch(b, drop_remainder=True)[process_index::process_count]
        ds = ds.map(functools.partial(_toy_batch, cfg.synthetic_task(), seed)).to_iter_dataset()
        return iter(_finish(ds, cfg, None))
    else:
        train_docs, _ = split_documents(cfg)
        ds = text_rows(
            train_docs,
            load_tokenizer(cfg),
            cfg.seq_len,
            seed=seed,
            shuffle=cfg.shuffle,
            num_epochs=None,
            process_index=process_index,
            process_count=process_count,
            num_bins=max(b, MIN_PACKING_BINS),
        )
    return iter(_finish(ds, cfg, b))


def eval_batches(
    cfg: DataConfig,
    global_batch_size: int,
    num_batches: int,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """A fixed held-out set of num_batches per-process batches, the same on every call.

    Toy and needles: samples TOY_EVAL_START + [0, num_batches * global_batch_size), disjoint from training.
    Text: the held-out documents in order (cycling if they run out), packed like training.
    """
    b = _check_batching(global_batch_size, seed, process_index, process_count)
    if not _is_int(num_batches) or num_batches < 1:
        raise _error("num_batches", num_batches, "must be a positive integer")
    if cfg.kind in SYNTHETIC_KINDS:
        ds = grain.MapDataset.range(TOY_EVAL_START, TOY_EVAL_START + num_batches * global_batch_size)
        make_batch = functools.partial(_toy_batch, cfg.synthetic_task(), seed)
        return [make_batch(ds.batch(b)[process_index::process_count][i]) for i in range(num_batches)]
    _, eval_docs = split_documents(cfg)
    ds = text_rows(
        eval_docs,
        load_tokenizer(cfg),
        cfg.seq_len,
        seed=seed,
        shuffle=False,
        num_epochs=None,
        process_index=process_index,
        process_count=process_count,
        num_bins=max(b, MIN_PACKING_BINS),
    )
    it = iter(ds.batch(b, drop_remainder=True))
    try:
        return list(itertools.islice(it, num_batches))
    finally:
        it.close()  # stop its prefetch threads now
