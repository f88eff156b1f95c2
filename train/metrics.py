"""Run metrics: JSON lines, TensorBoard scalars, and a progress bar or plain log lines.

Files under run_dir:
- metrics.jsonl: one JSON object per log() call, {"step", "split", "time" (unix seconds), **metrics};
  strict JSON: non-finite values are written as the strings "nan", "inf" and "-inf".
- tensorboard/: tensorboardX event files with scalars f"{split}/{name}".

Steps count completed optimizer steps (step s is logged after s updates). On resume (start_step > 0)
metrics.jsonl is appended to, so it may hold a step twice: the last line for a (split, step) wins.
TensorBoard gets purge_step = start_step + 1, which hides the earlier run's points after start_step.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from tensorboardX import SummaryWriter
from tqdm import tqdm

LOGGER_NAME = "train"
RESERVED_KEYS = ("step", "split", "time")


def _json_value(value: float) -> float | str:
    """Finite floats as they are; non-finite ones as "nan", "inf" or "-inf" (strict JSON)."""
    return value if math.isfinite(value) else str(value)


def _si(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.1f}"


def format_value(name: str, value: float) -> str:
    """How one metric reads in the log line: loss 2.3412, lr 1.2e-04, tokens/s 5.1k, mfu 31.2%."""
    if not math.isfinite(value):
        return str(value)
    if name == "mfu":  # a fraction
        return f"{100 * value:.1f}%"
    if name in ("lr", "learning_rate"):
        return f"{value:.1e}"
    if name.endswith("/s"):
        return _si(value)
    if name.endswith("_time"):
        return f"{value:.3f}s"
    if "loss" in name:
        return f"{value:.4f}"
    if "norm" in name:
        return f"{value:.3f}"
    return f"{value:.4g}"


def format_metrics(metrics: Mapping[str, float]) -> str:
    """'loss 2.3412 | grad_norm 0.812 | ...' in the mapping's order."""
    return " | ".join(f"{name} {format_value(name, value)}" for name, value in metrics.items())


class MetricsLogger:
    """Writes metrics to run_dir/metrics.jsonl and run_dir/tensorboard, and shows progress.

    total_steps: the step count of the whole run (the bar's total, "step 120/1000").
    enabled: False on non-primary processes: nothing is written or printed, values are not read.
    progress: True for a tqdm bar on stderr, False for plain lines on the logging logger "train",
        None for a bar when stderr is a terminal. Plain lines use the logging configuration in
        place; when "train" has no handler anywhere, a stderr handler at INFO is added until close().
    start_step: the completed steps when resuming; > 0 appends to metrics.jsonl.
    Use as a context manager or call close().
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        total_steps: int,
        enabled: bool = True,
        progress: bool | None = None,
        start_step: int = 0,
    ):
        total_steps = _check_int("total_steps", total_steps, 1)
        start_step = _check_int("start_step", start_step, 0)
        if start_step > total_steps:
            raise ValueError(f"start_step={start_step!r} is invalid: must be <= total_steps={total_steps}")
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.enabled = enabled
        self._closed = False
        self._file = self._writer = self._bar = self._handler = None
        self._logger = logging.getLogger(LOGGER_NAME)
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a" if start_step > 0 else "w", encoding="utf-8")
        self._writer = SummaryWriter(
            logdir=str(self.run_dir / "tensorboard"),
            purge_step=start_step + 1 if start_step > 0 else None,
            # tensorboardX names files by the second; this keeps two writers in one second apart.
            filename_suffix=f".{time.time_ns()}.{os.getpid()}",
        )
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, dynamic_ncols=True)
        elif not self._logger.hasHandlers():
            self._handler = logging.StreamHandler(sys.stderr)
            self._handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            self._logger.addHandler(self._handler)
            self._old_level = self._logger.level
            if self._logger.getEffectiveLevel() > logging.INFO:
                self._logger.setLevel(logging.INFO)

    def log(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> None:
        """Records metrics (floats or 0-d numpy/jax arrays; None values are skipped) at step.

        split "train" advances the bar to step and shows the metrics as its postfix; other splits
        ("eval", ...) print a line above the bar. In plain mode every call logs one line
        "step 120/1000 | loss 2.3412 | ..." ("step 120/1000 | eval | loss ..." for other splits).
        """
        if self._closed:
            raise RuntimeError("MetricsLogger.log() after close()")
        step = _check_int("step", step, 0)
        if not isinstance(split, str) or not split or split != split.strip():
            raise ValueError(f"split={split!r} is invalid: must be a non-empty string without edge spaces")
        if not isinstance(metrics, Mapping):
            raise ValueError(f"metrics={metrics!r} is invalid: must be a mapping of names to numbers")
        for name in metrics:
            if not isinstance(name, str) or not name or name in RESERVED_KEYS:
                rule = f"must be a non-empty string, not one of {RESERVED_KEYS}"
                raise ValueError(f"metrics key={name!r} is invalid: {rule}")
        if not self.enabled:
            return
        values = {name: _to_float(name, value) for name, value in metrics.items() if value is not None}
        now = time.time()

        record = {"step": step, "split": split, "time": now}
        record.update({name: _json_value(value) for name, value in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

        for name, value in values.items():
            self._writer.add_scalar(f"{split}/{name}", value, global_step=step, walltime=now)
        self._writer.flush()

        text = format_metrics(values)
        prefix = f"step {step}/{self.total_steps}" + ("" if split == "train" else f" | {split}")
        if self._bar is None:
            self._logger.info(f"{prefix} | {text}" if text else prefix)
        elif split == "train":
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(text)
        else:
            self._bar.write(f"{prefix} | {text}" if text else prefix, file=sys.stderr)

    def close(self) -> None:
        """Flushes and closes the files and the bar; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._logger.setLevel(self._old_level)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _check_int(field: str, value: Any, minimum: int) -> int:
    try:
        number = operator.index(value)  # int, numpy int; not float
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < minimum:
        raise ValueError(f"{field}={value!r} is invalid: must be an integer >= {minimum}")
    return number


def _to_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metrics[{name!r}]={value!r} is invalid: must be a number or 0-d array") from error
