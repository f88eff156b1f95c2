"""One training run: set up the mesh, state, data and checkpoints, resume if possible, train, evaluate.

    result = train(cfg)   # cfg: train.config.TrainConfig

Resumes from the newest readable checkpoint in cfg.run_dir/checkpoints (model, optimizer, step, RNG
and data position together), so a killed run started again continues exactly. SIGTERM (preemption)
and SIGINT (Ctrl-C; a second one stops at once) save a checkpoint at the next step boundary and return
cleanly. A NaN or inf loss or gradient norm stops the run with NonFiniteLossError, before that state is
saved: the last checkpoint stays good.

With cfg.stop_at_eval_error set, the run stops at the first evaluation whose held-out sequence error is
<= that target: it saves that step's checkpoint, writes run_dir/stopped.json ({"step", "sequence_error",
"target"}) and returns with RunResult.stopped_at = the step. Started again, such a run does not train on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from train import data as data_lib
from train import flops as flops_lib
from train.checkpoint import Checkpointer
from train.config import TrainConfig, check_resumable, dump
from train.distributed import initialize
from train.files import write_text_atomic
from train.mesh import batch_sharding, make_mesh, sharding_context
from train.metrics import MetricsLogger
from train.params_io import check_params, load_params
from train.state import init_state
from train.step import BATCH_KEYS, build_steps

log = logging.getLogger("train")
STOPPED_FILE = "stopped.json"  # written when a run stops at cfg.stop_at_eval_error


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN or inf."""


@dataclasses.dataclass
class RunResult:
    step: int  # the last step completed
    losses: dict[int, float]  # train loss of every step this process ran
    eval_loss: float | None
    preempted: bool
    eval_metrics: dict[str, float] | None = None  # the last evaluation: loss, accuracy, sequence_error (toy)
    stopped_at: int | None = None  # the step whose evaluation reached cfg.stop_at_eval_error, if one did


class _Preemption:
    """SIGTERM or SIGINT (Ctrl-C) sets a flag; the loop saves and stops at the next step boundary. A
    second SIGINT raises KeyboardInterrupt at once. With several processes, JAX's preemption sync point
    makes them all stop at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        try:
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"a second {name}: stopping without saving")
        hint = " (Ctrl-C again to stop at once, without saving)" if signum == signal.SIGINT else ""
        log.warning("%s received: saving a checkpoint at the end of this step%s", name, hint)
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(step) or self.requested
            except RuntimeError:  # the preemption service is not running
                pass
        return self.requested

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def _global_batch(local: dict, sharding) -> dict:
    """Per-process numpy rows -> global jax.Arrays split over the mesh's batch axes."""
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(local[key])) for key in BATCH_KEYS
    }


def check_batch_layout(cfg: TrainConfig, mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = cfg.global_batch_size // cfg.microbatches
    if rows % shards:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} is invalid: each of the {cfg.microbatches} "
            f"microbatch(es) has {rows} rows, which must divide by data x fsdp = {shards}"
        )
    if cfg.global_batch_size % jax.process_count():
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} is invalid: must divide by the "
            f"{jax.process_count()} processes"
        )


def _evaluate(evaluate, params, batches, sharding, *, toy: bool) -> dict[str, float]:
    """Held-out loss (nats per target token), bits per token, token accuracy; for the toy task also
    the teacher-forced sequence error (the paper's Table 1 metric)."""
    sums: dict[str, float] = {}
    for batch in batches:
        for name, value in jax.device_get(evaluate(params, _global_batch(batch, sharding))).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    loss = sums["loss"] / max(sums["weight"], 1.0)
    values = {
        "loss": loss,
        "bits_per_token": loss / math.log(2),
        "accuracy": sums["correct"] / max(sums["weight"], 1.0),
    }
    if toy:
        values["sequence_error"] = sums["wrong_rows"] / max(sums["rows"], 1.0)
    return values


