"""stop_at_eval_error: a run stops at the first evaluation whose sequence error reaches its target."""

from __future__ import annotations

import json

import pytest

import train.loop as loop
from tests.train_helpers import TINY
from train.config import train_config_from_dict

# The sequence error of the evaluations at steps 2, 4, 6, 8, 10 (scripted, so no training is needed).
ERRORS = [0.5, 0.2, 0.01, 0.0, 0.0]


# The smallest model (no MTA part: what is tested is the loop), so that a run compiles in seconds.
SMALL_MODEL = {"vocab_size": 31, "dim": 16, "num_layers": 1, "num_heads": 2}


def _config(tmp_path, **overrides):
    raw = {**TINY, "model": SMALL_MODEL, "run_dir": str(tmp_path / "run")}
    raw.update(steps=10, eval_every=2, log_every=2)
    raw["checkpoint"] = {"every": 100, "keep": 3, "async_save": False}
    return train_config_from_dict({**raw, **overrides})


@pytest.fixture
def scripted_errors(monkeypatch):
    """loop._evaluate returns ERRORS in turn; the list of the calls' sequence errors is returned."""
    calls: list[float] = []

    def evaluate(*args, **kwargs):
        error = ERRORS[len(calls)]
        calls.append(error)
        return {"loss": 1.0 + error, "bits_per_token": 1.0, "accuracy": 1 - error, "sequence_error": error}

    monkeypatch.setattr(loop, "_evaluate", evaluate)
    return calls


def _checkpoints(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow  # two short runs: about 10 s each, 25 s on a busy 2-core CPU
def test_the_run_stops_at_the_first_eval_at_or_below_the_target(tmp_path, scripted_errors):
    result = loop.train(_config(tmp_path, stop_at_eval_error=0.01))
    run_dir = tmp_path / "run"
    # 0.5 at step 2, 0.2 at step 4, 0.01 at step 6: <= 0.01, so it stops there (not at 8, where it is 0)
    assert result.stopped_at == 6 and result.step == 6 and scripted_errors == [0.5, 0.2, 0.01]
    assert max(result.losses) == 6 and result.eval_metrics["sequence_error"] == 0.01
    assert _checkpoints(run_dir) == [6]
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["step"] == 6 and stopped["sequence_error"] == 0.01 and stopped["target"] == 0.01
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["sequence_error"]) for r in evals if r["split"] == "eval"]
    assert evals == [(2, 0.5), (4, 0.2), (6, 0.01)]

    # started again, the solved run does not train on
    again = loop.train(_config(tmp_path, stop_at_eval_error=0.01))
    assert again.stopped_at == 6 and again.step == 6 and again.losses == {}
    assert again.eval_metrics["sequence_error"] == 0.01 and _checkpoints(run_dir) == [6]


@pytest.mark.slow
def test_a_target_never_reached_runs_to_the_end(tmp_path, scripted_errors):
    result = loop.train(_config(tmp_path, stop_at_eval_error=0.0, steps=6))
    assert result.stopped_at is None and result.step == 6 and scripted_errors == [0.5, 0.2, 0.01]
    assert not (tmp_path / "run/stopped.json").exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"stop_at_eval_error": 1.0}, r"stop_at_eval_error=1.0 is invalid: must be a fraction in \[0, 1\)"),
        ({"stop_at_eval_error": -0.1}, "must be a fraction"),
        ({"stop_at_eval_error": float("nan")}, "must be a fraction"),
        ({"stop_at_eval_error": True}, "must be float | null"),
        ({"stop_at_eval_error": 0.01, "eval_every": 0}, "needs eval_every >= 1"),
        (
            {"stop_at_eval_error": 0.01, "data": {"kind": "text", "path": "x.txt"}},
            "data.kind='text' has no sequence error",
        ),
    ],
)
def test_bad_targets_are_refused_with_a_clear_error(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **overrides)


def test_the_target_is_read_from_a_command_line_override(tmp_path):
    from train.config import apply_overrides

    raw = apply_overrides({**TINY, "eval_every": 2}, ["stop_at_eval_error=0.01"])
    assert train_config_from_dict(raw).stop_at_eval_error == 0.01
