"""The paper's Table 1 at CPU scale: toy-task sequence error of the baseline transformer and MTA, and the
steps each seed needs to solve the task.

    python bench/toy_table.py [--config configs/train/toy_table.yaml] [--answers all first last]
        [--seeds 0 1 2 3 4] [--steps N] [--answer-steps all=6000] [--jobs N] [--out bench/results]
        [--runs-dir runs/toy_table] [key=value ...]

For every answer variant, seed and model (the config's MTA model, and `model.baseline()`: the same model
with no MTA part), trains with the project's training loop (train/loop.py). With the config's
stop_at_eval_error (e.g. 0.01) a run stops at the first evaluation (every eval_every steps) whose held-out
teacher-forced sequence error is at or below it: that step is the run's steps to solve; a run that never
gets there trains the whole budget ("not within N steps"): the config's steps (or --steps), or for the
answer variants named in --answer-steps their own (both models alike). Writes <out>/toy_table.json (every
run: steps to solve, the error where it stopped, its eval-error curve read from the run's metrics.jsonl,
wall time), <out>/toy_table.md (steps to solve per seed, and the error mean +- std over seeds in percent
beside the paper's Table 1) and <out>/toy_table.png (the eval-error curves: both models, every seed, one
panel per answer variant), and prints the table. Before training it prints the expected time. JSON is
rewritten after every run, so an interrupted table keeps what it measured; runs already in the JSON for the
same setting are not repeated. MTA runs go first, so a table stopped early has the model under test.

--jobs N trains N runs at once, each in its own process with a single-threaded XLA CPU backend (on the
2-core CPU, --jobs 2 does about 1.3x the steps a second of one multi-threaded run). SIGTERM or Ctrl-C
stops every run at its next step with a checkpoint; those runs are not recorded and resume next time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import multiprocessing
import os
import signal
import statistics
import sys
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from train import flops as flops_lib  # noqa: E402
from train.config import TrainConfig, load_train_config, to_dict  # noqa: E402
from train.files import write_text_atomic  # noqa: E402
from train.loop import train  # noqa: E402
from train.toy import ANSWERS  # noqa: E402

# Table 1 of the paper (spec section 6): error %, mean +- std over 3 seeds, N = 5, 100k steps.
PAPER = {
    "Transformer": {"all": "51.6 ± 43.1", "first": "78.2 ± 1.5", "last": "1.3 ± 0.4"},
    "MTA": {"all": "0.1 ± 0.1", "first": "0.0 ± 0.0", "last": "0.0 ± 0.0"},
}
MODELS = ("Transformer", "MTA")
# Seconds per training step of configs/train/toy_table.yaml on the 2-core CPU (evaluation included),
# measured on 2026-12-06: 0.062 s a step over 500 steps (an earlier, idler measurement gave 0.045; the
# figure varies with the machine's load). The expected time printed before a table scales it by the
# config's model FLOPs per step (train/flops.py) over this one's: 1.68 GFLOP (batch 32 of 32 tokens, the
# 4-layer dim-64 MTA model). Larger models use the CPU better, so this overestimates them
# (toy_paper.yaml: 17 s a step expected, 275x the FLOPs; on a busy CPU it took 21 s).
SECONDS_PER_STEP = 0.062
SECONDS_PER_STEP_FLOPS = 1.68e9
# Steps a second of two single-threaded runs at once over one multi-threaded run, on the 2-core CPU:
# 500 steps of toy_table.yaml took 0.062 s a step alone and 0.089-0.101 s a step each as a pair (measured).
PARALLEL_SPEEDUP = 1.3


def run_config(
    cfg: TrainConfig, model: str, answer: str, seed: int, runs_dir: Path, steps: int | None = None
) -> TrainConfig:
    """cfg for one cell of the table: the baseline or MTA model, the answer variant, the seed, and the
    budget (steps; default: the config's)."""
    model_cfg = cfg.model.baseline() if model == "Transformer" else cfg.model
    return dataclasses.replace(
        cfg,
        steps=steps or cfg.steps,
        model=model_cfg,
        data=dataclasses.replace(cfg.data, toy_answer=answer),
        seed=seed,
        run_dir=str(runs_dir / f"{model.lower()}-{answer}-seed{seed}"),
        progress=False,
    )


def cell(errors: list[float]) -> str:
    """'mean ± std' in percent (sample std, as the paper's 3-seed table); one value has no std."""
    mean = 100 * statistics.fmean(errors)
    if len(errors) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(errors):.1f}"