def train(cfg: TrainConfig) -> RunResult:
    run_dir = Path(cfg.run_dir)
    check_resumable(cfg, run_dir)  # before anything is written: a refused run leaves run_dir as it was
    initialize(cfg.distributed)
    primary = jax.process_index() == 0
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", dump(cfg))

    vocab = data_lib.vocab_size(cfg.data)
    if cfg.model.vocab_size < vocab:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is invalid: the data ({cfg.data.kind}, "
            f"tokenizer {cfg.data.tokenizer!r}) emits {vocab} token ids"
        )
    mesh = make_mesh(cfg.mesh)
    check_batch_layout(cfg, mesh)
    log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)

    steps = build_steps(cfg, mesh)
    tx, abstract_state, shardings = steps.tx, steps.abstract_state, steps.shardings
    train_step, evaluate = steps.train, steps.evaluate

    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = data_lib.train_iterator(cfg.data, cfg.global_batch_size, seed=cfg.seed, **process)
    eval_data = data_lib.eval_batches(
        cfg.data, cfg.global_batch_size, cfg.eval_batches, seed=cfg.seed, **process
    )

    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    restored = checkpointer.restore_latest(abstract_state, data_iter)
    if restored is None and cfg.init_from:
        start, state = 0, init_state(cfg.model, tx, cfg.seed, shardings, _initial_params(cfg))
        log.info("starting from the parameters in %s with a fresh optimizer", cfg.init_from)
    elif restored is None:
        start, state = 0, init_state(cfg.model, tx, cfg.seed, shardings)
        log.info("starting from scratch (seed %d)", cfg.seed)
    else:
        start, state = restored
        log.info("resumed from the checkpoint of step %d", start)

    tokens_per_step = cfg.global_batch_size * cfg.data.seq_len
    flops_per_token = flops_lib.training_flops_per_token(cfg.model, cfg.data.seq_len)
    peak = flops_lib.peak_flops(jax.devices()[0].device_kind)
    losses: dict[int, float] = {}
    eval_loss, eval_values = None, None
    step = start
    preempted = False
    stopped_at = None
    stop_path = run_dir / STOPPED_FILE
    if cfg.stop_at_eval_error is not None and stop_path.is_file():
        stopped = json.loads(stop_path.read_text())
        if stopped["step"] == start and stopped["sequence_error"] <= cfg.stop_at_eval_error:
            log.info("the run reached its target error at step %d: not training on", start)
            eval_values = stopped.get("eval")
            eval_loss = eval_values["loss"] if eval_values else None
            return RunResult(start, {}, eval_loss, False, eval_values, stopped_at=start)
    logger = MetricsLogger(
        run_dir,
        total_steps=cfg.steps,
        enabled=primary,
        progress=cfg.progress,
        start_step=min(start, cfg.steps),
    )
    with logger, checkpointer, _Preemption() as preemption, sharding_context(mesh):
        pending = None  # (step, metrics) of the step in flight: read one step late, so as not to stall
        window_start, window_steps = time.perf_counter(), 0
        while step < cfg.steps:
            batch = _global_batch(next(data_iter), batch_sharding(mesh))
            state, metrics = train_step(state, batch)
            step += 1
            window_steps += 1
            if pending is not None:
                _record(pending, losses)
            pending = (step, metrics)
            must_log = step % cfg.log_every == 0 or step == cfg.steps
            must_eval = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
            must_stop = preemption.reached(step)
            if must_log or must_eval or must_stop or step % cfg.checkpoint.every == 0:
                values = _record(pending, losses)  # the state about to be saved is checked first
                pending = None
                if must_log:
                    elapsed = time.perf_counter() - window_start
                    values.update(_throughput(window_steps, elapsed, tokens_per_step, flops_per_token, peak))
                    logger.log(step, values)
                if must_eval:
                    toy = cfg.data.kind in data_lib.SYNTHETIC_KINDS
                    eval_values = _evaluate(
                        evaluate, state["params"], eval_data, batch_sharding(mesh), toy=toy
                    )
                    eval_loss = eval_values["loss"]
                    logger.log(step, eval_values, split="eval")
                    target = cfg.stop_at_eval_error
                    if target is not None and eval_values["sequence_error"] <= target:
                        stopped_at = step
            solved = stopped_at is not None
            checkpointer.save(step, state, data_iter, force=must_stop or solved or step == cfg.steps)
            if solved:
                log.info(
                    "step %d: sequence error %.4f <= stop_at_eval_error=%s; stopping",
                    step,
                    eval_values["sequence_error"],
                    cfg.stop_at_eval_error,
                )
                if primary:
                    record = {
                        "step": step,
                        "sequence_error": eval_values["sequence_error"],
                        "target": cfg.stop_at_eval_error,
                        "eval": eval_values,
                    }
                    write_text_atomic(stop_path, json.dumps(record) + "\n")
                break
            if must_stop:
                log.warning("preempted: saved step %d and stopping", step)
                preempted = True
                break
            if must_log or must_eval or step == start + 1:  # time only steps: not compiling, not eval
                jax.block_until_ready(state["step"])
                window_start, window_steps = time.perf_counter(), 0
        if pending is not None:
            _record(pending, losses)
    return RunResult(step, losses, eval_loss, preempted, eval_values, stopped_at)


def _initial_params(cfg: TrainConfig):
    """The parameters of cfg.init_from, checked against cfg.model (parameter shapes must agree)."""
    _, params = load_params(cfg.init_from)
    try:
        check_params(cfg.model, params)
    except ValueError as error:
        raise ValueError(f"init_from={cfg.init_from!r} is invalid: {error}") from None
    return params


def _record(pending, losses: dict[int, float]) -> dict[str, float]:
    step, metrics = pending
    values = {name: float(value) for name, value in jax.device_get(metrics).items()}
    losses[step] = values["loss"]
    if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
        raise NonFiniteLossError(
            f"step {step}: loss={values['loss']} grad_norm={values['grad_norm']}; stopping. "
            "The last checkpoint saved before this step is intact."
        )
    return values


def _throughput(steps: int, seconds: float, tokens_per_step: int, flops_per_token: float, peak) -> dict:
    step_time = seconds / max(steps, 1)
    tokens_per_second = tokens_per_step / step_time
    return {
        "tokens/s": tokens_per_second,
        "flop/s": tokens_per_second * flops_per_token,  # model FLOPs (train/flops.py), all devices
        "mfu": flops_lib.mfu(tokens_per_second / jax.device_count(), flops_per_token, peak),  # None on CPU
        "step_time": step_time,
    }
