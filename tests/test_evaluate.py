"""train/evaluate.py: metrics against hand-computed values and fake models with known logits, the window
and LAMBADA rules, the needle harness, and every CLI command end to end on tiny checkpoints."""

from __future__ import annotations

import json
import logging
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx

from mta_jax.config import ModelConfig, model_config_from_dict
from tests.train_helpers import ROOT
from train import evaluate as ev
from train import needle_eval, scoring
from train.checkpoint import Checkpointer
from train.config import dump, train_config_from_dict
from train.data import ByteTokenizer
from train.loop import train
from train.params_io import abstract_params, model_from_params, save_params

DATA = ROOT / "tests" / "data"
V = 259  # the byte tokenizer's vocabulary
BYTES = ByteTokenizer()


def successor_model(k: float, vocab: int = V, table: dict[int, int] | None = None):
    """A fake LM: logit ln(k) on the predicted next token, 0 elsewhere, so p(predicted) = k / (k + V - 1)
    and any other token 1 / (k + V - 1). Predicted: table[input] (uniform logits if absent) or input + 1."""

    def logits(tokens):
        tokens = np.asarray(tokens)
        out = np.zeros((*tokens.shape, vocab))
        for index in np.ndindex(tokens.shape):
            t = int(tokens[index])
            guess = table.get(t) if table is not None else (t + 1) % vocab
            if guess is not None:
                out[(*index, guess)] = math.log(k)
        return out

    return logits


TINY_LM = {
    "dim": 32,
    "num_layers": 2,
    "num_heads": 2,
    "kq_conv_layers": [1],
    "mta": {"pre_conv": [2, 3], "post_conv": [2, 3], "pre_head_mix": 2, "group_norm": True, "gate": "scalar"},
}


