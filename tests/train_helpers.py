"""A tiny training config (every MTA part on, the toy task) and ways to run the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model": {
        "vocab_size": 31,
        "dim": 32,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "kq_conv_layers": [1],
        "mta": {
            "pre_conv": [2, 3],
            "post_conv": [2, 3],
            "pre_head_mix": 2,
            "post_head_mix": 2,
            "group_norm": True,
            "gate": "scalar",
            "dropout_rate": 0.1,  # so that resuming must restore the dropout keys too
        },
    },
    "data": {"kind": "toy", "seq_len": 40, "toy_block_size": 3},
    # Constant after warm-up: `steps` then leaves the compiled step unchanged, so runs of any length
    # share the session's compilation cache (tests/train_helpers.compile_cache_env).
    "optimizer": {"learning_rate": 3e-3, "warmup_steps": 2, "decay": "constant"},
    "checkpoint": {"every": 2, "keep": 3, "async_save": True},
    "steps": 6,
    "global_batch_size": 8,
    "log_every": 1,
    "eval_batches": 1,
    "progress": False,
}


def write_config(directory: Path, **overrides) -> Path:
    """TINY with top-level keys replaced, as <directory>/config.yaml; run_dir is <directory>/run."""
    cfg = {**TINY, "run_dir": str(directory / "run"), **overrides}
    path = directory / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env(devices: int = 1, **extra: str) -> dict:
    keep = ("JAX_SKIP_CUDA_CONSTRAINTS_CHECK",)  # set by conftest.py for the `compile` extra's plugin
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k in keep}
    # tests/conftest.py's fast-compile flag too, then the fake device count.
    env["XLA_FLAGS"] = f"--xla_backend_optimization_level=0 --xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def compile_cache_env() -> dict[str, str]:
    """The test session's persistent XLA compilation cache (tests/conftest.py), if there is one. Its
    file lock (on when a maximum size is set) keeps concurrent processes from reading half-written
    entries."""
    cache = os.environ.get("MTA_TEST_XLA_CACHE")
    if cache is None:
        return {}
    return {
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 * 2**30),
    }


def cli(config: Path, *overrides: str, devices: int = 1, **popen) -> subprocess.Popen:
    """`python -m train --config config overrides...` started in a subprocess, sharing the session's
    compilation cache."""
    return subprocess.Popen(
        [sys.executable, "-m", "train", "--config", str(config), *overrides],
        cwd=ROOT,
        env=cli_env(devices, **compile_cache_env(), **popen.pop("env", {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def run_cli(config: Path, *overrides: str, devices: int = 1, timeout: float = 300) -> tuple[int, str]:
    proc = cli(config, *overrides, devices=devices)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss from metrics.jsonl; a step logged twice (after a resume) keeps its last line."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            losses[record["step"]] = record["loss"]
    return losses
