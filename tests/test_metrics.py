"""MetricsLogger: metrics.jsonl, TensorBoard event files read back by hand, log lines, resume."""

import json
import logging
import math
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event

from train.metrics import MetricsLogger, format_metrics


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bitwise: slow but independent of tensorboardX."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path) -> list[Event]:
    """TFRecord framing: uint64 LE length, masked crc32c of it, payload, masked crc32c of payload."""
    data = path.read_bytes()
    events, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert header_crc == _masked_crc(header) and payload_crc == _masked_crc(payload)
        events.append(Event.FromString(payload))
        pos += 16 + length
    assert pos == len(data)
    return events


def event_files(run_dir):
    return sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def scalars(events) -> list[tuple[str, int, float]]:
    return [(v.tag, e.step, v.simple_value) for e in events for v in e.summary.value]


def read_jsonl(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_holds_every_call_with_floats_arrays_and_non_finite_as_strings(tmp_path, rng):
    loss = float(rng.uniform(1, 5))
    before = time.time()
    with MetricsLogger(tmp_path, total_steps=100, progress=False) as logger:
        logger.log(1, {"loss": loss, "grad_norm": np.float32(0.5), "lr": jnp.asarray(3e-4)})
        logger.log(2, {"loss": float("nan"), "grad_norm": np.inf, "x": -np.inf, "mfu": None})
        first = read_jsonl(tmp_path)  # readable before close: flushed each call
        logger.log(2, {"loss": 2.0 * loss}, split="eval")
    assert len(first) == 2
    records = read_jsonl(tmp_path)
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "eval")]
    assert all(before <= r["time"] <= time.time() for r in records)
    assert records[0]["loss"] == loss and records[0]["grad_norm"] == 0.5
    assert records[0]["lr"] == pytest.approx(3e-4, rel=1e-6)
    non_finite = {k: records[1][k] for k in ("loss", "grad_norm", "x")}
    assert non_finite == {"loss": "nan", "grad_norm": "inf", "x": "-inf"}
    assert "mfu" not in records[1]  # None: absent
    assert records[2]["loss"] == 2.0 * loss
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN tokens
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_tensorboard_scalars_read_back_from_the_event_file(tmp_path, rng):
    values = rng.uniform(0, 10, size=3).astype(np.float32)
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:
        logger.log(3, {"loss": float(values[0]), "tokens/s": float(values[1])})
        logger.log(7, {"loss": float(values[2])}, split="eval")
        logger.log(8, {"loss": float("nan")})
    (path,) = event_files(tmp_path)
    got = scalars(read_events(path))
    assert got[:3] == [
        ("train/loss", 3, values[0]),
        ("train/tokens/s", 3, values[1]),
        ("eval/loss", 7, values[2]),
    ]
    assert got[3][:2] == ("train/loss", 8) and math.isnan(got[3][2])


def test_plain_lines_have_the_documented_format(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="train")
    metrics = {
        "loss": 2.34123,
        "grad_norm": 0.8123,
        "lr": 1.2e-4,
        "tokens/s": 5123.0,
        "mfu": 0.3121,
        "step_time": 0.1534,
    }
    with MetricsLogger(tmp_path, total_steps=1000, progress=False) as logger:
        logger.log(120, metrics)
        logger.log(120, {"loss": 2.5}, split="eval")
    assert [r.name for r in caplog.records] == ["train", "train"]
    assert caplog.messages == [
        "step 120/1000 | loss 2.3412 | grad_norm 0.812 | lr 1.2e-04 | tokens/s 5.1k | mfu 31.2% "
        "| step_time 0.153s",
        "step 120/1000 | eval | loss 2.5000",
    ]


def test_format_of_large_rates_and_non_finite_values():
    text = format_metrics({"tokens/s": 2.5e6, "loss": float("nan"), "other": 123456.0})
    assert text == "tokens/s 2.5M | loss nan | other 1.235e+05"


def test_progress_bar_advances_to_the_step_and_shows_the_metrics(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=10, progress=True, start_step=2) as logger:
        logger.log(5, {"loss": 1.23456})
        logger.log(5, {"loss": 9.87654}, split="eval")
        assert logger._bar.n == 5
    err = capsys.readouterr().err
    assert "5/10" in err and "loss 1.2346" in err
    assert "step 5/10 | eval | loss 9.8765" in err


def test_disabled_logger_writes_and_prints_nothing_and_reads_no_value(tmp_path, capsys, caplog):
    class Unreadable:
        def __float__(self):
            raise AssertionError("a disabled logger read a value")

    caplog.set_level(logging.DEBUG)
    run_dir = tmp_path / "run"
    for progress in (True, False, None):
        with MetricsLogger(run_dir, total_steps=10, enabled=False, progress=progress) as logger:
            logger.log(1, {"loss": Unreadable()})
    assert not run_dir.exists()
    assert capsys.readouterr() == ("", "") and not caplog.records


def test_resume_appends_and_purges_later_tensorboard_steps(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": float(step)})
    with MetricsLogger(tmp_path, total_steps=10, progress=False, start_step=2) as logger:
        logger.log(3, {"loss": 30.0})
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (3, 30.0)]

    first, second = event_files(tmp_path)
    assert [s[1:] for s in scalars(read_events(first))] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    events = read_events(second)
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
    assert starts == [3]  # TensorBoard drops the first run's points at steps >= 3
    assert scalars(events) == [("train/loss", 3, 30.0)]

    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:  # a fresh run truncates
        logger.log(1, {"loss": 5.0})
    assert [r["loss"] for r in read_jsonl(tmp_path)] == [5.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"total_steps": 0}, "total_steps=0 is invalid"),
        ({"total_steps": 10, "start_step": -1}, "start_step=-1 is invalid"),
        ({"total_steps": 10, "start_step": 11}, "start_step=11 is invalid"),
        ({"total_steps": 10.0}, "total_steps=10.0 is invalid"),
    ],
)
def test_bad_constructor_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetricsLogger(tmp_path, progress=False, **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((-1, {"loss": 1.0}), {}, "step=-1 is invalid"),
        ((1.5, {"loss": 1.0}), {}, "step=1.5 is invalid"),
        ((1, {"step": 1.0}), {}, "metrics key='step' is invalid"),
        ((1, {"loss": "high"}), {}, "metrics\\['loss'\\]='high' is invalid"),
        ((1, {"loss": 1.0}), {"split": ""}, "split='' is invalid"),
    ],
)
def test_bad_log_arguments(tmp_path, args, kwargs, message):
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:
        with pytest.raises(ValueError, match=message):
            logger.log(*args, **kwargs)


def test_log_after_close_raises(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=10, progress=False)
    logger.close()
    logger.close()  # idempotent
    with pytest.raises(RuntimeError):
        logger.log(1, {"loss": 1.0})


def test_plain_lines_reach_stderr_when_logging_is_not_configured(tmp_path, capsys, monkeypatch):
    train_logger = logging.getLogger("train")
    monkeypatch.setattr(train_logger, "propagate", False)  # no handler anywhere, as in a bare script
    handlers_before = list(train_logger.handlers)
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:
        logger.log(4, {"loss": 1.5})
    assert capsys.readouterr().err.rstrip().endswith("step 4/10 | loss 1.5000")
    assert train_logger.handlers == handlers_before and train_logger.level == logging.NOTSET
