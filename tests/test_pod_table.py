"""bench/pod_table.py's bookkeeping from synthetic train.compile reports (nothing compiled)."""

import pytest

from bench import pod_table
from bench.readme import replace_marked

GiB = 2**30


def _report(peak_gib, tokens_per_s, mfu, flops, fits=True, attention=None):
    return {
        "chips": 32,
        "hbm_bytes": 95 * GiB,
        "train_peak_bytes": int(peak_gib * GiB),
        "fits": fits,
        "estimate": {"tokens_per_s_per_chip": tokens_per_s, "mfu": mfu},
        "flops_per_chip": {"compiled": flops},
        "attention": attention or {"pallas": list(range(24))},
    }


REPORTS = {
    ("880M", "baseline", "v5p-64"): _report(10.0, 40_000, 0.5, 1e13),
    ("880M", "mta", "v5p-64"): _report(
        12.0, 30_000, 0.45, 1.3e13, attention={"pallas": [0, 1], "blockwise": [2]}
    ),
    ("1B", "baseline", "v5p-64"): _report(20.0, 20_000, 0.5, 2e13),
    ("1B", "mta", "v5p-64"): _report(30.0, 10_000, 0.3, 3e13, fits=False),
}


def test_rows_pair_baseline_and_mta_and_skip_missing_points():
    table = pod_table.rows(["300M", "880M", "1B"], ["v5p-64"], load=lambda *key: REPORTS.get(key))
    assert [r["model"] for r in table] == ["880M", "1B"]  # no 300M reports
    row = table[0]
    assert row["memory_ratio"] == pytest.approx(1.2, rel=1e-6)
    assert row["throughput_ratio"] == pytest.approx(0.75)
    assert row["flops_ratio"] == pytest.approx(1.3)
    assert row["mta_attention"] == {"pallas": 2, "blockwise": 1}


def test_markdown_marks_unfit_runs_and_checks_the_goals():
    text = pod_table.markdown(pod_table.rows(["880M", "1B"], ["v5p-64"], load=lambda *key: REPORTS.get(key)))
    assert (
        "| 880M | v5p-64 (32 chips, 95 GiB) | 10.0 | 12.0 | 1.20 | 50% | 45% | 0.75 | 1.30 "
        "| pallas 2, blockwise 1 |" in text
    )
    assert "30.0 (does not fit)" in text
    # worst memory ratio 1.5 > 1.3, worst throughput 0.5 < 0.7
    assert "worst here 1.50: NOT met" in text and "worst 0.50: NOT met" in text
    assert "ROOFLINE ESTIMATES" in text and "Table 9" in text


def test_readme_table_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{pod_table.MARKERS[0]}\nold\n{pod_table.MARKERS[1]}\nafter\n")
    replace_marked(readme, pod_table.MARKERS, "new table")
    assert readme.read_text() == f"before\n{pod_table.MARKERS[0]}\nnew table\n{pod_table.MARKERS[1]}\nafter\n"
    (tmp_path / "other.md").write_text("no markers")
    with pytest.raises(ValueError, match="other.md lacks the markers"):
        replace_marked(tmp_path / "other.md", pod_table.MARKERS, "x")


def test_step_estimate_never_counts_less_than_the_model_flops():
    """A compiled count under the model's (XLA counts loop bodies once) must not give MFU over 100%."""
    from kernels.chips import get_pod
    from train.aot_step import step_estimate

    chip = get_pod("v5p-64").chip
    report = {"chips": 32, "tokens_per_step": 262_144, "bytes_accessed_per_chip": 1.0}
    model_flops = chip.peak_flops * 0.1  # 100 ms of compute at peak
    report["flops_per_chip"] = {"compiled": 0.8 * model_flops, "analytical_model": model_flops}
    under = step_estimate(report, chip)
    assert under["flops_used"] == "analytical_model"
    assert under["step_time_s"] == pytest.approx(0.1) and under["mfu"] == pytest.approx(1.0)
    report["flops_per_chip"]["compiled"] = 1.25 * model_flops  # remat: more hardware work than model work
    over = step_estimate(report, chip)
    assert over["flops_used"] == "compiled" and over["mfu"] == pytest.approx(0.8)
    assert over["tokens_per_s_per_chip"] == pytest.approx(262_144 / 32 / 0.125)


def test_rows_compiled_with_old_kernel_costs_are_marked_and_left_out_of_the_goals():
    """A report whose Mosaic kernels declared each operand once (no kernel_cost_model) has a too-optimistic
    estimate: its row carries * and the goals are judged on the others only."""
    from kernels.tpu_cost import COST_MODEL

    current = {
        k: {**r, "mosaic_kernels_in_train_step": 48, "kernel_cost_model": COST_MODEL}
        for k, r in REPORTS.items()
    }
    reports = {
        **current,
        ("1B", "mta", "v5p-64"): {**REPORTS[("1B", "mta", "v5p-64")], "mosaic_kernels_in_train_step": 48},
    }
    table = pod_table.rows(["880M", "1B"], ["v5p-64"], load=lambda *key: reports.get(key))
    assert [r["current_costs"] for r in table] == [True, False]
    text = pod_table.markdown(table)
    assert "| 0.50 * |" in text and "| 0.75 |" in text and pod_table.STALE_NOTE in text
    assert "worst here 1.20: met" in text and "worst 0.75: met" in text  # 1B's stale 1.50 / 0.50 left out
    assert not pod_table.stale({"attention": {"blockwise": [0]}})  # no Mosaic kernel: nothing to be stale
    assert not pod_table.markdown(pod_table.rows(["880M"], ["v5p-64"], load=lambda *k: current.get(k))).count(
        "*"
    )