def random_params(cfg: ModelConfig, seed: int = 0):
    """Random parameters for cfg, drawn in numpy (nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), abstract_params(cfg))


def tiny_lm(vocab: int, seed: int = 0):
    cfg = model_config_from_dict({**TINY_LM, "vocab_size": vocab})
    return model_from_params(cfg, random_params(cfg, seed))


@pytest.fixture(scope="module")
def byte_checkpoint(tmp_path_factory):
    """A parameter directory of a tiny byte-level MTA model."""
    model = tiny_lm(V)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return save_params(tmp_path_factory.mktemp("ckpt") / "byte", model.cfg, params)


# ---------------------------------------------------------------------------------------------- the metric


def test_scorer_matches_a_hand_computed_example():
    probs = np.array([0.5, 0.25, 0.25])
    score = scoring.logits_scorer(lambda tokens: np.broadcast_to(np.log(probs) + 3.0, (*tokens.shape, 3)))
    nats, hits = score(np.zeros((1, 3), np.int32), np.array([[0, 1, 2]]))
    np.testing.assert_allclose(nats, [[math.log(2), math.log(4), math.log(4)]], rtol=1e-12)
    np.testing.assert_array_equal(hits, [[True, False, False]])


def test_perplexity_and_bits_per_byte_by_hand():
    """Documents "abcd" and "xy": BOS a b c d EOS, BOS x y EOS. The successor model predicts a->b, b->c,
    c->d, x->y (4 right targets), misses BOS->a, d->EOS, BOS->x, y->EOS (4 others): 8 targets, 6 bytes."""
    k = 50.0
    right, other = math.log((k + V - 1) / k), math.log(k + V - 1)
    total = 4 * right + 4 * other
    score = scoring.logits_scorer(successor_model(k))
    for seq_len, stride in [(1, None), (2, None), (3, 1), (5, 2), (16, None)]:
        got = scoring.perplexity(score, ["abcd", "xy"], BYTES, seq_len=seq_len, batch=3, stride=stride)
        assert (got["tokens"], got["bytes"], got["documents"]) == (8, 6, 2)
        assert got["nats_per_token"] == pytest.approx(total / 8, rel=1e-12)
        assert got["perplexity"] == pytest.approx(math.exp(total / 8), rel=1e-12)
        assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / 6, rel=1e-12)
        assert got["bits_per_token"] * 8 / 6 == pytest.approx(got["bits_per_byte"], rel=1e-12)
        assert got["token_accuracy"] == 0.5
    # max_tokens cuts the second document after "x": the bytes are those of the scored text
    cut = scoring.perplexity(score, ["abcd", "xy"], BYTES, seq_len=4, max_tokens=6)
    assert (cut["tokens"], cut["bytes"]) == (6, 5)
    assert cut["nats_per_token"] == pytest.approx((3 * right + 3 * other) / 6, rel=1e-12)


def test_windows_score_every_target_once_with_the_promised_context(rng):
    for _ in range(30):
        n, seq_len = int(rng.integers(2, 60)), int(rng.integers(1, 12))
        stride = None if rng.random() < 0.3 else int(rng.integers(1, seq_len + 1))
        ids = rng.permutation(1000)[:n]  # distinct tokens: a window's first input tells where it begins
        scored = []
        for inputs, targets, weights in scoring.windows(ids, seq_len, stride):
            assert 1 <= len(inputs) == len(targets) <= seq_len
            begin = int(np.flatnonzero(ids == inputs[0])[0])
            np.testing.assert_array_equal(inputs, ids[begin : begin + len(inputs)])
            np.testing.assert_array_equal(targets, ids[begin + 1 : begin + 1 + len(targets)])
            for j in np.flatnonzero(weights):
                position = begin + 1 + j  # this target's index in ids; it sees ids[begin:position]
                scored.append(position)
                assert position - begin >= min(position, seq_len - (stride or seq_len) + 1)
        assert sorted(scored) == list(range(1, n))
    with pytest.raises(ValueError, match=r"stride=5 is invalid: must be an integer in \[1, seq_len=4\]"):
        scoring.windows(np.arange(9), 4, 5)


def test_a_sliding_window_gives_each_target_exactly_its_context(rng):
    """A cache model (logit = count of the token among the inputs so far) depends on all its context; with
    stride 1 each target must be scored as if the model saw exactly the seq_len tokens before it."""

    def cache(tokens):
        one_hot = np.eye(V)[np.asarray(tokens)]
        return np.cumsum(one_hot, axis=-2)

    text = "".join(rng.choice(list("abcab "), size=40))
    ids = BYTES.encode(text)
    seq_len, expected = 7, 0.0
    for j in range(1, len(ids)):  # target ids[j] after the seq_len tokens before it (fewer at the start)
        begin = max(0, j - seq_len)
        nats, _ = scoring.logits_scorer(cache)(ids[None, begin:j], ids[None, begin + 1 : j + 1])
        expected += float(nats[0, -1])
    got = scoring.perplexity(scoring.logits_scorer(cache), [text], BYTES, seq_len=seq_len, stride=1, batch=4)
    assert got["tokens"] == len(ids) - 1
    assert got["nats_per_token"] * got["tokens"] == pytest.approx(expected, rel=1e-10)
    plain = scoring.perplexity(scoring.logits_scorer(cache), [text], BYTES, seq_len=seq_len, batch=4)
    assert plain["nats_per_token"] != pytest.approx(got["nats_per_token"], rel=1e-6)  # context matters


def test_the_model_scorer_matches_float64_log_softmax(rng):
    model = tiny_lm(V, seed=int(rng.integers(100)))
    texts = [
        "".join(rng.choice(list("the quick brown fox "), size=int(rng.integers(20, 60)))) for _ in range(2)
    ]
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    rows = np.zeros((2, 64), np.int32)  # each document as one row, its padding after it (causal: unseen)
    for row, text in zip(rows, texts, strict=True):
        row[: len(text) + 1] = BYTES.encode(text)[:-1]
    logits = np.asarray(forward(state, rows), np.float64)  # [2, 64, V]
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    expected = []
    for row_log_probs, text in zip(log_probs, texts, strict=True):  # log-softmax in float64
        ids = BYTES.encode(text)
        expected.append(-row_log_probs[np.arange(len(ids) - 1), ids[1:]].sum())
    score = scoring.model_scorer(model)
    # one document alone (3 padding rows, padding at the row's end) and both in one batch agree
    alone = [scoring.perplexity(score, [text], BYTES, seq_len=64, batch=4) for text in texts]
    both = scoring.perplexity(score, texts, BYTES, seq_len=64, batch=4)
    for got, want, text in zip(alone, expected, texts, strict=True):
        assert got["tokens"] == len(text) + 1
        assert got["nats_per_token"] * got["tokens"] == pytest.approx(want, rel=1e-4)
    assert both["nats_per_token"] * both["tokens"] == pytest.approx(sum(expected), rel=1e-4)


# ------------------------------------------------------------------------------------------------ LAMBADA


@pytest.mark.parametrize(
    "text, context, target",
    [
        ("The cat sat on the mat", "The cat sat on the", " mat"),
        ('He said "goodbye."\n', "He said", ' "goodbye."'),  # punctuation stays with the word
        ("tabs\tand  spaces", "tabs\tand", "  spaces"),
        ("two words", "two", " words"),
    ],
)
def test_lambada_splits_off_the_last_word_with_its_space(text, context, target):
    assert scoring.split_last_word(text) == (context, target)


def test_lambada_rows_and_errors(tmp_path):
    inputs, targets, weights = scoring.lambada_row(BYTES, "a big elephant", max_len=64)
    assert BYTES.decode(targets[weights > 0]) == " elephant"  # a word of 9 byte tokens
    assert weights.sum() == 9 and inputs[0] == BYTES.bos_id
    # the oldest context is dropped
    inputs, targets, weights = scoring.lambada_row(BYTES, "a big elephant", max_len=10)
    assert len(inputs) == 10 and BYTES.decode(inputs) == "ig elephan"
    for bad in ("oneword", "  ", ""):
        with pytest.raises(ValueError, match="needs a context and a last word"):
            scoring.split_last_word(bad)
    with pytest.raises(ValueError, match=r"the target ' elephant' has 9 tokens \(need 1 to 5\)"):
        scoring.lambada_row(BYTES, "a big elephant", max_len=5)
    path = tmp_path / "l.jsonl"
    path.write_text('{"text": "a b"}\n\n{"txt": "c d"}\n')
    with pytest.raises(
        ValueError, match=r'l.jsonl:3\' is invalid: each line must be an object with a "text"'
    ):
        scoring.read_lambada(path)
    path.write_text('{"text": "a b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"l.jsonl:2' is invalid: not JSON"):
        scoring.read_lambada(path)
    assert len(scoring.read_lambada(DATA / "lambada_tiny.jsonl")) == 6


def test_lambada_metrics_by_hand():
    """The fake model predicts e->' ', ' '->c, c->a, a->t and is uniform after anything else.
    "the cat": targets ' ' c a t all predicted -> right. "the cow": ' ' c predicted, o missed (a predicted),
    w after o (uniform, argmax 0) missed -> wrong."""
    k = 20.0
    table = {ord("e"): ord(" "), ord(" "): ord("c"), ord("c"): ord("a"), ord("a"): ord("t")}
    score = scoring.logits_scorer(successor_model(k, table=table))
    right, other, uniform = math.log((k + V - 1) / k), math.log(k + V - 1), math.log(V)
    got = scoring.lambada(score, ["the cat", "the cow"], BYTES, seq_len=32, batch=3)
    words = [4 * right, 2 * right + other + uniform]
    assert got["examples"] == 2 and got["accuracy"] == 0.5 and got["target_tokens"] == 8
    assert got["nats_per_word"] == pytest.approx(sum(words) / 2, rel=1e-12)
    assert got["perplexity"] == pytest.approx(math.exp(sum(words) / 2), rel=1e-12)


# ------------------------------------------------------------------------------------------------ needles


def test_text_needles_follow_the_placement_rule(rng):
    haystack = (DATA / "heldout_tiny.txt").read_text()
    source = needle_eval.TextNeedles(BYTES, haystack, key_len=5, value_len=3)
    for _ in range(20):
        n, length = int(rng.choice([2, 4, 6])), int(rng.integers(220, 400))
        depth, seed, index = (
            float(rng.choice([0.0, 1.0, rng.random()])),
            int(rng.integers(99)),
            int(rng.integers(99)),
        )
        inputs, targets, weights = source.row(length, n, depth, seed, index)
        assert inputs.shape == targets.shape == weights.shape == (length,)
        text = BYTES.decode(np.concatenate([inputs, targets[-1:]]))
        needles_found = re.findall(r" The key ([a-z]{5}) is ([0-9]{3})\.", text)
        assert len(needles_found) == n and len({key for key, _ in needles_found}) == n
        body, question = text.rsplit(" What is the key ", 1)
        asked, answer = re.fullmatch(r"([a-z]{5})\? The key \1 is ([0-9]{3})", question).groups()
        assert dict(needles_found)[asked] == answer
        assert BYTES.decode(targets[weights > 0]) == " " + answer
        fillers = len(re.sub(r" The key [a-z]{5} is [0-9]{3}\.", "", body))
        before = len(re.sub(r" The key [a-z]{5} is [0-9]{3}\.", "", body[: body.index(f" The key {asked} ")]))
        assert before == round(depth * fillers)
    with pytest.raises(
        ValueError, match=r"context_len=40 is invalid: 2 needles, the question and the answer need"
    ):
        source.row(40, 2, 0.5, 0, 0)


def test_the_needle_grid_scores_with_teacher_forcing():
    """An oracle that knows every row's next token scores 100%; with the answer's last token wrong, 0%."""

    source = needle_eval.SyntheticNeedles(2, 2)

    def scorer_for(spoil):
        def score(inputs, targets):
            hits = np.ones(targets.shape, bool)
            if spoil:
                hits[:, -2] = False  # the answer's last digit (the last target is EOS)
            return np.zeros(targets.shape), hits

        return score

    kw = dict(context_lens=[32, 48], depths=[0.0, 1.0], needle_counts=[2, 4], samples=3, batch=2)
    cells = needle_eval.needle_grid(scorer_for(False), source, **kw)
    assert len(cells) == 8 and all(c["accuracy"] == 1.0 for c in cells)
    assert {(c["needles"], c["context_len"], c["depth"]) for c in cells} == {
        (n, t, d) for n in (2, 4) for t in (32, 48) for d in (0.0, 1.0)
    }
    assert all(c["accuracy"] == 0.0 for c in needle_eval.needle_grid(scorer_for(True), source, **kw))
    table = needle_eval.needle_table(cells)
    assert "4 needles" in table and "   100.0" in table
    with pytest.raises(ValueError, match=r"context_len=20 is invalid: 4 needle\(s\)"):
        needle_eval.needle_grid(scorer_for(False), source, **{**kw, "context_lens": [20]})


# ------------------------------------------------------------------------------------------------------ CLI


def test_perplexity_and_lambada_cli_end_to_end(byte_checkpoint, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    args = ["--checkpoint", str(byte_checkpoint), "--seq-len", "64", "--batch", "4", "--output", str(out)]
    # every command on this model runs rows of [4, 64]: one compiled program
    assert (
        ev.main(["perplexity", "--text", str(DATA / "heldout_tiny.txt"), "--max-tokens", "300", *args]) == 0
    )
    result = json.loads(out.read_text())
    assert result["tokens"] == 300 and result["documents"] == 2
    assert result["bits_per_byte"] == pytest.approx(
        result["nats_per_token"] * 300 / math.log(2) / result["bytes"]
    )
    assert 5.0 < result["nats_per_token"] < 7.0  # a fresh model: about ln(259) = 5.56
    assert "bits_per_byte" in capsys.readouterr().out

    assert ev.main(["lambada", "--file", str(DATA / "lambada_tiny.jsonl"), *args]) == 0
    result = json.loads(out.read_text())
    assert result["examples"] == 6 and 0.0 <= result["accuracy"] <= 1.0 and result["perplexity"] > 1.0

    assert ev.main(["lambada", "--file", str(tmp_path / "missing.jsonl"), *args]) == 2
    assert "missing.jsonl' is invalid: no such file" in capsys.readouterr().err
    # --text is named as the flag the user gave, not as the data config field it is read through
    assert ev.main(["perplexity", "--text", str(tmp_path / "missing.txt"), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: --text='.*missing.txt' is invalid: no such file or directory", err), err
    assert "data.path" not in err


def test_needles_cli_on_a_text_model(byte_checkpoint, tmp_path, capsys):
    out = tmp_path / "needles.json"
    argv = ["needles", "--checkpoint", str(byte_checkpoint), "--haystack", str(DATA / "heldout_tiny.txt")]
    argv += ["--context-lens", "64", "--depths", "0", "1", "--needles", "1", "--samples", "2", "--batch", "4"]
    assert ev.main([*argv, "--key-len", "3", "--value-len", "2", "--output", str(out)]) == 0
    assert "1 needles: accuracy %" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert (result["task"], result["key_len"], result["value_len"]) == ("text", 3, 2)
    assert [(c["depth"], c["samples"]) for c in result["cells"]] == [(0.0, 2), (1.0, 2)]
    assert all(0.0 <= c["accuracy"] <= 1.0 and c["answer_nats"] > 0 for c in result["cells"])
    # 2 needles do not fit in 64 tokens: the error names the context length
    argv[argv.index("--needles") + 1] = "2"
    assert ev.main([*argv, "--key-len", "3", "--value-len", "2"]) == 2
    assert "context_len=64 is invalid: 2 needles" in capsys.readouterr().err
    assert ev.main(["needles", "--checkpoint", str(byte_checkpoint)]) == 2  # a text model needs a haystack
    assert "give --haystack FILE for a text model" in capsys.readouterr().err


NEEDLE_RUN = {
    "model": {"vocab_size": 32, "dim": 32, "num_layers": 2, "num_heads": 2, "mta": {"pre_conv": [2, 3]}},
    "data": {"kind": "needles", "seq_len": 32, "needles_count": 2, "needles_value_len": 1},
    "steps": 2,
    "global_batch_size": 4,
    "eval_batches": 1,
    "progress": False,
    "checkpoint": {"every": 2, "async_save": False},
}


def fake_run_dir(directory, raw: dict):
    """A run directory as train() leaves it (config.yaml, checkpoints/<step>/state), written by the training
    Checkpointer with random parameters instead of trained ones."""
    cfg = train_config_from_dict({**raw, "run_dir": str(directory)})
    directory.mkdir()
    (directory / "config.yaml").write_text(dump(cfg))
    with Checkpointer(directory / "checkpoints", cfg.checkpoint) as checkpointer:
        checkpointer.save(2, {"params": random_params(cfg.model), "step": np.int32(2)}, force=True)
    return directory


def test_perplexity_defaults_to_the_held_out_documents_of_a_text_run(tmp_path, capsys):
    """data.eval_fraction 0.5 of the 4 documents of heldout_tiny.txt: the last 2 are scored, with the
    run's tokenizer (bytes): every byte and one EOS per document, in windows of the run's data.seq_len
    unless --seq-len says otherwise; the printout says what was scored and what it compares with."""
    data = {"kind": "text", "path": str(DATA / "heldout_tiny.txt"), "eval_fraction": 0.5, "seq_len": 64}
    run = fake_run_dir(tmp_path / "run", {**NEEDLE_RUN, "model": {**TINY_LM, "vocab_size": V}, "data": data})
    out = tmp_path / "ppl.json"
    argv = ["perplexity", "--checkpoint", str(run), "--batch", "4", "--output", str(out)]
    held_out = (DATA / "heldout_tiny.txt").read_text().split("\n\n")[-2:]
    for extra, seq_len in [([], 64), (["--seq-len", "32"], 32)]:  # an explicit --seq-len wins
        assert ev.main([*argv, *extra]) == 0
        result = json.loads(out.read_text())
        assert result["documents"] == 2 and result["bytes"] == sum(len(d.encode()) for d in held_out)
        assert result["tokens"] == result["bytes"] + 2
        assert result["seq_len"] == result["stride"] == seq_len
        assert result["windows"] == sum(-(-(len(d.encode()) + 1) // seq_len) for d in held_out)
        printed = capsys.readouterr().out
        scored = printed.splitlines()[0]
        assert scored.startswith(f"scored: {result['tokens']} tokens of 2 documents of the run's held-out")
        assert f"in {result['windows']} windows of seq_len {seq_len} (" in scored
        assert "comparable to a loss of the run only on the same documents at the same seq_len" in printed
        assert ("at its data.seq_len=64, as its eval loss" in printed) == (seq_len == 64), printed
    assert "held-out documents, but at seq_len 32, not its data.seq_len=64" in printed
    assert result["seq_len_from"] == "--seq-len"
    # lambada: contexts are cut to the run's data.seq_len too (it was trained at that length)
    assert ev.main(["lambada", "--file", str(DATA / "lambada_tiny.jsonl"), *argv[1:]]) == 0
    result = json.loads(out.read_text())
    assert result["examples"] == 6 and result["seq_len"] == 64
    assert result["seq_len_from"] == "the run's data.seq_len"


def test_needles_cli_on_a_synthetic_run(tmp_path, capsys):
    """The harness takes the key and value lengths from the run's config."""
    run = fake_run_dir(tmp_path / "run", NEEDLE_RUN)
    out = tmp_path / "n.json"
    argv = ["needles", "--checkpoint", str(run), "--context-lens", "32", "--depths", "0.5"]
    assert ev.main([*argv, "--needles", "2", "4", "--samples", "3", "--output", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert (saved["task"], saved["key_len"], saved["value_len"]) == ("synthetic", 2, 1)
    assert [c["needles"] for c in saved["cells"]] == [2, 4]
    assert "4 needles" in capsys.readouterr().out
    # a synthetic run asked for a text metric is refused by name
    text = str(DATA / "heldout_tiny.txt")
    assert ev.main(["perplexity", "--checkpoint", str(run), "--text", text]) == 2
    assert "data.kind='needles', not text" in capsys.readouterr().err


def _corrupt(step_dir) -> None:
    """Overwrites every file of a checkpoint's state (as a torn write or bad disk might leave it)."""
    for path in (step_dir / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")


def test_commands_skip_a_corrupt_newest_checkpoint_and_name_it(tmp_path, capsys, caplog, monkeypatch):
    from train import generate as gen

    run = fake_run_dir(tmp_path / "run", NEEDLE_RUN)
    cfg = train_config_from_dict({**NEEDLE_RUN, "run_dir": str(run)})
    with Checkpointer(run / "checkpoints", cfg.checkpoint) as checkpointer:
        checkpointer.save(4, {"params": random_params(cfg.model, 1), "step": np.int32(4)}, force=True)
    _corrupt(run / "checkpoints" / "4")
    needles = ["needles", "--checkpoint", str(run), "--context-lens", "32", "--depths", "0.5"]
    needles += ["--needles", "2"]
    generate = ["--checkpoint", str(run), "--prompt", "a", "--tokenizer", "toy", "--max-new-tokens", "2"]
    logger = logging.getLogger("train.params_io")  # its parent "train" may not propagate (train CLI)
    monkeypatch.setattr(logger, "propagate", False)  # so each record reaches caplog once, here
    logger.addHandler(caplog.handler)
    try:
        for command in (lambda: ev.main([*needles, "--samples", "1"]), lambda: gen.main(generate)):
            caplog.clear()
            assert command() == 0, capsys.readouterr().err
            skipped = [r.getMessage() for r in caplog.records if "unreadable checkpoint" in r.getMessage()]
            assert len(skipped) == 1 and "step 4:" in skipped[0] and "using step 2" in skipped[0], skipped
    finally:
        logger.removeHandler(caplog.handler)

    assert gen.main([*generate, "--step", "4"]) == 2
    assert "error: step=4 is invalid: its parameters cannot be read" in capsys.readouterr().err

    _corrupt(run / "checkpoints" / "2")
    assert ev.main([*needles, "--samples", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: no checkpoint in" in err and "step 4:" in err and "step 2:" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_needles_cli_after_real_training_steps(tmp_path):
    """Two real training steps on data.kind=needles, with the sequence error, then the harness on the run."""
    result = train(train_config_from_dict({**NEEDLE_RUN, "run_dir": str(tmp_path / "run")}))
    assert result.step == 2 and 0.0 <= result.eval_metrics["sequence_error"] <= 1.0
    argv = ["needles", "--checkpoint", str(tmp_path / "run"), "--context-lens", "32", "--needles", "2"]
    assert ev.main([*argv, "--samples", "2", "--output", str(tmp_path / "n.json")]) == 0
