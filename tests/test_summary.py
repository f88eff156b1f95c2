"""The README's main command: describe a config, and the smoke run on real text."""

import json

import pytest
import yaml

from mta_jax.model import count_params
from mta_jax.summary import DEFAULT_TEXT, main
from tests.train_helpers import ROOT
from train.config import load_train_config


def test_describes_the_880m_mta_model(tmp_path, capsys):
    assert main(["--config", "configs/models/880M_mta.yaml", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "layers with the key-query conv: 2, 6, 10, 14, 18, 22" in out
    assert "MTA adds 29,592" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["parameters"] == 876_583_320 and result["mta_extra_parameters"] == 29_592


def test_a_train_config_is_summarised_by_its_model_section(capsys):
    """configs/train/tiny_lm.yaml: its model section (base: ../models/tiny_mta.yaml, vocab_size 259)."""
    path = ROOT / "configs/train/tiny_lm.yaml"
    assert main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(the model section of a train config)" in out and "vocab 259" in out
    assert f"parameters: {count_params(load_train_config(path).model):,}" in out


def test_bad_config_files_are_one_line_errors(tmp_path, capsys):
    bad = {"missing.yaml": None, "broken.yaml": "dim: [", "list.yaml": "- 1", "partial.yaml": "dim: 32"}
    train = yaml.safe_load((ROOT / "configs/train/tiny_lm.yaml").read_text())
    base = str(ROOT / "configs/models/tiny_mta.yaml")
    model = {**train["model"], "base": base, "mta": {"pre_conv": [3, 4]}}
    bad["bad_train.yaml"] = yaml.safe_dump({**train, "model": model})
    messages = {
        "missing.yaml": "no such file",
        "broken.yaml": "malformed YAML at line 1",
        "list.yaml": "the file must hold a mapping",
        "partial.yaml": "missing 3 required positional arguments",
        "bad_train.yaml": "model.mta.pre_conv[1] (c_k)=4 is invalid",
    }
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        assert main(["--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and messages[name] in err and len(err.strip().splitlines()) == 1, err


SMOKE = ["--config", "configs/models/tiny_mta.yaml", "--steps", "12", "--batch", "4", "--seq", "64"]


def _smoke(tmp_path, *extra):
    out = tmp_path / "r.json"
    assert main([*SMOKE, *extra, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["first_loss"] > 5.0  # about log(256) at init
    assert result["last_loss"] < result["first_loss"] - 1.5
    return result


@pytest.mark.skipif(not DEFAULT_TEXT.exists(), reason=f"{DEFAULT_TEXT} is not on this machine")
def test_smoke_run_lowers_the_loss_on_shakespeare(tmp_path):
    assert _smoke(tmp_path)["data"] == str(DEFAULT_TEXT)


def test_smoke_run_on_any_text_file(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    assert _smoke(tmp_path, "--data", str(text))["data"] == str(text)


def test_missing_data_file_is_an_error(tmp_path, capsys):
    assert main([*SMOKE, "--data", str(tmp_path / "missing.txt")]) == 1
    assert "does not exist" in capsys.readouterr().err
