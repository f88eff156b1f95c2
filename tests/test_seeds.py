"""The test session's seed (tests/conftest.py): one for all xdist workers, printed with -q, replayable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

TINY_TEST = """
import os
from pathlib import Path


def test_seed(seed):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "controller")
    (Path(os.environ["SEEDS_OUT"]) / worker).write_text(str(seed))
"""


def _run_two_workers(tmp_path: Path, **env: str) -> tuple[dict[str, int], str]:
    """pytest -n 2 --dist each (every worker runs the test) on a test that records its seed fixture."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_tiny.py").write_text(TINY_TEST)
    out_dir = tmp_path / "seeds"
    out_dir.mkdir()
    environ = {k: v for k, v in os.environ.items() if k not in ("MTA_TEST_SEED", "PYTEST_ADDOPTS")}
    environ.update(SEEDS_OUT=str(out_dir), **env)
    command = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "each", "-p", "no:cacheprovider"]
    proc = subprocess.run(command, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {p.name: int(p.read_text()) for p in out_dir.iterdir()}, proc.stdout


def test_every_worker_gets_the_session_seed_and_the_summary_prints_it(tmp_path):
    seeds, out = _run_two_workers(tmp_path)
    assert sorted(seeds) == ["gw0", "gw1"], seeds
    assert len(set(seeds.values())) == 1, f"the workers drew different seeds: {seeds}"
    printed = [line for line in out.splitlines() if line.startswith("MTA_TEST_SEED=")]
    assert printed, out
    base = int(printed[-1].split("=")[1].split()[0])
    assert seeds["gw0"] == (base + zlib.crc32(b"test_tiny.py::test_seed")) % 2**31


def test_mta_test_seed_replays_a_session(tmp_path):
    seeds, out = _run_two_workers(tmp_path, MTA_TEST_SEED="123")
    assert "MTA_TEST_SEED=123 (set it to replay" in out
    assert set(seeds.values()) == {(123 + zlib.crc32(b"test_tiny.py::test_seed")) % 2**31}


SWEPT_TEST = """
import os
from pathlib import Path

import pytest


@pytest.mark.parametrize("size", [2, 3])
def test_seed(seed, size):
    with open(Path(os.environ["SEEDS_OUT"]) / "log", "a") as f:
        f.write(f"{os.environ.get('CASE', 'swept')} {size} {seed}\\n")


def test_without_random_inputs():
    pass
"""


def test_sweep_seeds_run_each_seeded_case_per_seed_as_a_replay_would(tmp_path):
    """--sweep-seeds 5-7 gives each case the seed MTA_TEST_SEED=5, 6, 7 would give it alone."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_swept.py").write_text(SWEPT_TEST)
    environ = {k: v for k, v in os.environ.items() if k not in ("MTA_TEST_SEED", "PYTEST_ADDOPTS")}
    environ["SEEDS_OUT"] = str(tmp_path)
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_swept.py"]
    swept = subprocess.run(
        [*base, "--seeded-only", "--sweep-seeds", "5-7"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
    )
    assert swept.returncode == 0 and "6 passed, 1 deselected" in swept.stdout, swept.stdout + swept.stderr
    for replay in (5, 6, 7):
        done = subprocess.run(
            base, cwd=tmp_path, env={**environ, "MTA_TEST_SEED": str(replay), "CASE": f"replay{replay}"}
        )
        assert done.returncode == 0
    lines = [line.split() for line in (tmp_path / "log").read_text().splitlines()]
    swept_seeds = sorted((size, seed) for case, size, seed in lines if case == "swept")
    replayed = sorted((size, seed) for case, size, seed in lines if case != "swept")
    assert len(swept_seeds) == 6 and swept_seeds == replayed
    bad = subprocess.run(
        [*base, "--sweep-seeds", "9"], cwd=tmp_path, env=environ, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "--sweep-seeds='9' is invalid" in bad.stderr
