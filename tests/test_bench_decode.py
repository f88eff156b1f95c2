"""bench/decode.py at a tiny size: the JSON it writes and the ratios it derives."""

from __future__ import annotations

import json

import pytest

from bench.decode import main, ratios

TINY = ["--dim", "32", "--layers", "1", "--kq-conv-layers", "all", "--heads", "2", "--vocab", "64"]
TINY += ["--batches", "2"]
TINY += ["--cache-lens", "16", "--steps", "4", "--runs", "2"]
REPORT_FIELDS = ("device", "device_kind", "platform", "jax_version", "command", "timestamp_utc")
REPORT_FIELDS += ("settings", "models", "records", "ratios")
RECORD_FIELDS = ("model", "batch", "cache_len", "steps", "median_s", "min_s", "times_s", "tokens_per_s")
RECORD_FIELDS += ("ms_per_step", "cache_bytes", "kv_bytes")


def test_json_has_a_record_per_point(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    report = json.loads((tmp_path / "decode-cpu.json").read_text())
    for field in REPORT_FIELDS:
        assert field in report, field
    assert report["device"] == "cpu" and "--cache-lens 16" in report["command"]
    assert report["models"]["mta"]["kq_conv_layers"] is None and report["models"]["baseline"]["mta"] is False
    assert [(r["model"], r["batch"]) for r in report["records"]] == [("mta", 2), ("baseline", 2)]
    for record in report["records"]:
        for field in RECORD_FIELDS:
            assert field in record, field
        assert len(record["times_s"]) == 2 and 0 < record["min_s"] <= record["median_s"]
        assert record["tokens_per_s"] == pytest.approx(record["batch"] * 4 / record["median_s"])
        # k and v: batch x cache x heads x head dim x 2 (k, v) x 4 bytes, in one layer
        assert record["kv_bytes"] == record["batch"] * 16 * 2 * 16 * 2 * 4
        extra = record["cache_bytes"] - record["kv_bytes"]
        if record["model"] == "baseline":  # segment ids, the length and the last segment and position
            assert extra == record["batch"] * 16 * 4 + 4 + 2 * record["batch"] * 4
        else:  # plus 5 score rows and 5 probability rows (c_q = 6) with their segment ids
            rows = 2 * (record["batch"] * 2 * 5 * 16 * 4 + record["batch"] * 5 * 4)
            assert extra == record["batch"] * 16 * 4 + 4 + 2 * record["batch"] * 4 + rows
    assert len(report["ratios"]) == 1 and "MTA / baseline time per token" in stdout


def test_ratios_pair_the_models():
    records = [
        {"model": "mta", "batch": 1, "cache_len": 8, "median_s": 3.0, "cache_bytes": 12},
        {"model": "baseline", "batch": 1, "cache_len": 8, "median_s": 2.0, "cache_bytes": 10},
        {"model": "mta", "batch": 2, "cache_len": 8, "median_s": 1.0, "cache_bytes": 1},
    ]
    assert ratios(records) == [
        {
            "batch": 1,
            "cache_len": 8,
            "mta_over_baseline_time": 1.5,
            "mta_over_baseline_cache_bytes": 1.2,
        }
    ]
