"""Training-step throughput and memory of an MTA model against its baseline, in one process.

    python bench/train_step.py [--config configs/models/880M_mta.yaml] [--seq 2048] [--batch 8]
        [--steps 10] [--warmup 2] [--dtype bfloat16] [--attention-implementation auto] [--out bench/results]

Times the jitted step of the training loop (train/step.py: forward, backward, clipping, AdamW) for the
model of --config and for `cfg.baseline()` (the same model without any MTA part), alternating the two
step by step (ABBA order) so that a noisy shared machine slows both alike. Writes
<out>/train_step-<device kind slug>.json and prints a summary. Without --config, a CPU backend gets
configs/models/tiny_mta.yaml at seq 256 and any accelerator configs/models/880M_mta.yaml at seq 2048.

Memory: "memory_analysis" is the compiled step's own (temp = activations and workspace). The device
figures (GPU/TPU only) are process-wide, read after each model's first step: the baseline warms up
alone first, then the MTA model is added while the baseline's state stays allocated, so the MTA peak
includes the baseline's state (device_bytes_in_use_before_state says how much was already in use).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, with or without the package installed
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mta_jax.config import IMPLEMENTATIONS, ModelConfig, load_model_config  # noqa: E402
from mta_jax.model import count_params  # noqa: E402
from train import flops as flops_lib  # noqa: E402
from train.files import write_text_atomic  # noqa: E402
from train.mesh import MeshConfig, batch_sharding, make_mesh, replicated  # noqa: E402
from train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer  # noqa: E402
from train.state import abstract_model, init_state, state_shardings  # noqa: E402
from train.step import jit_steps, make_eval_step, make_train_step  # noqa: E402

CPU_DEFAULTS = ("configs/models/tiny_mta.yaml", 256)
ACCELERATOR_DEFAULTS = ("configs/models/880M_mta.yaml", 2048)
MEMORY_FIELDS = (
    "temp_size_in_bytes",
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
)
MODELS = ("mta", "baseline")


def device_slug(device_kind: str) -> str:
    """ "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/train_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="model YAML (default: by backend, see above)")
    parser.add_argument("--seq", type=int, help="sequence length (default: 256 on CPU, 2048 otherwise)")
    parser.add_argument("--batch", type=int, default=8, help="global batch size in rows")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model after compiling")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument(
        "--attention-implementation", choices=IMPLEMENTATIONS, help="override the config's (default: keep)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON")
    args = parser.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    if args.config is None:
        args.config = str(ROOT / (CPU_DEFAULTS if cpu else ACCELERATOR_DEFAULTS)[0])
    if args.seq is None:
        args.seq = (CPU_DEFAULTS if cpu else ACCELERATOR_DEFAULTS)[1]
    for name in ("seq", "batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} is invalid: must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup} is invalid: must be >= 0")
    if args.batch % jax.device_count():
        parser.error(f"--batch={args.batch} is invalid: must divide by the {jax.device_count()} devices")
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    overrides = {"dtype": args.dtype}
    if args.attention_implementation is not None:
        overrides["attention_implementation"] = args.attention_implementation
    try:
        args.model = load_model_config(args.config, **overrides)
    except (ValueError, TypeError, OSError) as error:  # yaml errors are ValueErrors
        parser.error(f"--config {args.config}: {error}")
    if args.model.mta is None:
        parser.error(f"--config {args.config}: the model has no mta section (it is its own baseline)")
    return args


def synthetic_batch(vocab_size: int, batch: int, seq: int, sharding) -> dict:
    """Random tokens (fixed seed), one document per row, every target weighted 1."""
    tokens = np.random.default_rng(0).integers(0, vocab_size, (batch, seq + 1), dtype=np.int32)
    rows = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((batch, seq), np.float32),
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)),
    }
    return {key: jax.device_put(np.ascontiguousarray(value), sharding) for key, value in rows.items()}


def _memory_stats() -> dict | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats


