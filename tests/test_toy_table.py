"""The toy task learned end to end, and bench/toy_table.py (its table, its JSON, resuming a table)."""

from __future__ import annotations

import json

import pytest

from bench.toy_table import (
    budgets_text,
    cell,
    eval_curve,
    expected_seconds,
    main,
    parse_answer_steps,
    plot,
    render,
    run_config,
    solve_cell,
    steps_to_solve,
)
from tests.train_helpers import ROOT
from train.config import load_train_config, train_config_from_dict
from train.loop import train

# An easy toy setting: about 3 blocks of N = 3 letters in 16 tokens, answer = the block's first letter.
EASY = {
    "model": {"vocab_size": 31, "dim": 32, "num_layers": 2, "num_heads": 2, "mta": {"pre_conv": [2, 5]}},
    "data": {"kind": "toy", "seq_len": 16, "toy_block_size": 3, "toy_query_len": 2, "toy_answer": "first"},
    "optimizer": {"learning_rate": 1e-2, "warmup_steps": 50, "decay": "cosine", "final_lr_fraction": 0.1},
    "checkpoint": {"every": 1000, "keep": 1, "async_save": False},
    "steps": 300,
    "global_batch_size": 32,
    "log_every": 100,
    "eval_batches": 4,
    "progress": False,
}


def test_mta_learns_an_easy_toy_setting_to_a_low_error(tmp_path):
    # A fixed seed: this checks that training works, not that every seed converges in 300 steps.
    result = train(train_config_from_dict({**EASY, "run_dir": str(tmp_path / "run"), "seed": 0}))
    # 128 held-out samples; chance for a first letter among ~9 candidates is ~89% error
    assert result.eval_metrics["sequence_error"] < 0.1


def test_cell_is_mean_and_sample_std_in_percent():
    assert cell([0.0, 0.5, 1.0]) == "50.0 ± 50.0"
    assert cell([0.25]) == "25.0"


def test_render_puts_ours_beside_the_paper():
    report = {
        "answers": ["all", "last"],
        "seeds": [0, 1],
        "command": "python bench/toy_table.py",
        "device": "cpu",
        "setting": dict(eval_samples=512, block_size=3, query_len=2, seq_len=32, steps=9, batch=4),
        "runs": [
            {"model": "MTA", "answer": "all", "seed": 0, "sequence_error": 0.0},
            {"model": "MTA", "answer": "all", "seed": 1, "sequence_error": 0.02},
            {"model": "Transformer", "answer": "all", "seed": 0, "sequence_error": 0.9},
        ],
    }
    table = render(report)
    assert "| MTA | 1.0 ± 1.4 | - | 0.1 ± 0.1 | 0.0 ± 0.0 |" in table
    assert "| Transformer | 90.0 | - | 51.6 ± 43.1 | 1.3 ± 0.4 |" in table


def test_steps_to_solve_is_the_first_eval_at_or_below_the_target():
    curve = [[250, 0.6], [500, 0.02], [750, 0.01], [1000, 0.0]]
    assert steps_to_solve(curve, 0.01) == 750
    assert steps_to_solve(curve, 0.5) == 500
    assert steps_to_solve(curve, -1.0) is None and steps_to_solve([], 0.01) is None


