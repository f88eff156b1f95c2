"""bench/toy_diagnose.py's decoy test against a scan of the sample's own text."""

from __future__ import annotations

import pytest

from bench import toy_diagnose
from bench.toy_diagnose import has_decoy
from tests.train_helpers import TINY
from train import toy
from train.config import train_config_from_dict
from train.loop import train


def decoy_in_text(text: str, target: int, query: str, width: int) -> bool:
    """Brute force on the characters: some `width` consecutive characters of the blocks' text hold every
    query letter, and for at least one letter the occurrence used lies outside the target block."""
    context = text.split("#")[0]
    blocks = context.split(".")
    start = sum(len(b) + 1 for b in blocks[:target])
    target_span = range(start, start + len(blocks[target]))
    for first in range(len(context)):
        window = range(first, min(first + width, len(context)))
        spots = [[i for i in window if context[i] == q] for q in query]
        if all(spots) and any(any(i not in target_span for i in s) for s in spots):
            return True
    return False


@pytest.mark.parametrize("width", [1, 2, 5, 9])
def test_has_decoy_agrees_with_a_scan_of_the_text(seed, width):
    task = toy.ToyTask(seq_len=32, block_size=3, query_len=2, answer="all")
    found = 0
    for index in range(300):
        letters, target, query = task.blocks(seed, index)
        text = task.text(seed, index)
        query_text = "".join(toy.LETTERS[q] for q in query)
        expected = decoy_in_text(text, target, query_text, width)
        assert has_decoy(letters, target, query, width) == expected, (text, width)
        found += expected
    if width >= 5:  # decoys exist at the table's c_k (about a quarter of samples): the test sees both kinds
        assert 0 < found < 300
    if width == 1:  # one token never holds two different letters
        assert found == 0


def test_the_report_of_a_trained_run_agrees_with_the_training_loops_evaluation(tmp_path):
    """toy_diagnose calls the saved model itself; the loop evaluated the same held-out samples through
    its own jitted, batched path: sequence error and token error (1 - accuracy) must agree, and the
    splits must cover every sample once."""
    raw = {**TINY, "run_dir": str(tmp_path / "run"), "steps": 4, "eval_every": 4, "eval_batches": 4}
    raw["checkpoint"] = {"every": 4, "keep": 1, "async_save": False}
    result = train(train_config_from_dict(raw))
    samples = 4 * TINY["global_batch_size"]
    report = toy_diagnose.main([str(tmp_path / "run"), "--samples", str(samples)])
    assert report["sequence_error"] == pytest.approx(result.eval_metrics["sequence_error"], abs=1e-9)
    assert report["token_error"] == pytest.approx(1 - result.eval_metrics["accuracy"], abs=1e-6)
    assert len(report["error_per_token"]) == 3 + 1  # the block's N = 3 letters and EOS
    for section in ("by_shared", "by_decoy"):
        counts = [n for n, _ in report[section].values()]
        assert sum(counts) == samples
        mean = sum(n * error for n, error in report[section].values()) / samples
        assert mean == pytest.approx(report["sequence_error"], abs=1e-9)