class Runner:
    """One model's compiled training step (the jitted step of the training loop) and its state."""

    def __init__(self, cfg: ModelConfig, mesh, batch: dict, total_steps: int):
        self.cfg = cfg
        opt = OptimizerConfig()
        tx = make_optimizer(opt, total_steps)
        _, shardings = state_shardings(cfg, tx, mesh)
        graphdef, _, rest = abstract_model(cfg)
        train, _ = jit_steps(
            make_train_step(graphdef, rest, tx, learning_rate_schedule(opt, total_steps), 1),
            make_eval_step(graphdef, rest),
            shardings,
            batch_sharding(mesh),
            replicated(mesh),
        )
        stats = _memory_stats()
        self.bytes_before = None if stats is None else stats.get("bytes_in_use")
        self.state = init_state(cfg, tx, 0, shardings)
        self.batch = batch
        start = time.perf_counter()
        self.compiled = train.lower(self.state, batch).compile()
        self.compile_seconds = time.perf_counter() - start
        analysis = self.compiled.memory_analysis()
        self.memory = {field: getattr(analysis, field, None) for field in MEMORY_FIELDS}
        self.times: list[float] = []
        self.metrics = None
        self.peak_bytes = None  # device peak after this model's first step

    def step(self) -> float:
        """One step, threading the donated state through; returns its wall time in seconds."""
        start = time.perf_counter()
        self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        seconds = time.perf_counter() - start
        if self.peak_bytes is None and (stats := _memory_stats()) is not None:
            self.peak_bytes = stats.get("peak_bytes_in_use")
        return seconds

    def result(self, tokens_per_step: int, seq: int, peak: float | None) -> dict:
        median = statistics.median(self.times)
        tokens_per_second = tokens_per_step / median
        flops_per_token = flops_lib.training_flops_per_token(self.cfg, seq)
        return {
            "params": count_params(self.cfg),
            "step_time_median_s": median,
            "step_times_s": self.times,
            "tokens_per_second": tokens_per_second,
            "flops_per_token": flops_per_token,
            "tflops_per_second": tokens_per_second * flops_per_token / 1e12,
            "mfu": flops_lib.mfu(tokens_per_second / jax.device_count(), flops_per_token, peak),
            "compile_seconds": self.compile_seconds,
            "memory_analysis": self.memory,
            "device_bytes_in_use_before_state": self.bytes_before,
            "device_peak_bytes_in_use": self.peak_bytes,
            "final_loss": float(self.metrics["loss"]),
        }


def _relative(path: str) -> str:
    """path relative to the repository root when it lies inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def _ratio(numerator, denominator) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark, writes its JSON, prints a summary and returns the JSON's content."""
    args = parse_args(argv)
    device = jax.devices()[0]
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1))  # the paper configs' layout; one device: no split
    batch = synthetic_batch(args.model.vocab_size, args.batch, args.seq, batch_sharding(mesh))
    total = args.warmup + args.steps
    # The baseline first: its device peak is then its own, and the MTA peak (larger) adds to it.
    runners = {"baseline": Runner(args.model.baseline(), mesh, batch, total)}
    for _ in range(args.warmup):
        runners["baseline"].step()
    runners["mta"] = Runner(args.model, mesh, batch, total)
    for _ in range(args.warmup):
        runners["mta"].step()
    for index in range(args.steps):
        order = MODELS if index % 2 == 0 else MODELS[::-1]
        for name in order:
            runners[name].times.append(runners[name].step())

    peak = flops_lib.peak_flops(device.device_kind)
    results = {name: runners[name].result(args.batch * args.seq, args.seq, peak) for name in MODELS}
    mta, base = results["mta"], results["baseline"]
    temp = "temp_size_in_bytes"
    report = {
        "device": device_slug(device.device_kind),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "config": _relative(args.config),
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": args.model.dtype,
        "param_dtype": args.model.param_dtype,
        "attention_implementation": args.model.attention_implementation,
        "peak_flops_per_device": peak,
        "results": results,
        "ratios": {
            "tokens_per_second": mta["tokens_per_second"] / base["tokens_per_second"],
            "temp_memory": _ratio(mta["memory_analysis"][temp], base["memory_analysis"][temp]),
        },
        "command": shlex.join(sys.orig_argv if argv is None else ["bench/train_step.py", *argv]),
        "timestamp_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_step-{report['device']}.json"
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    _print_summary(report, path)
    return report


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _print_summary(report: dict, path: Path) -> None:
    print(
        f"{report['device_kind']} x{report['num_devices']}  {report['config']}  seq {report['seq']}  "
        f"batch {report['batch']}  {report['dtype']}  attention {report['attention_implementation']}"
    )
    for name in MODELS:
        r = report["results"][name]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(
            f"  {name:8s} {r['params']:>13,d} params  {1e3 * r['step_time_median_s']:9.2f} ms/step  "
            f"{r['tokens_per_second']:11,.0f} tok/s  {r['tflops_per_second']:8.3f} TFLOP/s  MFU {mfu}  "
            f"temp {_mib(r['memory_analysis']['temp_size_in_bytes'])}"
        )
    ratios = report["ratios"]
    temp = "n/a" if ratios["temp_memory"] is None else f"{ratios['temp_memory']:.2f}x"
    print(f"  mta / baseline: throughput {ratios['tokens_per_second']:.3f}x, temp memory {temp}")
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