def test_eval_curve_reads_the_eval_lines_of_metrics_jsonl_and_the_last_of_a_step_wins(tmp_path):
    lines = [
        {"step": 250, "split": "train", "loss": 1.0},
        {"step": 250, "split": "eval", "loss": 0.9, "sequence_error": 0.5},
        {"step": 500, "split": "eval", "loss": 0.5, "sequence_error": 0.3},
        {"step": 500, "split": "eval", "loss": 0.4, "sequence_error": 0.2},  # resumed: this one counts
        {"step": 750, "split": "eval", "loss": 0.4},  # no sequence error (not a toy run)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert eval_curve(tmp_path) == [[250, 0.5], [500, 0.2]]
    assert eval_curve(tmp_path / "missing") == []


def _run(model, answer, seed, solved, error, curve=None):
    return {
        "model": model,
        "answer": answer,
        "seed": seed,
        "steps_to_solve": solved,
        "sequence_error": error,
        "curve": curve or [[250, 0.5], [500, error]],
    }


SOLVE_REPORT = {
    "answers": ["all", "first"],
    "seeds": [0, 1, 2],
    "command": "python bench/toy_table.py",
    "device": "cpu",
    "setting": dict(
        eval_samples=512,
        block_size=3,
        query_len=2,
        seq_len=32,
        steps=4000,
        batch=32,
        eval_every=250,
        target=0.01,
    ),
    "runs": [
        _run("MTA", "all", 1, 500, 0.01),
        _run("MTA", "all", 0, 750, 0.0),
        _run("MTA", "all", 2, None, 0.2),
        _run("Transformer", "all", 0, None, 0.9),
        _run("MTA", "first", 0, 250, 0.0, [[250, 0.0]]),
    ],
}


def test_solve_cell_lists_every_seed_in_seed_order_and_counts_the_solved():
    runs = [r for r in SOLVE_REPORT["runs"] if r["model"] == "MTA" and r["answer"] == "all"]
    assert solve_cell(runs, 4000) == "2/3: 750, 500, >4000"


def test_render_has_steps_to_solve_and_the_error_where_runs_stopped():
    table = render(SOLVE_REPORT)
    assert "Steps to reach 1% sequence error (evaluated every 250 steps;" in table
    assert "| MTA | 2/3: 750, 500, >4000 | 1/1: 250 |" in table
    assert "| Transformer | 0/1: >4000 | - |" in table
    assert "| MTA | 7.0 ± 11.3 | 0.0 | 0.1 ± 0.1 | 0.0 ± 0.0 |" in table
    assert "at most 4000 steps of 32" in table


def test_plot_writes_a_png(tmp_path):
    plot(SOLVE_REPORT, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_expected_time_is_runs_times_budget_times_the_step_time_scaled_by_flops():
    cfg = load_train_config(ROOT / "configs/train/toy_table.yaml", ["steps=1000", "global_batch_size=32"])
    one = expected_seconds(cfg, 1)
    assert one == pytest.approx(62, rel=0.01)  # the measured 0.062 s a step of this config
    assert expected_seconds(cfg, 10) == pytest.approx(10 * one)
    assert expected_seconds(cfg, 10, jobs=2) == pytest.approx(10 * one / 1.3)  # PARALLEL_SPEEDUP
    bigger = load_train_config(ROOT / "configs/train/toy_table.yaml", ["steps=1000", "global_batch_size=64"])
    assert expected_seconds(bigger, 1) == pytest.approx(2 * one)


def test_the_paper_scale_config_is_the_papers_toy_setting():
    cfg = load_train_config(ROOT / "configs/train/toy_paper.yaml")
    data, model = cfg.data, cfg.model
    assert (data.toy_block_size, data.toy_query_len, data.seq_len) == (5, 2, 320)
    assert (model.num_layers, model.dim, model.num_heads, model.mta.dropout_rate) == (4, 256, 2, 0.1)
    assert model.mta.pre_conv == (2, 9) and model.mta.post_conv is None
    assert (cfg.global_batch_size, cfg.optimizer.learning_rate, cfg.optimizer.decay) == (64, 1e-4, "constant")
    assert cfg.stop_at_eval_error == 0.01 and cfg.eval_every >= 1


def test_run_config_swaps_the_model_answer_and_seed(tmp_path):
    cfg = load_train_config(ROOT / "configs/train/toy_table.yaml")
    base = run_config(cfg, "Transformer", "last", 2, tmp_path)
    assert base.model.mta is None and base.model.dim == cfg.model.dim
    assert base.data.toy_answer == "last" and base.seed == 2 and base.run_dir.startswith(str(tmp_path))
    assert run_config(cfg, "MTA", "all", 0, tmp_path).model == cfg.model
    assert run_config(cfg, "MTA", "all", 0, tmp_path).steps == cfg.steps
    assert run_config(cfg, "MTA", "all", 0, tmp_path, steps=17).steps == 17


def test_the_script_writes_json_and_markdown_and_keeps_finished_runs(tmp_path, capsys):
    args = ["--steps", "2", "--seeds", "0", "--answers", "last", "--models", "MTA"]
    args += ["--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"), "global_batch_size=8"]
    report = main(args)
    saved = json.loads((tmp_path / "out/toy_table.json").read_text())
    assert saved == report and len(saved["runs"]) == 1
    assert saved["setting"]["batch"] == 8 and saved["setting"]["config"]["global_batch_size"] == 8
    run = saved["runs"][0]
    assert run["model"] == "MTA" and 0.0 <= run["sequence_error"] <= 1.0 and run["seconds"] > 0
    assert run["final_step"] == 2 and run["curve"] == [[2, run["sequence_error"]]]
    assert "| MTA | " in (tmp_path / "out/toy_table.md").read_text()
    assert (tmp_path / "out/toy_table.png").is_file()
    # run again: the finished run is kept, nothing is trained
    capsys.readouterr()
    again = main(args)
    out = capsys.readouterr().out
    assert again["runs"] == saved["runs"] and "0 run(s) to train" in out and "seed=0:" not in out


def test_a_config_without_mta_is_refused(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text("model: {vocab_size: 31, dim: 32, num_layers: 1, num_heads: 2}\ndata: {kind: toy}\n")
    with pytest.raises(ValueError, match="needs data.kind toy and a model with MTA"):
        main(["--config", str(path), "--out", str(tmp_path)])


def test_a_preempted_run_is_not_recorded_and_the_table_stops(tmp_path, monkeypatch):
    import bench.toy_table as toy_table
    from train.loop import RunResult

    calls = []

    def preempted(cfg):
        calls.append(cfg.seed)
        return RunResult(step=3, losses={}, eval_loss=None, preempted=True)

    monkeypatch.setattr(toy_table, "train", preempted)
    args = ["--seeds", "0", "1", "--answers", "last", "--models", "MTA", "--out", str(tmp_path / "out")]
    report = main(args + ["--runs-dir", str(tmp_path / "runs")])
    assert calls == [0] and report["runs"] == []


def test_jobs_train_runs_in_worker_processes_and_record_each(tmp_path, capsys):
    args = ["--steps", "2", "--seeds", "0", "1", "--answers", "last", "--models", "MTA", "--jobs", "2"]
    args += ["--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"), "global_batch_size=8"]
    report = main(args)
    assert sorted(r["seed"] for r in report["runs"]) == [0, 1]
    for run in report["runs"]:
        assert run["final_step"] == 2 and 0.0 <= run["sequence_error"] <= 1.0
        assert (tmp_path / "runs" / f"mta-last-seed{run['seed']}" / "metrics.jsonl").is_file()
    assert "2 at a time" in capsys.readouterr().out
    with pytest.raises(ValueError, match="jobs=0 is invalid"):
        main(["--jobs", "0", "--out", str(tmp_path / "o2")])


def test_a_run_queued_after_a_stop_does_not_start(tmp_path, monkeypatch):
    import threading

    import bench.toy_table as toy_table

    stop = threading.Event()
    stop.set()
    monkeypatch.setattr(toy_table, "_STOP", stop)
    monkeypatch.setattr(toy_table, "train", lambda cfg: pytest.fail("a stopped table trained a run"))
    cfg = run_config(load_train_config(ROOT / "configs/train/toy_table.yaml"), "MTA", "all", 0, tmp_path)
    assert toy_table._train_one(cfg) is None


def test_answer_steps_are_parsed_and_bad_ones_named():
    assert parse_answer_steps(["all=6000", "last=10"]) == {"all": 6000, "last": 10}
    assert parse_answer_steps([]) == {}
    for bad in ("all", "every=10", "all=0", "all=-5", "all=1e3", "=6000"):
        with pytest.raises(ValueError, match=f"--answer-steps '{bad}' is invalid"):
            parse_answer_steps([bad])


def test_render_gives_each_answer_variant_its_own_budget():
    report = dict(SOLVE_REPORT, setting=dict(SOLVE_REPORT["setting"], answer_steps={"all": 6000}))
    table = render(report)
    assert "| MTA | 2/3: 750, 500, >6000 | 1/1: 250 |" in table
    assert "| Transformer | 0/1: >6000 | - |" in table
    assert 'at most 6000 ("all") / 4000 ("first") steps of 32' in table
    assert budgets_text(SOLVE_REPORT["setting"], ["all", "first"]) == "4000"


def test_the_script_trains_each_answer_variant_for_its_budget(tmp_path, monkeypatch, capsys):
    import bench.toy_table as toy_table
    from train.loop import RunResult

    budgets = {}

    def fake_train(cfg):
        budgets[cfg.data.toy_answer] = cfg.steps
        metrics = {"sequence_error": 0.5}
        return RunResult(step=cfg.steps, losses={}, eval_loss=0.5, preempted=False, eval_metrics=metrics)

    monkeypatch.setattr(toy_table, "train", fake_train)
    args = ["--steps", "7", "--answer-steps", "all=9", "--seeds", "0", "--models", "MTA"]
    report = main(args + ["--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")])
    assert budgets == {"all": 9, "first": 7, "last": 7}
    assert report["setting"]["steps"] == 7 and report["setting"]["answer_steps"] == {"all": 9}
    assert {r["answer"]: r["final_step"] for r in report["runs"]} == {"all": 9, "first": 7, "last": 7}
    assert 'at most 9 ("all") / 7 ("first", "last") steps each' in capsys.readouterr().out