def eval_curve(run_dir: str | Path) -> list[list[float]]:
    """[[step, sequence_error], ...] of a run's evaluations, from its metrics.jsonl (the last line of a
    step wins, as after a resume)."""
    path = Path(run_dir) / "metrics.jsonl"
    curve: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("split") == "eval" and "sequence_error" in record:
                curve[int(record["step"])] = float(record["sequence_error"])
    return [[step, curve[step]] for step in sorted(curve)]


def steps_to_solve(curve: list[list[float]], target: float) -> int | None:
    """The first evaluated step whose error is <= target; None if none is."""
    return next((int(step) for step, error in curve if error <= target), None)


def budget(setting: dict, answer: str) -> int:
    """The steps a run of this answer variant may train: its --answer-steps, else the config's."""
    return setting.get("answer_steps", {}).get(answer, setting["steps"])


def parse_answer_steps(items: list[str]) -> dict[str, int]:
    """["all=6000", ...] -> {"all": 6000, ...}; a clear error for anything else."""
    steps = {}
    for item in items:
        answer, _, value = item.partition("=")
        if answer not in ANSWERS or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"--answer-steps {item!r} is invalid: expected ANSWER=STEPS with ANSWER one of {ANSWERS} "
                "and STEPS a positive integer, e.g. all=6000"
            )
        steps[answer] = int(value)
    return steps


def budgets_text(setting: dict, answers: list[str]) -> str:
    """ "4000" when every variant has the same budget, else e.g. "6000 ("all") / 4000 ("first", "last")"."""
    by_steps: dict[int, list[str]] = {}
    for answer in answers:
        by_steps.setdefault(budget(setting, answer), []).append(answer)
    if len(by_steps) == 1:
        return str(next(iter(by_steps)))
    parts = []
    for steps, names in by_steps.items():
        quoted = ", ".join(f'"{name}"' for name in names)
        parts.append(f"{steps} ({quoted})")
    return " / ".join(parts)


def solve_cell(runs: list[dict], budget: int) -> str:
    """'k/n solved: s0, s1, ...' with each seed's steps to solve, or '>budget' for a seed that did not."""
    runs = sorted(runs, key=lambda r: r["seed"])
    solved = [r for r in runs if r["steps_to_solve"] is not None]
    steps = ", ".join(
        str(r["steps_to_solve"]) if r["steps_to_solve"] is not None else f">{budget}" for r in runs
    )
    return f"{len(solved)}/{len(runs)}: {steps}"


