"""The paper's models on TPU slices, by compilation: per-chip memory, fit and estimated throughput.

    python -m bench.pod_table [--models 300M 550M 880M 1B] [--topologies v5p-64 v6e-64] [--readme [README.md]]

For every model (baseline and MTA, configs/train/<model>_<variant>.yaml: the paper's batch of 262,144
tokens a step, 1B 524,288, at 2048 tokens) and topology, runs `python -m train.compile` unless its JSON
is already in bench/results/ (train_compile-<config>-<topology>.json; delete one to redo it, or
--stale to redo those compiled before the kernels' current cost estimates; its estimate is recomputed
with today's roofline), then prints the table and, with --readme, writes it between the README's
pod-table markers. Memory and FLOPs are the compiler's; step time, tokens/s and MFU are roofline
ESTIMATES (train/aot_step.step_estimate), not measurements. About 6-14 minutes a compile on 2 idle CPU
cores (30 with other work on them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.readme import replace_marked
from train.files import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("300M", "550M", "880M", "1B")
TOPOLOGIES = ("v5p-64", "v6e-64")
MARKERS = ("<!-- pod-table:start -->", "<!-- pod-table:end -->")
GiB = 2**30
# The goals: MTA's per-chip memory against the baseline's, and its estimated tokens/s.
MEMORY_GOAL, THROUGHPUT_GOAL = 1.3, 0.7
PAPER = (
    "Paper, Table 9 (the authors' unfused PyTorch code, 32 H200, measured): Transformer 17.5 GB and "
    "54.3k tokens/s, MTA 73.8 GB (4.2x) and 5.7k tokens/s (0.105x)."
)
STALE_NOTE = (
    "compiled before the kernels declared the HBM bytes their pipelines move (2026-12-06): their estimate "
    "counts each kernel operand once and is too optimistic; `python -m bench.pod_table --stale` "
    "recompiles them."
)


def result_path(model: str, variant: str, topology: str) -> Path:
    return ROOT / "bench" / "results" / f"train_compile-{model}_{variant}-{topology}.json"


def compile_point(model: str, variant: str, topology: str) -> None:
    """Runs train.compile for one point into result_path (exit 1, "does not fit", is a result too)."""
    config = f"configs/train/{model}_{variant}.yaml"
    out = result_path(model, variant, topology)
    command = [
        sys.executable,
        "-m",
        "train.compile",
        "--config",
        config,
        "--topology",
        topology,
        "--out",
        str(out),
    ]
    print("$ " + " ".join(command[1:]), flush=True)
    done = subprocess.run(command, cwd=ROOT, check=False)
    if done.returncode not in (0, 1) or not out.exists():
        raise SystemExit(f"train.compile failed for {config} on {topology} (exit {done.returncode})")


def _row(model: str, topology: str, base: dict, mta: dict) -> dict:
    base_e, mta_e = base.get("estimate", {}), mta.get("estimate", {})
    return {
        "model": model,
        "topology": topology,
        "chips": mta["chips"],
        "baseline_gib": base["train_peak_bytes"] / GiB,
        "mta_gib": mta["train_peak_bytes"] / GiB,
        "hbm_gib": mta["hbm_bytes"] / GiB,
        "fits": (base["fits"], mta["fits"]),
        "memory_ratio": mta["train_peak_bytes"] / base["train_peak_bytes"],
        "baseline_mfu": base_e.get("mfu"),
        "mta_mfu": mta_e.get("mfu"),
        "throughput_ratio": (
            mta_e["tokens_per_s_per_chip"] / base_e["tokens_per_s_per_chip"] if base_e and mta_e else None
        ),
        "flops_ratio": mta["flops_per_chip"]["compiled"] / base["flops_per_chip"]["compiled"],
        "mta_attention": {path: len(layers) for path, layers in mta["attention"].items()},
        "current_costs": not stale(base) and not stale(mta),
    }


def stale(report: dict) -> bool:
    """Compiled before the kernels declared their pipelines' HBM bytes (kernels/tpu_cost.py): its Mosaic
    kernels counted each operand once, so the estimate leaves their re-reads out (too optimistic)."""
    from kernels.tpu_cost import COST_MODEL

    return bool(report.get("mosaic_kernels_in_train_step")) and report.get("kernel_cost_model") != COST_MODEL


def rows(models=MODELS, topologies=TOPOLOGIES, load=None) -> list[dict]:
    """One row per (model, topology) whose two JSONs exist. load(model, variant, topology) -> dict | None."""
    load = load or _load
    out = []
    for topology in topologies:
        for model in models:
            base, mta = load(model, "baseline", topology), load(model, "mta", topology)
            if base is not None and mta is not None:
                out.append(_row(model, topology, base, mta))
    return out


def _load(model: str, variant: str, topology: str) -> dict | None:
    """A point's report with its estimate recomputed by today's train/aot_step.step_estimate (written
    back when it changed), so points compiled before a change of the roofline stay comparable."""
    path = result_path(model, variant, topology)
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    if "flops_per_chip" in report:
        from kernels.chips import get_pod
        from train.aot_step import step_estimate

        estimate = step_estimate(report, get_pod(topology).chip)
        if estimate != report.get("estimate"):
            report["estimate"] = estimate
            write_text_atomic(path, json.dumps(report, indent=1) + "\n")
    return report


def markdown(table: list[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    lines = [
        "Per chip, `python -m bench.pod_table` (`python -m train.compile` for each cell; paper batch, 2048 "
        "tokens, bf16, the configs' mesh: fsdp over every chip). Memory is the compiled train step's peak "
        "(arguments + outputs - donated + temp); MFU and tokens/s are ROOFLINE ESTIMATES, not measurements.",
        "",
        "| model | slice | baseline GiB | MTA GiB | MTA / baseline memory | baseline est. MFU | MTA est. MFU "
        "| MTA / baseline est. tokens/s | MTA / baseline FLOPs | MTA attention (layers) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in table:
        fit = ["" if f else " (does not fit)" for f in r["fits"]]
        paths = ", ".join(f"{name} {count}" for name, count in r["mta_attention"].items())
        ratio = "-" if r["throughput_ratio"] is None else f"{r['throughput_ratio']:.2f}"
        ratio += "" if r["current_costs"] else " *"
        lines.append(
            f"| {r['model']} | {r['topology']} ({r['chips']} chips, {r['hbm_gib']:.0f} GiB) "
            f"| {r['baseline_gib']:.1f}{fit[0]} | {r['mta_gib']:.1f}{fit[1]} | {r['memory_ratio']:.2f} "
            f"| {pct(r['baseline_mfu'])} | {pct(r['mta_mfu'])} | {ratio} | {r['flops_ratio']:.2f} | {paths} |"
        )
    if not all(r["current_costs"] for r in table):
        lines += ["", f"* {STALE_NOTE}"]
    lines += ["", PAPER, "", goals_line(table)]
    return "\n".join(lines)


def goals_line(table: list[dict]) -> str:
    marked = " (rows without *)" if any(not r["current_costs"] for r in table) else ""
    table = [r for r in table if r["current_costs"]]
    if not table:
        return "Goals: not judged yet (no row compiled with the kernels' current cost estimates)."
    worst_memory = max(r["memory_ratio"] for r in table)
    throughputs = [r["throughput_ratio"] for r in table if r["throughput_ratio"] is not None]
    worst_throughput = min(throughputs) if throughputs else None
    memory_ok = worst_memory <= MEMORY_GOAL
    line = (
        f"Goals: MTA / baseline memory at most {MEMORY_GOAL} (worst here {worst_memory:.2f}: "
        f"{'met' if memory_ok else 'NOT met'})"
    )
    if worst_throughput is not None:
        met = "met" if worst_throughput >= THROUGHPUT_GOAL else "NOT met"
        line += (
            f"; estimated tokens/s at least {THROUGHPUT_GOAL} of the baseline's "
            f"(worst {worst_throughput:.2f}: {met})"
        )
    return line + marked + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES))
    parser.add_argument("--readme", nargs="?", const=str(ROOT / "README.md"), help="write the table there")
    parser.add_argument("--no-compile", action="store_true", help="only tabulate the JSON already there")
    parser.add_argument("--stale", action="store_true", help="also recompile points with old kernel costs")
    args = parser.parse_args(argv)
    if not args.no_compile:
        for topology in args.topologies:
            for model in args.models:
                for variant in ("baseline", "mta"):
                    path = result_path(model, variant, topology)
                    if not path.exists() or (args.stale and stale(json.loads(path.read_text()))):
                        compile_point(model, variant, topology)
    text = markdown(rows(args.models, args.topologies))
    print(text)
    if args.readme:
        try:
            replace_marked(Path(args.readme), MARKERS, text)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        print(f"wrote the table into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
