"""The toy task: every sample obeys the rules of spec section 6, checked by parsing its decoded text."""

import string

import numpy as np
import pytest

from train import toy


def most_blocks(seq_len, n, q, a):
    """Brute force: the largest K with BOS + K blocks and K - 1 dots + "#" + query + answer + EOS <= T + 1."""
    k = 0
    while 1 + (k + 1) * n + k + 1 + q + a + 1 <= seq_len + 1:
        k += 1
    return k


def check_sample(task, row):
    """Parse one sample (a dict of [T] arrays), assert every rule; return (blocks, target, query, answer)."""
    t, n, q = task.seq_len, task.block_size, task.query_len
    a = n if task.answer == "all" else 1
    for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("weights", np.float32)]:
        assert row[key].shape == (t,) and row[key].dtype == dtype, key
    for key in ("segment_ids", "positions"):
        assert row[key].shape == (t,) and row[key].dtype == np.int32, key
    tokens = np.concatenate([row["inputs"], row["targets"][-1:]])
    np.testing.assert_array_equal(row["targets"][:-1], row["inputs"][1:])
    chars = toy.decode(tokens)
    assert chars[0] == "^" and chars.count("^") == 1 and chars.count("$") == 1
    eos = chars.index("$")
    assert set(chars[eos + 1 :]) <= {"_"}
    body = chars[1:eos]
    assert set(body) <= set(string.ascii_lowercase + ".#")
    head, tail = body.split("#")
    blocks = head.split(".")
    assert len(blocks) == most_blocks(t, n, q, a) == task.num_blocks
    for block in blocks:
        assert len(block) == n and len(set(block)) == n
    query, answer = tail[:q], tail[q:]
    assert len(query) == q and len(set(query)) == q and len(answer) == a
    holders = [i for i, block in enumerate(blocks) if set(query) <= set(block)]
    assert len(holders) == 1, (query, blocks)
    target = blocks[holders[0]]
    assert answer == {"all": target, "first": target[0], "last": target[-1]}[task.answer]
    # weights: exactly the targets that are answer tokens or EOS
    expected_w = np.zeros(t, np.float32)
    expected_w[eos - a - 1 : eos] = 1
    np.testing.assert_array_equal(row["weights"], expected_w)
    assert toy.decode(row["targets"][row["weights"] > 0]) == answer + "$"
    real = np.arange(t) <= eos  # input tokens BOS .. EOS
    np.testing.assert_array_equal(row["segment_ids"], real.astype(np.int32))
    np.testing.assert_array_equal(row["positions"], np.where(real, np.arange(t), 0))
    return blocks, holders[0], query, answer


def test_vocabulary():
    assert toy.VOCAB_SIZE == 31 == len(set(toy.VOCAB))
    assert toy.VOCAB[:26] == string.ascii_lowercase
    assert [toy.VOCAB[i] for i in (toy.SEP_ID, toy.QUERY_ID, toy.PAD_ID)] == [".", "#", "_"]
    assert len({toy.SEP_ID, toy.QUERY_ID, toy.PAD_ID, toy.BOS_ID, toy.EOS_ID}) == 5
    text = "^abc.xyz#bc_$"
    assert toy.decode(toy.encode(text)) == text
    np.testing.assert_array_equal(toy.encode("az"), [0, 25])
    with pytest.raises(ValueError, match="text='aB' is invalid"):
        toy.encode("aB")
    with pytest.raises(ValueError, match="ids=.* is invalid"):
        toy.decode([0, 31])


def test_reference_setting(seed):
    task = toy.ToyTask()  # N=5, L=2, answer all, seq_len 320
    assert (task.num_blocks, task.text_len) == (52, 319)
    row = toy.ToyTask().sample(seed, 0)
    check_sample(task, row)
    assert toy.decode(row["targets"])[-1] == "$"  # BOS + 319 characters + EOS fill the row: no padding
    assert row["segment_ids"].all()