def render(report: dict) -> str:
    """The markdown tables: steps to solve per seed, and the error % per answer variant beside the paper's
    Table 1."""
    answers = report["answers"]
    setting = report["setting"]
    target = setting.get("target")
    lines = []
    if target is not None:
        lines += [
            f"Steps to reach {100 * target:g}% sequence error (evaluated every {setting['eval_every']} "
            "steps; "
            "seeds solved / run, then each seed's steps in seed order, >N: not within the budget of N):",
            "",
            "| Model | " + " | ".join(answers) + " |",
            "|" + "---|" * (1 + len(answers)),
        ]
        for model in MODELS:
            row = []
            for answer in answers:
                runs = [r for r in report["runs"] if r["model"] == model and r["answer"] == answer]
                row.append(solve_cell(runs, budget(setting, answer)) if runs else "-")
            lines.append(f"| {model} | " + " | ".join(row) + " |")
        lines += ["", "Sequence error (%) where each run stopped (solved, or at the budget):", ""]
    header = "| Model | " + " | ".join(f"{a} (ours)" for a in answers) + " | "
    header += " | ".join(f"{a} (paper)" for a in answers) + " |"
    lines += [header, "|" + "---|" * (1 + 2 * len(answers))]
    for model in MODELS:
        ours = []
        for answer in answers:
            errors = [
                r["sequence_error"] for r in report["runs"] if r["model"] == model and r["answer"] == answer
            ]
            ours.append(cell(errors) if errors else "-")
        paper = [PAPER[model][a] for a in answers]
        lines.append(f"| {model} | " + " | ".join(ours) + " | " + " | ".join(paper) + " |")
    seeds = ", ".join(str(s) for s in report["seeds"])
    lines += [
        "",
        f"Ours: teacher-forced sequence error (%) on {setting['eval_samples']} held-out samples, mean ± std "
        f"over seeds {seeds}; N = {setting['block_size']}, L = {setting['query_len']}, "
        f"{setting['seq_len']} tokens, at most {budgets_text(setting, answers)} steps of {setting['batch']} "
        f"(`{report['command']}`, {report['device']}). Paper: Table 1, N = 5, 100k steps.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """toy_table.png: held-out sequence error against steps, both models, every seed, a panel per answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    answers = report["answers"]
    fig, axes = plt.subplots(1, len(answers), figsize=(4.2 * len(answers), 3.6), sharey=True, squeeze=False)
    colors = {"Transformer": "tab:gray", "MTA": "tab:blue"}
    target = report["setting"].get("target")
    for ax, answer in zip(axes[0], answers, strict=True):
        for model in MODELS:
            runs = sorted(
                (r for r in report["runs"] if r["model"] == model and r["answer"] == answer),
                key=lambda r: r["seed"],
            )
            for i, run in enumerate(runs):
                curve = run.get("curve") or []
                if not curve:
                    continue
                steps, errors = zip(*curve, strict=True)
                label = model if i == 0 else None
                ax.plot(steps, [100 * e for e in errors], color=colors[model], alpha=0.8, lw=1.2, label=label)
                ax.annotate(str(run["seed"]), (steps[-1], 100 * errors[-1]), fontsize=7, color=colors[model])
        if target is not None:
            ax.axhline(100 * target, color="tab:red", ls=":", lw=1, label=f"{100 * target:g}%")
        ax.set_title(f'answer "{answer}"')
        ax.set_xlabel("training steps")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out sequence error (%)")
    axes[0][0].legend(fontsize=8)
    setting = report["setting"]
    fig.suptitle(
        f"Toy task, N = {setting['block_size']}, {setting['seq_len']} tokens, batch {setting['batch']} "
        f"(numbers: seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expected_seconds(cfg: TrainConfig, runs: int, jobs: int = 1) -> float:
    """An upper bound on the table's time: every run the whole budget (solved runs stop earlier); with
    jobs > 1 on the 2-core CPU, the measured PARALLEL_SPEEDUP."""
    tokens = cfg.global_batch_size * cfg.data.seq_len
    flops = tokens * flops_lib.training_flops_per_token(cfg.model, cfg.data.seq_len)
    per_step = SECONDS_PER_STEP * flops / SECONDS_PER_STEP_FLOPS
    return runs * cfg.steps * per_step / (PARALLEL_SPEEDUP if jobs > 1 else 1.0)


_STOP = None  # in a --jobs worker: the table's stop event (set on SIGTERM / Ctrl-C)


def _train_one(run_cfg: TrainConfig) -> dict | None:
    """Trains one cell; its record, or None when SIGTERM / Ctrl-C stopped it (saved, resumable) or the
    table was stopped before it began."""
    if _STOP is not None and _STOP.is_set():
        return None
    start = time.perf_counter()
    result = train(run_cfg)
    if result.preempted:
        return None
    return run_record(run_cfg, result, _model_name(run_cfg), time.perf_counter() - start)


def _model_name(run_cfg: TrainConfig) -> str:
    return "MTA" if run_cfg.model.mta is not None else "Transformer"


def _worker_init(stop_event) -> None:
    """A --jobs worker: one XLA CPU thread (the runs share the cores), the table's stop event, and Ctrl-C
    left to train()'s handler, which is only installed while a run trains (between runs the worker must
    not die of it)."""
    global _STOP
    _STOP = stop_event
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_cells(cells: list[TrainConfig], jobs: int):
    """Yields (run_cfg, record or None) for every cell as it finishes: in this process for jobs == 1,
    else in `jobs` worker processes. After SIGTERM or Ctrl-C no new run starts; SIGTERM is passed on to
    the workers (Ctrl-C reaches them from the terminal)."""
    if jobs == 1:
        for run_cfg in cells:
            record = _train_one(run_cfg)
            yield run_cfg, record
            if record is None:
                return
        return
    context = multiprocessing.get_context("spawn")  # a fresh JAX in every worker
    stopping = context.Event()  # queued runs a worker already took must not start either

    def stop(signum, frame):
        stopping.set()
        if signum == signal.SIGTERM:
            for child in multiprocessing.active_children():
                child.terminate()  # SIGTERM: the run saves and stops at its next step

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with futures.ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_worker_init, initargs=(stopping,)
        ) as pool:
            pending = {pool.submit(_train_one, c): c for c in cells}
            while pending:
                done, _ = futures.wait(pending, timeout=1.0, return_when=futures.FIRST_COMPLETED)
                if stopping.is_set():
                    for future in pending:
                        future.cancel()  # not started: nothing to save
                for future in done:
                    yield pending.pop(future), future.result()
                pending = {f: c for f, c in pending.items() if not f.cancelled()}
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _device_name() -> str:
    device = jax.devices()[0]
    return "cpu" if device.platform == "cpu" else device.device_kind


def _load(path: Path, key: dict) -> list[dict]:
    """Runs of an earlier JSON measured with the same setting (so they can be kept)."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    return old["runs"] if old.get("setting") == key else []


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/train/toy_table.yaml"))
    parser.add_argument(
        "--answers", nargs="+", default=["all", "first", "last"], choices=["all", "first", "last"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, help="override the config's steps")
    parser.add_argument(
        "--answer-steps",
        nargs="+",
        default=[],
        metavar="ANSWER=STEPS",
        help="the budget of these answer variants (both models), e.g. all=6000; the others keep the steps",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides as for python -m train, e.g. global_batch_size=64"
    )
    parser.add_argument("--out", default=str(ROOT / "bench/results"))
    parser.add_argument("--runs-dir", default=str(ROOT / "runs/toy_table"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps else [])
    cfg = load_train_config(args.config, overrides)
    answer_steps = parse_answer_steps(args.answer_steps)
    if cfg.data.kind != "toy" or cfg.model.mta is None:
        raise ValueError(f"config={args.config!r} is invalid: needs data.kind toy and a model with MTA")
    setting = {
        "config": to_dict(cfg),
        "block_size": cfg.data.toy_block_size,
        "query_len": cfg.data.toy_query_len,
        "seq_len": cfg.data.seq_len,
        "steps": cfg.steps,
        "eval_every": cfg.eval_every,
        "target": cfg.stop_at_eval_error,
        "batch": cfg.global_batch_size,
        "eval_samples": cfg.eval_batches * cfg.global_batch_size,
    }
    if answer_steps:
        setting["answer_steps"] = answer_steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out / "toy_table.json", out / "toy_table.md", out / "toy_table.png"
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "command": f"python bench/toy_table.py {argv_text}".strip(),
        "device": _device_name(),
        "date": datetime.date.today().isoformat(),
        "setting": setting,
        "answers": args.answers,
        "seeds": args.seeds,
        "runs": _load(json_path, setting),
    }
    done = {(r["model"], r["answer"], r["seed"]) for r in report["runs"]}
    todo = [
        (answer, seed, model)
        for model in reversed(MODELS)  # MTA first
        if model in args.models
        for answer in args.answers
        for seed in args.seeds
        if (model, answer, seed) not in done
    ]
    if args.jobs < 1:
        raise ValueError(f"jobs={args.jobs} is invalid: needs at least 1")
    cells = [
        run_config(cfg, model, answer, seed, Path(args.runs_dir), budget(setting, answer))
        for answer, seed, model in todo
    ]
    bound = sum(expected_seconds(c, 1, args.jobs) for c in cells)
    print(
        f"{len(todo)} run(s) to train, at most {budgets_text(setting, args.answers)} steps each, "
        f"{args.jobs} at a time: at most "
        f"{bound / 60:.0f} minutes on an idle 2-core CPU (runs that reach the target stop earlier; a busy "
        "CPU is slower)",
        flush=True,
    )
    for run_cfg, record in train_cells(cells, args.jobs):
        if record is None:  # SIGTERM or Ctrl-C: not a finished run; it resumes from its checkpoint
            name, answer = _model_name(run_cfg), run_cfg.data.toy_answer
            print(f"{name} answer={answer} seed={run_cfg.seed}: stopped, not recorded")
            continue
        report["runs"].append(record)
        solved = f"solved at step {record['steps_to_solve']}" if record["steps_to_solve"] else "not solved"
        print(
            f"{record['model']:11s} answer={record['answer']:5s} seed={record['seed']}: {solved}, "
            f"error {100 * record['sequence_error']:.1f}% at step {record['final_step']}, "
            f"{record['seconds']:.0f} s",
            flush=True,
        )
        write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
    write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
    write_text_atomic(md_path, render(report))
    plot(report, png_path)
    print(render(report))
    return report


def run_record(run_cfg: TrainConfig, result, model: str, seconds: float) -> dict:
    """One run of the table: where it stopped, its steps to solve, its eval-error curve."""
    metrics = result.eval_metrics or {}
    curve = eval_curve(run_cfg.run_dir)
    target = run_cfg.stop_at_eval_error
    return {
        "model": model,
        "answer": run_cfg.data.toy_answer,
        "seed": run_cfg.seed,
        "steps_to_solve": result.stopped_at if target is not None else None,
        "final_step": result.step,
        "sequence_error": metrics.get("sequence_error"),
        "eval_loss": result.eval_loss,
        "seconds": round(seconds, 1),
        "run_dir": run_cfg.run_dir,
        "curve": curve,
    }


if __name__ == "__main__":
    main()
