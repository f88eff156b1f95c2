"""Grain pipelines: the batch contract, determinism, resumability, sharding, packing and tokenizers."""

import collections
import json
import re

import grain
import numpy as np
import pytest

from train import data, toy

T = 32  # seq_len of the text tests
WORDS = ["alpha", "beta", "gamma", "héllo", "δέλτα", "x", "zeta", "日本", "eta", "theta", "!"]


def make_docs(rng, count):
    """Distinct documents, some longer than several rows (so they are chunked), some tiny."""
    docs = []
    for i in range(count):
        length = int(rng.choice([1, 3, 10, 40]))
        words = [str(w) for w in rng.choice(WORDS, size=length)]
        if length > 3:
            words[length // 2] += "\n"  # single newlines stay inside documents
        docs.append(f"d{i} " + " ".join(words))
    return docs


def write(tmp_path, docs, name="corpus.txt", sep="\n\n"):
    path = tmp_path / name
    path.write_text(sep.join(docs) + sep + " \n" + sep, encoding="utf-8")  # blank documents are dropped
    return str(path)


@pytest.fixture
def corpus(tmp_path, rng):
    """(path, training documents, held-out documents) of 40 documents with eval_fraction 0.1."""
    docs = make_docs(rng, 40)
    return write(tmp_path, docs), docs[:36], docs[36:]


def byte_ids(doc):
    return [256] + list(doc.encode("utf-8")) + [257]


def chunks(ids, size=T + 1):
    """Independent chunking: windows of `size` tokens stepping by size - 1 (each target kept once)."""
    out, start = [], 0
    while len(ids) - start >= 2:
        out.append(tuple(ids[start : start + size]))
        start += size - 1
    return out


def segments(row):
    """The token sequence of each document in a contract row (the last one from targets if it counts)."""
    out = []
    for s in range(1, int(row["segment_ids"].max()) + 1):
        idx = np.flatnonzero(row["segment_ids"] == s)
        tokens = row["inputs"][idx].tolist()
        if row["weights"][idx[-1]]:
            tokens.append(int(row["targets"][idx[-1]]))
        out.append(tuple(tokens))
    return out


def check_row(row, pad_id, t=T):
    """The batch contract on one packed row [t]."""
    for key in ("inputs", "targets", "segment_ids", "positions"):
        assert row[key].shape == (t,) and row[key].dtype == np.int32, key
    assert row["weights"].shape == (t,) and row["weights"].dtype == np.float32
    seg, pos, w = row["segment_ids"], row["positions"], row["weights"]
    np.testing.assert_array_equal(row["targets"][:-1], row["inputs"][1:])
    used = int((seg > 0).sum())
    assert (seg[:used] > 0).all() and (seg[used:] == 0).all()  # padding only at the end
    assert seg[0] == 1 and set(np.diff(seg[:used]).tolist()) <= {0, 1}  # documents 1, 2, ... in order
    for s in range(1, int(seg.max()) + 1):
        idx = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
        assert (w[idx[:-1]] == 1).all()  # every target inside a document counts
    assert (pos[used:] == 0).all() and (w[used:] == 0).all() and (row["inputs"][used:] == pad_id).all()
    np.testing.assert_array_equal(w[:-1], (seg[:-1] > 0) & (seg[1:] == seg[:-1]))
    assert set(np.unique(w).tolist()) <= {0.0, 1.0}


def rows_of(batches):
    return [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(len(batch["inputs"]))]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys() == {"inputs", "targets", "weights", "segment_ids", "positions"}
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def differ(xs, ys):
    return any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(xs, ys, strict=True))


def text_cfg(path, **kw):
    return data.DataConfig(**{"kind": "text", "seq_len": T, "path": path, "eval_fraction": 0.1, **kw})


TOY = data.DataConfig(kind="toy", seq_len=40)


