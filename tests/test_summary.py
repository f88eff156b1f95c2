"""The README's main command: describe a config, and the smoke run on real text."""

import json

import pytest

from mta_jax.summary import DEFAULT_TEXT, main


def test_describes_the_880m_mta_model(tmp_path, capsys):
    assert main(["--config", "configs/models/880M_mta.yaml", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "layers with the key-query conv: 2, 6, 10, 14, 18, 22" in out
    assert "MTA adds 29,592" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["parameters"] == 876_583_320 and result["mta_extra_parameters"] == 29_592


@pytest.mark.skipif(not DEFAULT_TEXT.exists(), reason=f"{DEFAULT_TEXT} is not on this machine")
def test_smoke_run_lowers_the_loss_on_shakespeare(tmp_path):
    out = tmp_path / "r.json"
    args = ["--config", "configs/models/tiny_mta.yaml", "--steps", "12", "--batch", "4", "--seq", "64"]
    assert main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["first_loss"] > 5.0  # about log(256) at init
    assert result["last_loss"] < result["first_loss"] - 1.5