@pytest.mark.parametrize(
    "seq_len,n,q,answer",
    [
        (320, 5, 2, "all"),
        (64, 5, 2, "first"),
        (61, 5, 2, "last"),
        (40, 3, 3, "all"),
        (90, 20, 1, "all"),  # nearly every other block holds the query letter: stresses the rejection
        (200, 24, 2, "last"),
    ],
)
def test_samples_obey_rules(rng, seq_len, n, q, answer):
    task = toy.ToyTask(seq_len=seq_len, block_size=n, query_len=q, answer=answer)
    targets, in_block_order, alphabetical = [], [], []
    for _ in range(40):
        seed, index = (int(x) for x in rng.integers(0, 2**31, size=2))
        blocks, target, query, _ = check_sample(task, task.sample(seed, index))
        targets.append(target)
        in_block_order.append(list(query) == sorted(query, key=blocks[target].index))
        alphabetical.append(list(query) == sorted(query))
    assert len(set(targets)) > 1  # the target block is not always in the same place
    if q > 1:  # the query order is random
        assert 0 < sum(in_block_order) < len(in_block_order) and 0 < sum(alphabetical) < len(alphabetical)


def test_deterministic_by_seed_and_index(seed):
    a, b = toy.ToyTask(seq_len=64), toy.ToyTask(seq_len=64)
    for index in (0, 1, 2**30 + 5):
        x, y = a.sample(seed, index), b.sample(seed, index)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert a.text(seed, 0) != a.text(seed, 1)
    assert a.text(seed, 0) != a.text(seed + 1, 0)


def test_blocks_match_text(seed):
    task = toy.ToyTask(seq_len=100, answer="first")
    letters, target, query = task.blocks(seed, 3)
    text = task.text(seed, 3)
    assert text.split("#")[0].split(".") == ["".join(string.ascii_lowercase[i] for i in r) for r in letters]
    assert text[-1] == string.ascii_lowercase[letters[target][0]]
    assert set(query.tolist()) <= set(letters[target].tolist())


def test_sequence_error_hand_computed():
    targets = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]])
    weights = np.array([[0, 1, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0]], np.float32)
    preds = np.array(
        [
            [9, 2, 3],  # wrong only where the weight is 0: right
            [4, 5, 0],  # wrong on a weighted token: wrong
            [7, 0, 0],  # right
            [0, 0, 0],  # no weight at all: not counted
        ]
    )
    assert toy.sequence_error(preds, targets, weights) == pytest.approx(1 / 3)
    logits = np.eye(10)[preds] * 3.0 - 1.0  # argmax = preds
    assert toy.sequence_error(logits, targets, weights) == pytest.approx(1 / 3)
    assert toy.sequence_error(targets, targets, weights) == 0.0
    assert toy.sequence_error(preds[1], targets[1], weights[1]) == 1.0  # one row
    assert np.isnan(toy.sequence_error(preds, targets, np.zeros_like(weights)))
    with pytest.raises(ValueError, match="logits_or_predictions.shape"):
        toy.sequence_error(preds[:, :2], targets, weights)


def test_sequence_error_on_samples(seed):
    task = toy.ToyTask(seq_len=40)
    rows = [task.sample(seed, i) for i in range(4)]
    targets = np.stack([r["targets"] for r in rows])
    weights = np.stack([r["weights"] for r in rows])
    preds = targets.copy()
    preds[0, np.flatnonzero(weights[0])[-1]] = toy.PAD_ID  # EOS wrong in sample 0
    preds[1, 0] = toy.PAD_ID  # an unweighted token wrong in sample 1
    assert toy.sequence_error(preds, targets, weights) == 0.25


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 0}, "block_size=0 is invalid"),
        ({"block_size": 26}, "block_size=26 is invalid"),
        ({"block_size": 2.5}, "block_size=2.5 is invalid"),
        ({"query_len": 0}, "query_len=0 is invalid"),
        ({"query_len": 6}, "query_len=6 is invalid"),
        ({"answer": "middle"}, "answer='middle' is invalid"),
        ({"seq_len": 19}, "seq_len=19 is invalid"),
        ({"seq_len": 14, "answer": "first"}, "seq_len=14 is invalid"),
    ],
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy.ToyTask(**kwargs)


def test_shortest_sequence():
    for n, q, answer in [(5, 2, "all"), (5, 2, "first"), (1, 1, "last")]:
        a = n if answer == "all" else 1
        shortest = 2 * (n + 1) + q + a + 1  # BOS, 2 blocks, ".", "#", query, answer, EOS = T + 1 tokens
        assert toy.ToyTask(seq_len=shortest, block_size=n, query_len=q, answer=answer).num_blocks == 2
        with pytest.raises(ValueError, match=f"seq_len={shortest - 1} is invalid"):
            toy.ToyTask(seq_len=shortest - 1, block_size=n, query_len=q, answer=answer)
