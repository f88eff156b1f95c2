"""bench/real_text.py: MTA and its baseline trained on real text, compared by validation bits per byte."""

from __future__ import annotations

import json

import pytest

from bench.real_text import main, render, run_config
from mta_jax.summary import DEFAULT_TEXT
from tests.train_helpers import ROOT
from train.config import load_train_config


@pytest.mark.skipif(not DEFAULT_TEXT.exists(), reason=f"{DEFAULT_TEXT} is not on this machine")
def test_both_models_train_on_the_text_and_get_a_bits_per_byte(tmp_path):
    args = ["--text", str(DEFAULT_TEXT), "--steps", "2", "--eval-tokens", "256", "--eval-seq-len", "64"]
    report = main(args + ["--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")])
    saved = json.loads(next((tmp_path / "out").glob("real_text-*.json")).read_text())
    assert saved == report
    mta, base = report["runs"]["mta"], report["runs"]["baseline"]
    assert mta["parameters"] > base["parameters"]  # the same model plus the MTA parameters
    for run in (mta, base):
        assert run["tokens"] >= 256 and run["bytes"] > 0
        # a barely trained byte model: between 1 bit per byte and uniform over 259 tokens (8.02 bits)
        assert 1.0 < run["bits_per_byte"] < 9.0
    assert report["bits_per_byte_difference"] == pytest.approx(mta["bits_per_byte"] - base["bits_per_byte"])
    assert "| MTA |" in render(report)


def test_the_baseline_is_the_same_model_without_mta(tmp_path):
    cfg = load_train_config(ROOT / "configs/train/tiny_lm.yaml")
    base, mta = run_config(cfg, "baseline", tmp_path), run_config(cfg, "mta", tmp_path)
    assert base.model.mta is None and mta.model == cfg.model
    assert base.model.dim == mta.model.dim and base.data == mta.data and base.seed == mta.seed


def test_a_missing_text_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data.path=.* is invalid: no such file"):
        main(["--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])
