"""End-to-end runs of `python -m train` in subprocesses: resuming after SIGKILL, SIGTERM, a corrupt
checkpoint, a checkpoint restored onto another mesh, two real processes, and the failures."""

from __future__ import annotations

import math
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.train_helpers import cli, run_cli, train_losses, write_config


def _wait_for_step(run_dir: Path, step: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stdout.read()}")
        if (run_dir / "metrics.jsonl").exists() and max(train_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_a_run_killed_and_resumed_has_the_uninterrupted_loss_trajectory(tmp_path):
    # TINY's learning rate is constant after warm-up, so the killed run's longer budget (it must still be
    # running when it is killed) does not change its schedule: its first 40 steps are the reference's.
    steps, every = 40, "checkpoint.every=5"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    code, out = run_cli(write_config(whole), f"steps={steps}", every)
    assert code == 0, out
    reference = train_losses(whole / "run")

    proc = cli(write_config(killed), "steps=100000", every)
    _wait_for_step(killed / "run", 12, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen = max(train_losses(killed / "run"))
    code, out = run_cli(killed / "train.yaml", f"steps={steps}", every)
    assert code == 0, out
    resumed_from = int(re.search(r"resumed from the checkpoint of step (\d+)", out).group(1))
    assert 5 <= resumed_from <= seen and resumed_from % 5 == 0
    assert resumed_from < steps, "the killed run got past the reference's last step; the test proves nothing"
    resumed = {step: loss for step, loss in train_losses(killed / "run").items() if step <= steps}
    assert resumed == reference  # exactly, step by step


def _interrupt_a_run(tmp_path, sig: signal.Signals) -> tuple[int, str]:
    """Start a long run, send `sig` after step 3; (the step it saved at, its output), checked clean."""
    proc = cli(write_config(tmp_path), "steps=100000", "checkpoint.every=1000")
    _wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"{sig.name} received: saving a checkpoint" in out and "Traceback" not in out, out
    stopped = int(re.search(r"preempted at step (\d+)", out).group(1))
    assert stopped >= 3 and _checkpoints(tmp_path / "run") == [stopped]
    return stopped, out


def test_sigterm_saves_and_exits_cleanly_then_the_run_resumes(tmp_path):
    stopped, _ = _interrupt_a_run(tmp_path, signal.SIGTERM)
    code, out = run_cli(tmp_path / "train.yaml", f"steps={stopped + 2}")
    assert code == 0 and f"resumed from the checkpoint of step {stopped}" in out, out
    assert f"finished at step {stopped + 2}" in out


def test_ctrl_c_saves_the_step_and_exits_cleanly(tmp_path):
    _interrupt_a_run(tmp_path, signal.SIGINT)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    code, out = run_cli(write_config(tmp_path))
    assert code == 0, out
    run_dir = tmp_path / "run"
    reference = train_losses(run_dir)
    assert _checkpoints(run_dir) == [2, 4, 6]
    for path in (run_dir / "checkpoints" / "6" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    code, out = run_cli(tmp_path / "train.yaml")
    assert code == 0, out
    assert "6" in out and "WARNING" in out and "resumed from the checkpoint of step 4" in out, out
    assert train_losses(run_dir) == reference


@pytest.mark.slow  # restoring onto another mesh: tests/test_checkpoint.py covers it in the fast run
def test_a_checkpoint_restores_onto_another_mesh(tmp_path):
    first = ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", "steps=4"]
    code, out = run_cli(write_config(tmp_path), *first, devices=8)
    assert code == 0, out
    reference = train_losses(tmp_path / "run")
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run", moved)
    shutil.rmtree(moved / "checkpoints" / "4")  # as if the first run had stopped at step 2
    other = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "steps=4", f"run_dir={moved}"]
    code, out = run_cli(tmp_path / "train.yaml", *other, devices=8)
    assert code == 0 and "resumed from the checkpoint of step 2" in out, out
    assert "'data': 2, 'fsdp': 2, 'tensor': 2" in out
    resumed = train_losses(moved)
    assert resumed.keys() == reference.keys()
    assert resumed == pytest.approx(reference, rel=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_losses_of_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    code, out = run_cli(write_config(one), devices=2)
    assert code == 0, out
    address = f"127.0.0.1:{_free_port()}"
    config = write_config(two)
    procs = [
        cli(
            config,
            f"distributed.coordinator_address={address}",
            "distributed.num_processes=2",
            f"distributed.process_id={rank}",
            devices=1,
        )
        for rank in range(2)
    ]
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(outs)
    assert "process 1 of 2" in outs[1]
    assert train_losses(two / "run") == pytest.approx(train_losses(one / "run"), rel=1e-5)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    path = write_config(tmp_path, optimizer={"learning_rate": 1e30, "warmup_steps": 0, "clip_norm": None})
    code, out = run_cli(path, "checkpoint.every=1", "checkpoint.async_save=false")
    assert code == 3, out
    assert "error: step 2: loss=nan" in out
    assert _checkpoints(tmp_path / "run") == [1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.kind=text", "data.path=/no/such/corpus", "model.vocab_size=259"],
            "data.path='/no/such/corpus' is invalid",
        ),
        (["model.vocab_size=8"], "model.vocab_size=8 is invalid: the data (toy"),
        (["global_batch_size=6"], "global_batch_size=6 is invalid"),
    ],
)
def test_bad_data_and_run_settings_fail_with_their_message(tmp_path, overrides, message):
    code, out = run_cli(write_config(tmp_path), *overrides, devices=4)
    assert code == 2 and f"error: {message}" in out, out


@pytest.mark.slow  # text training end to end is also tests/test_summary.py's smoke run, in the fast run
def test_a_text_corpus_trains_on_packed_documents(tmp_path, rng):
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    paragraphs = [" ".join(rng.choice(words, size=rng.integers(3, 30))) for _ in range(200)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs))
    overrides = ["data.kind=text", f"data.path={corpus}", "data.seq_len=48", "model.vocab_size=259"]
    code, out = run_cli(write_config(tmp_path), *overrides, "steps=8", "eval_every=4")
    assert code == 0, out
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    assert losses[8] < losses[1]  # words from a small vocabulary: learnt within a few steps
    assert "eval | loss" in out


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run's config and checkpoints, by relative path."""
    files = [run_dir / "config.yaml", *(run_dir / "checkpoints").rglob("*")]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in files if p.is_file()}


def test_a_rerun_with_another_model_is_refused_and_leaves_the_run_alone(tmp_path):
    code, out = run_cli(write_config(tmp_path), "steps=2")
    assert code == 0, out
    run_dir = tmp_path / "run"
    before = _snapshot(run_dir)
    code, out = run_cli(tmp_path / "train.yaml", "steps=2", "model.mta=null", "model.dim=16")
    assert code == 2, out
    assert "error: run_dir=" in out and "another model" in out, out
    assert "model.mta: saved {" in out and "requested None" in out, out
    assert "model.dim: saved 32, requested 16" in out, out
    assert "Traceback" not in out, out
    assert _snapshot(run_dir) == before
    code, out = run_cli(tmp_path / "train.yaml", "steps=4", "model.attention_implementation=reference")
    assert code == 0 and "resumed from the checkpoint of step 2" in out, out
    assert "finished at step 4" in out
