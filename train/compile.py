"""Check a run on a TPU pod before renting it: compile its train and eval steps for the pod's chips here.

    python -m train.compile --config configs/train/880M_mta.yaml --topology v5p-64 [--slices 2] [key=value ...]

Compiles the steps `python -m train` runs (train/aot_step.py) for every chip of the topology (v4-N,
v5p-N: N TensorCores; v5e-N, v6e-N: N chips) and prints, per chip: parameter and optimizer bytes, temp
bytes and the step's peak against the chip's HBM, FLOPs per step (compiled and train/flops.py's), and
a roofline ESTIMATE of step time, tokens/s and MFU. Writes the same as JSON (--out). Exits 0 when it
fits, 1 when it does not (with the numbers and what to change), 2 for a bad config or topology.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from train.files import write_text_atomic

GiB = 2**30


def _layers(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


def summary(report: dict) -> str:
    """The report as the lines the CLI prints."""
    def gib(n: float) -> str:
        return f"{n / GiB:8.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:8.2f} MiB"

    mesh = " ".join(f"{axis}={size}" for axis, size in report["mesh"].items())
    lines = [
        f"{report['config']} on {report['topology']} x {report['num_slices']} slice(s): compiler topology "
        f"{report['compiler_topology']}, {report['chips']} chips ({report['device_kind']}), mesh {mesh}",
        f"batch {report['global_batch_size']} x {report['seq_len']} tokens in {report['microbatches']} "
        f"microbatch(es): {report['rows_per_chip_per_microbatch']:g} rows per chip per microbatch",
        "attention ("
        + ("auto" if report["attention_implementation"] == "auto" else "configured")
        + f" on {report['platform']}): "
        + "; ".join(f"{name} in layers {_layers(layers)}" for name, layers in report["attention"].items()),
        "per chip, from the compiled executable (compile-time numbers):",
        f"  parameters          {gib(report['params_bytes'])}",
        f"  optimizer state     {gib(report['opt_state_bytes'])}",
    ]
    if "train_memory" in report:
        m = report["train_memory"]
        lines += [
            f"  temp (train step)   {gib(m['temp'])}",
            f"  train step peak     {gib(m['peak'])} of {report['hbm_bytes'] / GiB:.2f} GiB HBM "
            f"(arguments {m['arguments'] / GiB:.2f} + outputs {m['outputs'] / GiB:.2f} - donated "
            f"{m['aliased'] / GiB:.2f} + temp + code {m['code'] / GiB:.2f})",
        ]
    if "eval_peak_bytes" in report:
        lines.append(f"  eval step peak      {gib(report['eval_peak_bytes'])} (with the optimizer state held)")
    if "flops_per_chip" in report:
        flops = report["flops_per_chip"]
        lines.append(
            f"  FLOPs per step      {flops['compiled']:.4g} compiled (cost analysis"
            + (f", microbatch loop x {report['microbatches']}" if report["microbatches"] > 1 else "")
            + f"), {flops['analytical_model']:.4g} model FLOPs (train/flops.py)"
        )
    if "estimate" in report:
        e = report["estimate"]
        mfu = "n/a" if e["mfu"] is None else f"{100 * e['mfu']:.1f}%"
        lines.append(
            f"ESTIMATE (roofline from the chip table's peaks; no communication, not a measurement): step "
            f"{e['step_time_s'] * 1e3:.1f} ms ({e['bound']}-bound: compute {e['compute_s'] * 1e3:.1f} ms, "
            f"HBM {e['hbm_s'] * 1e3:.1f} ms), {e['tokens_per_s_per_chip']:,.0f} tokens/s per chip, MFU {mfu}"
        )
    lines.append("fits" if report["fits"] else f"DOES NOT FIT: {report['advice']}")
    return "\n".join(lines)


def default_out(config: str, topology: str, slices: int) -> Path:
    suffix = f"-{slices}slices" if slices > 1 else ""
    return Path("bench/results") / f"train_compile-{Path(config).stem}-{topology}{suffix}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.compile", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a YAML file under configs/train/")
    parser.add_argument("--topology", required=True, help="v4-N, v5p-N (N TensorCores), v5e-N, v6e-N (N chips)")
    parser.add_argument("--slices", type=int, default=None, help="slices (default: the config's mesh.num_slices)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/train_compile-...json)")
    parser.add_argument("--hbm-gib", type=float, default=None, help="HBM per chip to fit in (default: the chip's)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value pairs that replace config values")
    args = parser.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"  # compile-only devices come from libtpu; nothing runs

    from train.config import load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides)
        from kernels.chips import get_pod

        pod = get_pod(args.topology)
        slices = cfg.mesh.num_slices if args.slices is None else args.slices
        if slices < 1:
            raise ValueError(f"--slices={slices} is invalid: must be >= 1")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from kernels.aot import CompilerUnavailable
    from train.aot_step import compile_run

    hbm = None if args.hbm_gib is None else int(args.hbm_gib * GiB)
    try:
        report = compile_run(cfg, pod, slices, hbm_bytes=hbm)
    except CompilerUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # a mesh or batch that does not fit the topology's chips
        hint = " (with --slices, the data axis spans the slices: set mesh.data to a multiple)" if slices > 1 else ""
        print(f"error: {error}{hint}", file=sys.stderr)
        return 2
    from kernels.tpu_cost import COST_MODEL

    report = {
        "config": args.config,
        "overrides": args.overrides,
        "compiled_on": datetime.date.today().isoformat(),
        "kernel_cost_model": COST_MODEL,
        "attention_implementation": cfg.model.attention_implementation,
        "platform": pod.chip.platform,
        **report,
        "note": "memory and FLOPs are the compiler's, per chip; the estimate is a roofline from the chip "
        "table's peak FLOP/s and HBM bandwidth (kernels/chips.py), without communication: not a measurement",
    }
    print(summary(report), flush=True)
    out = Path(args.out) if args.out else default_out(args.config, pod.name, slices)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
