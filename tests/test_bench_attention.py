"""bench/attention.py on a tiny sweep: the JSON it writes, the PNG, the README table (on a copy of the
README) and the targets computed from synthetic records."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import pytest

from bench.attention import (
    DPA,
    MARKERS,
    appended_to,
    compute_targets,
    memory_slope,
    render_table,
    time_compiled,
    write_readme,
)
from bench.train_step import device_slug
from tests.train_helpers import ROOT, cli_env

TINY = ["--min-len", "32", "--max-len", "32", "--memory-max-len", "64", "--iters", "2", "--warmup", "1"]
TINY += ["--head-dims", "16", "--heads", "2", "--configs", "kq_conv", "--dtype", "float32"]
TINY += ["--paths", "reference", "pallas", DPA]
REPORT_FIELDS = ("device", "device_kind", "platform", "jax_version", "command", "timestamp_utc")
REPORT_FIELDS += ("settings", "targets", "records")
RECORD_FIELDS = ("config", "path", "head_dim", "seq", "mode", "status", "reason")
OK_FIELDS = ("timed", "median_s", "min_s", "temp_bytes", "argument_bytes", "output_bytes", "flops")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The script run once on the tiny sweep: (output folder, report, stdout)."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "attention.py"), *TINY, "--out", str(out)],
        cwd=out,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / f"attention-{device_slug(jax.devices()[0].device_kind)}.json").read_text())
    return out, report, done.stdout


def test_json_has_a_record_per_point(run):
    _, report, stdout = run
    for field in REPORT_FIELDS:
        assert field in report, field
    assert report["settings"]["head_dims"] == [16] and report["settings"]["heads"] == 2
    assert "--max-len 32" in report["command"] and report["complete"] is True
    for record in report["records"]:
        for field in RECORD_FIELDS:
            assert field in record, field
    for path in ("reference", DPA):
        records = [r for r in report["records"] if r["path"] == path]
        assert {(r["seq"], r["mode"]) for r in records} == {
            (seq, mode) for seq in (32, 64) for mode in ("forward", "forward+backward")
        }
        for record in records:
            assert record["status"] == "ok", record
            for field in OK_FIELDS:
                assert field in record, field
            assert record["temp_bytes"] > 0 and record["flops"] > 0, record
            assert record["timed"] == (record["seq"] == 32)
            if record["timed"]:
                assert 0 < record["min_s"] <= record["median_s"]
                assert 1 <= len(record["times_s"]) <= 2
            else:
                assert record["median_s"] is None
    assert all(r["dpa_implementation"] == "xla" for r in report["records"] if r["path"] == DPA)
    assert "Targets:" in stdout


def test_skipped_path_has_a_reason(run):
    _, report, _ = run
    skipped = [r for r in report["records"] if r["path"] == "pallas"]
    assert skipped and all(r["status"] == "skipped" and r["reason"] for r in skipped)
    assert len(skipped) == 2  # one per mode, then the sweep stops


def test_png_is_written(run):
    out, report, _ = run
    png = out / f"attention-{report['device']}.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_table_replaces_only_the_marked_region(run, tmp_path):
    out, report, _ = run
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    before = readme.read_text()
    write_readme(readme, report)
    after = readme.read_text()
    start, end = before.index(MARKERS[0]), before.index(MARKERS[1]) + len(MARKERS[1])
    assert after.startswith(before[:start]) and after.endswith(before[end:])
    table = render_table(report)
    assert f"{MARKERS[0]}\n{table}\n{MARKERS[1]}" in after
    assert "| T | reference | dot_product_attention |" in table
    assert "\n| 32 | " in table and "\n| 64 | - / " in table
    assert "pallas (Pallas runs only in interpret mode on CPU)" in table or "pallas (not built)" in table
    write_readme(readme, report)  # idempotent
    assert readme.read_text() == after

    done = subprocess.run(  # the --readme mode of the script: newest JSON of --out, nothing run
        [sys.executable, str(ROOT / "bench" / "attention.py"), "--readme", str(readme), "--out", str(out)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert readme.read_text() == after


def test_append_keeps_the_records_it_does_not_remeasure(run, tmp_path):
    out, report, _ = run
    name = f"attention-{report['device']}.json"
    shutil.copy(out / name, tmp_path / name)
    argv = [a for a in TINY if a not in ("kq_conv", "reference", "pallas")]
    argv[argv.index("--configs") + 1 : argv.index("--configs") + 1] = ["head_mix"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "attention.py"), *argv, "--append", "--out", str(tmp_path)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    merged = json.loads((tmp_path / name).read_text())
    assert merged["records"][: len(report["records"])] == report["records"]
    added = merged["records"][len(report["records"]) :]
    assert {(r["config"], r["path"], r["status"]) for r in added} == {("head_mix", DPA, "ok")}
    assert merged["settings"]["configs"] == ["kq_conv", "head_mix"]
    assert merged["settings"]["paths"] == ["reference", "pallas", DPA]
    assert len(merged["runs"]) == 2 and "--append" in merged["runs"][1]["command"]


def test_append_refuses_other_settings(run):
    out, report, _ = run
    other = {**report, "settings": {**report["settings"], "heads": 4}}
    with pytest.raises(SystemExit, match="other settings"):
        appended_to(other, out / f"attention-{report['device']}.json")


def _record(path, seq, temp, median=None, config="kq_conv", status="ok", mode="forward+backward"):
    return {"config": config, "path": path, "head_dim": 128, "seq": seq, "mode": mode, "status": status}, {
        "temp_bytes": temp,
        "median_s": median,
    }


def test_targets_from_synthetic_records():
    records = []
    for seq in (512, 1024, 2048, 4096, 8192):
        records.append(_record("blockwise", seq, 1000 * seq, 1.0 if seq == 2048 else None))
        records.append(_record("reference", seq, seq * seq, 2.0 if seq == 2048 else None))
    records.append(_record("pallas", 4096, 1, 0.2))
    records.append(_record(DPA, 4096, 1, 0.1))
    records.append(_record("reference", 4096, 1, 1.0, config="head_mix"))
    records = [{**a, **b} for a, b in records]
    targets = compute_targets(records)
    assert memory_slope(records, "kq_conv", "blockwise", 128) == pytest.approx(1.0)
    assert memory_slope(records, "kq_conv", "reference", 128) == pytest.approx(2.0)
    mem = targets["blockwise_over_reference_temp_memory_at_8192"]
    assert mem["value"] == pytest.approx(1000 / 8192) and mem["met"] is True
    assert targets["blockwise_over_reference_time_at_2048"]["value"] == 0.5
    assert targets["blockwise_temp_memory_loglog_slope"]["met"] is True
    assert targets["pallas_over_dpa_time_at_4096"]["value"] == pytest.approx(2.0)
    assert targets["pallas_over_dpa_time_at_4096"]["met"] is True
    assert targets["reference_over_pallas_time_at_4096"]["value"] is None  # reference not timed there
    assert targets["head_mix_pallas_over_dpa_time_at_4096"]["met"] is None  # no pallas head_mix record
    assert compute_targets([])["blockwise_over_reference_time_at_2048"]["value"] is None


def test_timing_stops_at_the_budget():
    calls = []

    def slow(*_):
        calls.append(1)
        return jax.numpy.zeros(())

    assert len(time_compiled(slow, (), warmup=1, iters=5, budget_s=1e9)) == 5
    assert len(calls) == 6
    calls.clear()
    assert len(time_compiled(slow, (), warmup=0, iters=5, budget_s=1e-12)) == 1
    calls.clear()
    assert len(time_compiled(slow, (), warmup=2, iters=5, budget_s=1e-12)) == 1  # a long warm-up counts
    assert len(calls) == 1


def test_append_keeps_the_shorter_lengths_of_the_same_path(tmp_path):
    """bench/gpu_check.sh measures kq_conv at T = 1024..4096, then its memory-linear paths on to 32768:
    the second run must replace only the lengths it measures."""
    settings = {"dtype": "bfloat16", "heads": 16, "kv_heads": 16, "batch": 1, "causal": True}
    pairs = [_record(path, seq, seq) for path in ("blockwise", "reference") for seq in (1024, 4096)]
    short = [{**a, **b} for a, b in pairs]
    previous = {
        "command": "first",
        "timestamp_utc": "t0",
        "records": short + [{**a, **b} for a, b in [_record("blockwise", 8192, 1)]],
        "settings": {
            **settings,
            "configs": ["kq_conv"],
            "paths": ["blockwise", "reference"],
            "head_dims": [128],
            "layer_configs": {},
        },
    }
    (tmp_path / "a.json").write_text(json.dumps(previous))
    new = {
        **settings,
        "configs": ["kq_conv"],
        "paths": ["blockwise"],
        "head_dims": [128],
        "min_len": 8192,
        "max_len": 32768,
        "memory_max_len": 32768,
        "layer_configs": {},
    }
    report = {"command": "second", "timestamp_utc": "t1", "settings": new}
    kept = appended_to(report, tmp_path / "a.json")
    assert kept == short  # the blockwise 8192 record is measured again; 1024 and 4096 stay
    assert [r["command"] for r in report["runs"]] == ["first", "second"]
