"""bench/train_step.py on a tiny model: the JSON it writes, its ratios and parameter counts, and a
clear error (no traceback) for a bad --config."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import pytest
import yaml
from flax import nnx

from bench.train_step import device_slug, main
from mta_jax.config import load_model_config
from mta_jax.layers import MTA_PARAM_NAMES
from tests.train_helpers import ROOT, cli_env
from train.state import abstract_model

TINY_MODEL = {
    "vocab_size": 64,
    "dim": 32,
    "num_layers": 2,
    "num_heads": 2,
    "mta": {"pre_conv": [2, 3], "pre_head_mix": 2, "gate": "scalar"},
}
FIELDS = (
    "device",
    "device_kind",
    "jax_version",
    "config",
    "seq",
    "batch",
    "dtype",
    "attention_implementation",
    "results",
    "ratios",
    "command",
    "timestamp_utc",
)
RESULT_FIELDS = (
    "params",
    "step_time_median_s",
    "tokens_per_second",
    "flops_per_token",
    "tflops_per_second",
    "mfu",
    "memory_analysis",
    "device_peak_bytes_in_use",
)


def _write_model(tmp_path, data: dict) -> str:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _mta_param_count(config: str) -> int:
    """Sizes of the MTA-only parameters (conv kernels, head mixing, norm, gate) of the model."""
    _, params, _ = abstract_model(load_model_config(config))
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))
    return sum(leaf.size for path, leaf in leaves if any(str(key.key) in MTA_PARAM_NAMES for key in path))


def test_writes_json_with_both_models_and_their_ratios(tmp_path):
    config = _write_model(tmp_path, TINY_MODEL)
    argv = ["--config", config, "--steps", "2", "--warmup", "1", "--seq", "32", "--batch", "2"]
    report = main([*argv, "--dtype", "float32", "--out", str(tmp_path)])

    path = tmp_path / f"train_step-{device_slug(jax.devices()[0].device_kind)}.json"
    assert json.loads(path.read_text()) == report
    for field in FIELDS:
        assert field in report, field
    assert (report["seq"], report["batch"], report["dtype"]) == (32, 2, "float32")
    assert "--seq 32" in report["command"]
    mta, base = report["results"]["mta"], report["results"]["baseline"]
    for result in (mta, base):
        for field in RESULT_FIELDS:
            assert field in result, field
        assert result["tokens_per_second"] > 0
        assert len(result["step_times_s"]) == 2
        assert result["tokens_per_second"] == pytest.approx(64 / result["step_time_median_s"])
    assert report["ratios"]["tokens_per_second"] == mta["tokens_per_second"] / base["tokens_per_second"]
    temp = mta["memory_analysis"]["temp_size_in_bytes"], base["memory_analysis"]["temp_size_in_bytes"]
    if None not in temp and temp[1]:
        assert report["ratios"]["temp_memory"] == temp[0] / temp[1]
    assert mta["params"] - base["params"] == _mta_param_count(config) > 0
    assert mta["flops_per_token"] > base["flops_per_token"]


@pytest.mark.parametrize(
    "model, message",
    [
        (None, "no such file"),
        ({**TINY_MODEL, "mta": None}, "no mta section"),
        ({**TINY_MODEL, "dim": 33}, "is invalid"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, capsys, model, message):
    config = str(tmp_path / "missing.yaml") if model is None else _write_model(tmp_path, model)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", config, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("train_step-*.json"))


def test_script_reports_a_missing_config_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_step.py"), "--config", "nope.yaml"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--config nope.yaml: no such file" in done.stderr
    assert "Traceback" not in done.stderr