# ------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "video"}, "data.kind='video' is invalid: must be one of"),
        ({"seq_len": 7}, "data.seq_len=7 is invalid"),
        ({"seq_len": 64.0}, "data.seq_len=64.0 is invalid"),
        ({"path": None}, "data.path=None is invalid"),
        ({"tokenizer": "gpt2"}, "data.tokenizer='gpt2' is invalid"),
        ({"doc_separator": ""}, "data.doc_separator='' is invalid"),
        ({"eval_fraction": 0.0}, "data.eval_fraction=0.0 is invalid"),
        ({"eval_fraction": 1}, "data.eval_fraction=1 is invalid"),
        ({"toy_block_size": 0}, "data.toy_block_size=0 is invalid"),
        ({"toy_block_size": 26}, "data.toy_block_size=26 is invalid"),
        ({"toy_query_len": 6}, "data.toy_query_len=6 is invalid"),
        ({"toy_answer": "middle"}, "data.toy_answer='middle' is invalid"),
        ({"kind": "toy", "seq_len": 19}, "data.seq_len=19 is invalid: the toy task needs at least 2 blocks"),
        ({"shuffle": "yes"}, "data.shuffle='yes' is invalid"),
        ({"worker_count": -1}, "data.worker_count=-1 is invalid"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.DataConfig(**kwargs)


def test_config_valid():
    data.DataConfig(kind="text", seq_len=8, path="/not/checked/yet.txt", tokenizer="/x/tok.model")
    data.DataConfig(kind="toy", seq_len=20)  # the shortest for N=5, L=2, "all"
    data.DataConfig(kind="toy", seq_len=16, toy_answer="last")


def test_a_missing_relative_path_names_the_directory_it_was_looked_for_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where = re.escape(f"(relative: resolved against the working directory {tmp_path})")
    cases = [("corpus/nope.txt", "no such file or directory"), ("*.md", "the glob matches no files")]
    for path, rule in cases:
        message = f"^data.path={re.escape(repr(path))} is invalid: {rule} {where}$"
        with pytest.raises(ValueError, match=message):
            data.train_iterator(text_cfg(path), 4, seed=0)


def test_path_errors(tmp_path):
    def fails(path, match, **kw):
        with pytest.raises(ValueError, match=match):
            data.train_iterator(text_cfg(path, **kw), 4, seed=0)

    fails("", "data.path='' is invalid: empty")
    fails(str(tmp_path / "nope.txt"), "data.path='.*nope.txt' is invalid: no such file or directory$")
    fails(str(tmp_path), "is invalid: the directory holds no \\*.txt files")
    fails(str(tmp_path / "*.md"), "is invalid: the glob matches no files")
    (tmp_path / "empty.txt").write_text("")
    fails(str(tmp_path / "empty.txt"), "data.path='.*empty.txt' is invalid: holds no documents")
    (tmp_path / "blank.txt").write_text("\n\n \n\n")
    fails(str(tmp_path / "blank.txt"), "is invalid: holds no documents")
    (tmp_path / "one.txt").write_text("only one document\n")
    fails(str(tmp_path / "one.txt"), "is invalid: holds 1 document; need 2 or more")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n\nok")
    fails(str(tmp_path / "bad.txt"), "is invalid: .*bad.txt' is not UTF-8 text")
    fails(write(tmp_path, ["a", "b"]), "data.tokenizer='.*missing.json' is invalid: no such file",
          tokenizer=str(tmp_path / "missing.json"))  # fmt: skip


def test_batching_errors():
    with pytest.raises(
        ValueError, match="global_batch_size=6 is invalid: must be divisible by process_count=4"
    ):
        data.train_iterator(TOY, 6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="global_batch_size=0 is invalid"):
        data.train_iterator(TOY, 0, seed=0)
    with pytest.raises(ValueError, match="process_index=2 is invalid"):
        data.train_iterator(TOY, 4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seed=-1 is invalid"):
        data.train_iterator(TOY, 4, seed=-1)
    with pytest.raises(ValueError, match="global_batch_size=3 is invalid"):
        data.eval_batches(TOY, 3, 1, seed=0, process_count=2)
    with pytest.raises(ValueError, match="num_batches=0 is invalid"):
        data.eval_batches(TOY, 4, 0, seed=0)


def test_documents(tmp_path, rng):
    docs = make_docs(rng, 12)
    (tmp_path / "b").mkdir()
    write(tmp_path / "b", docs[6:], "2.txt", sep="\n--\n")
    write(tmp_path / "b", docs[:6], "1.txt", sep="\n--\n")
    (tmp_path / "b" / "skip.md").write_text("not read")
    for path in (str(tmp_path / "b"), str(tmp_path / "b" / "*.txt")):
        cfg = text_cfg(path, doc_separator="\n--\n", eval_fraction=0.25)
        assert data.read_documents(cfg) == docs
        assert data.split_documents(cfg) == (docs[:9], docs[9:])


# --------------------------------------------------------------------------------------------------- toy


def test_toy_batches(seed):
    cfg = data.DataConfig(kind="toy", seq_len=40, shuffle=False)
    task = toy.ToyTask(seq_len=40)
    batches = take(data.train_iterator(cfg, 4, seed=seed), 2)
    for i, row in enumerate(rows_of(batches)):
        assert_same([row], [task.sample(seed, i)])  # unshuffled: the i-th training sample
    assert data.vocab_size(cfg) == toy.VOCAB_SIZE


def test_toy_deterministic_and_resumable(seed):
    first = take(data.train_iterator(TOY, 4, seed=seed), 5)
    assert_same(first, take(data.train_iterator(TOY, 4, seed=seed), 5))
    assert differ(first, take(data.train_iterator(TOY, 4, seed=seed + 1), 5))
    it = data.train_iterator(TOY, 4, seed=seed)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    rest = take(it, 3)
    assert_same(first[2:], rest)
    resumed = data.train_iterator(TOY, 4, seed=seed)
    resumed.set_state(state)
    assert_same(rest, take(resumed, 3))


@pytest.mark.parametrize("process_count", [2, 4])
def test_toy_shards(seed, process_count):
    """Per step, process p holds rows [p*b, (p+1)*b) of the one-process global batch: the same rows in
    the same places, so per-row randomness (dropout) does not depend on the process count."""
    global_batches = take(data.train_iterator(TOY, 8, seed=seed), 3)
    shards = [
        take(data.train_iterator(TOY, 8, seed=seed, process_index=p, process_count=process_count), 3)
        for p in range(process_count)
    ]
    for step, batch in enumerate(global_batches):
        expected = collections.Counter(r.tobytes() for r in batch["inputs"])
        got = collections.Counter()
        for shard in shards:
            assert shard[step]["inputs"].shape == (8 // process_count, 40)
            got.update(r.tobytes() for r in shard[step]["inputs"])
        assert got == expected and len(expected) == 8
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([shard[step][key] for shard in shards]), batch[key])


def test_toy_eval(seed):
    task = toy.ToyTask(seq_len=40)
    evals = data.eval_batches(TOY, 4, 3, seed=seed)
    assert len(evals) == 3
    assert_same(evals, data.eval_batches(TOY, 4, 3, seed=seed))
    for j, row in enumerate(rows_of(evals)):  # samples from indices past every training index
        assert_same([row], [task.sample(seed, data.TOY_TRAIN_SIZE + j)])
    train = {r.tobytes() for b in take(data.train_iterator(TOY, 16, seed=seed), 8) for r in b["inputs"]}
    assert train.isdisjoint(r.tobytes() for b in evals for r in b["inputs"])
    halves = [data.eval_batches(TOY, 4, 3, seed=seed, process_index=p, process_count=2) for p in (0, 1)]
    for step, batch in enumerate(evals):
        both = np.concatenate([halves[0][step]["inputs"], halves[1][step]["inputs"]])
        assert sorted(r.tobytes() for r in both) == sorted(r.tobytes() for r in batch["inputs"])


def test_orbax_checkpoint(tmp_path, seed):
    """The iterator saves and restores through Orbax with Grain's checkpoint handler args."""
    ocp = pytest.importorskip("orbax.checkpoint")
    it = data.train_iterator(TOY, 4, seed=seed)
    take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    rest = take(it, 2)
    resumed = data.train_iterator(TOY, 4, seed=seed)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert_same(rest, take(resumed, 2))


def test_worker_processes(seed):
    """worker_count=1 gives the in-process stream, and resumes."""
    expected = take(data.train_iterator(TOY, 4, seed=seed), 5)
    it = data.train_iterator(data.DataConfig(kind="toy", seq_len=40, worker_count=1), 4, seed=seed)
    try:
        assert_same(expected[:3], take(it, 3))
        state = json.loads(json.dumps(it.get_state()))
        assert_same(expected[3:], take(it, 2))
        it.set_state(state)
        assert_same(expected[3:], take(it, 2))
    finally:
        it.close()


# -------------------------------------------------------------------------------------------------- text


def test_byte_tokenizer():
    tok = data.ByteTokenizer()
    for text in ["", "plain", "héllo δέλτα 日本\n\ttabs"]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.tolist() == byte_ids(text)
        assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.pad_id) == (259, 258)
    assert data.vocab_size(data.DataConfig(kind="text")) == 259


def test_text_epoch_packing(corpus):
    """One epoch of packed rows: each is a valid contract row, and their documents are exactly the chunks."""
    path, train_docs, _ = corpus
    expected = collections.Counter(c for d in train_docs for c in chunks(byte_ids(d)))
    assert any(len(byte_ids(d)) > T + 1 for d in train_docs)  # some documents are chunked
    ds = data.text_rows(
        train_docs, data.ByteTokenizer(), T, seed=1, shuffle=True, num_epochs=1,
        process_index=0, process_count=1, num_bins=4,
    )  # fmt: skip
    rows = list(ds)
    got = collections.Counter()
    for row in rows:
        check_row(row, data.BYTE_PAD)
        got.update(segments(row))
    assert got == expected
    assert any(row["segment_ids"].max() > 1 for row in rows)  # some rows hold several documents


@pytest.mark.parametrize("process_count", [2, 3])
def test_text_shards(corpus, process_count):
    """In an epoch the processes read disjoint documents that together are all of them."""
    _, train_docs, _ = corpus
    expected = collections.Counter(c for d in train_docs for c in chunks(byte_ids(d)))
    got = collections.Counter()
    for p in range(process_count):
        ds = data.text_rows(
            train_docs, data.ByteTokenizer(), T, seed=5, shuffle=True, num_epochs=1,
            process_index=p, process_count=process_count, num_bins=4,
        )  # fmt: skip
        for row in ds:
            got.update(segments(row))
    assert got == expected


def test_text_epochs_reshuffled(rng):
    docs = [f"document number {i}" for i in range(12)]
    ds = data.text_rows(
        docs, data.ByteTokenizer(), 64, seed=int(rng.integers(2**31)), shuffle=True, num_epochs=2,
        process_index=0, process_count=1, num_bins=1,
    )  # fmt: skip
    order = [bytes(s[1:-1]).decode() for row in ds for s in segments(row)]
    assert sorted(order[:12]) == sorted(order[12:]) == sorted(docs)
    assert order[:12] != order[12:] and order[:12] != docs


def test_text_iterator(corpus, seed):
    path, train_docs, eval_docs = corpus
    cfg = text_cfg(path)
    allowed = {c for d in train_docs for c in chunks(byte_ids(d))}
    steps = len(allowed) // 4  # two epochs: a chunk takes at most a row, and rows hold 1 to 4 chunks here
    first = take(data.train_iterator(cfg, 8, seed=seed), steps)
    seen = collections.Counter()
    for row in rows_of(first):
        check_row(row, data.BYTE_PAD)
        assert set(segments(row)) <= allowed
        seen.update(segments(row))
    assert set(seen) == allowed  # a whole epoch went by
    assert_same(first[:3], take(data.train_iterator(cfg, 8, seed=seed), 3))
    assert differ(first[:3], take(data.train_iterator(cfg, 8, seed=seed + 1), 3))
    for p in range(2):
        (batch,) = take(data.train_iterator(cfg, 4, seed=seed, process_index=p, process_count=2), 1)
        assert batch["inputs"].shape == (2, T)


def test_text_resumable(corpus, seed):
    path, _, _ = corpus
    cfg = text_cfg(path)
    it = data.train_iterator(cfg, 4, seed=seed)
    for skip in (3, 20):  # state taken mid packed batch (16 bins = 4 batches), then usually in epoch 2
        take(it, skip)
        state = json.loads(json.dumps(it.get_state()))
        rest = take(it, 4)
        resumed = data.train_iterator(cfg, 4, seed=seed)
        resumed.set_state(state)
        assert_same(rest, take(resumed, 4))


def test_text_eval(corpus, seed):
    path, train_docs, eval_docs = corpus
    cfg = text_cfg(path)
    allowed = collections.Counter(c for d in eval_docs for c in chunks(byte_ids(d)))
    num = sum(allowed.values()) // 2 + 1  # 4 rows each: more rows than the 4 held-out documents fill
    evals = data.eval_batches(cfg, 4, num, seed=seed)
    assert len(evals) == num
    assert_same(evals, data.eval_batches(cfg, 4, num, seed=seed))
    got = collections.Counter()
    for row in rows_of(evals):
        check_row(row, data.BYTE_PAD)
        got.update(segments(row))
    assert set(got) == set(allowed) and sum(got.values()) > sum(allowed.values())
    halves = data.eval_batches(cfg, 4, 2, seed=seed, process_index=1, process_count=2)
    assert [b["inputs"].shape for b in halves] == [(2, T), (2, T)]


def train_hf(docs, path, specials):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok.save(str(path))
    return tokenizers.Tokenizer.from_file(str(path))


def test_hf_tokenizer(corpus, tmp_path, seed):
    path, train_docs, _ = corpus
    tok_path = tmp_path / "tokenizer.json"
    ref = train_hf(train_docs, tok_path, ["[UNK]", "<pad>", "<s>", "</s>"])
    bos, eos, pad = (ref.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
    cfg = text_cfg(path, tokenizer=str(tok_path))
    assert data.vocab_size(cfg) == ref.get_vocab_size()
    tok = data.load_tokenizer(cfg)
    ids = {d: [bos] + ref.encode(d, add_special_tokens=False).ids + [eos] for d in train_docs}
    for d in train_docs[:5]:
        assert tok.encode(d).tolist() == ids[d]
    allowed = {c for d in train_docs for c in chunks(ids[d])}
    for row in rows_of(take(data.train_iterator(cfg, 4, seed=seed), 3)):
        check_row(row, pad)
        assert set(segments(row)) <= allowed
    # without BOS / EOS tokens: none are added
    plain = train_hf(train_docs, tmp_path / "plain.json", ["[UNK]"])
    tok = data.load_tokenizer(text_cfg(path, tokenizer=str(tmp_path / "plain.json")))
    assert tok.encode(train_docs[0]).tolist() == plain.encode(train_docs[0]).ids


def test_sentencepiece_tokenizer(corpus, tmp_path, seed):
    spm = pytest.importorskip("sentencepiece")
    path, train_docs, _ = corpus
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_docs), model_prefix=str(tmp_path / "sp"), vocab_size=80,
        model_type="bpe", hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    cfg = text_cfg(path, tokenizer=str(tmp_path / "sp.model"))
    assert data.vocab_size(cfg) == ref.get_piece_size()
    ids = {d: [ref.bos_id()] + ref.encode(d) + [ref.eos_id()] for d in train_docs}
    tok = data.load_tokenizer(cfg)
    assert tok.encode(train_docs[0]).tolist() == ids[train_docs[0]]
    allowed = {c for d in train_docs for c in chunks(ids[d])}
    for row in rows_of(take(data.train_iterator(cfg, 4, seed=seed), 3)):
        check_row(row, tok.pad_id)
        assert set(segments(row)) <= allowed
