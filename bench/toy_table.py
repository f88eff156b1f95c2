"""The paper's Table 1 at CPU scale: toy-task sequence error of the baseline transformer and MTA, 3 seeds.

    python bench/toy_table.py [--config configs/train/toy_table.yaml] [--answers all first last]
        [--seeds 0 1 2] [--steps N] [--out bench/results] [--runs-dir runs/toy_table] [key=value ...]

For every answer variant, seed and model (the config's MTA model, and `model.baseline()`: the same model
with no MTA part), trains with the project's training loop (train/loop.py) and reads the teacher-forced
sequence error of its final evaluation on held-out samples. Writes <out>/toy_table.json (every run: error,
loss, wall time) and <out>/toy_table.md (mean +- std over seeds in percent, beside the paper's Table 1), and
prints the table. JSON is rewritten after every run, so an interrupted table keeps what it measured; runs
already in the JSON for the same config and steps are not repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from train.config import TrainConfig, load_train_config, to_dict  # noqa: E402
from train.loop import train  # noqa: E402

# Table 1 of the paper (spec section 6): error %, mean +- std over 3 seeds, N = 5, 100k steps.
PAPER = {
    "Transformer": {"all": "51.6 ± 43.1", "first": "78.2 ± 1.5", "last": "1.3 ± 0.4"},
    "MTA": {"all": "0.1 ± 0.1", "first": "0.0 ± 0.0", "last": "0.0 ± 0.0"},
}
MODELS = ("Transformer", "MTA")


def run_config(cfg: TrainConfig, model: str, answer: str, seed: int, runs_dir: Path) -> TrainConfig:
    """cfg for one cell of the table: the baseline or MTA model, the answer variant, the seed."""
    model_cfg = cfg.model.baseline() if model == "Transformer" else cfg.model
    return dataclasses.replace(
        cfg,
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


def render(report: dict) -> str:
    """The markdown table: ours (this CPU setting) and the paper's Table 1, error % per answer variant."""
    answers = report["answers"]
    header = "| Model | " + " | ".join(f"{a} (ours)" for a in answers) + " | "
    header += " | ".join(f"{a} (paper)" for a in answers) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(answers))]
    for model in MODELS:
        ours = []
        for answer in answers:
            errors = [
                r["sequence_error"] for r in report["runs"] if r["model"] == model and r["answer"] == answer
            ]
            ours.append(cell(errors) if errors else "-")
        paper = [PAPER[model][a] for a in answers]
        lines.append(f"| {model} | " + " | ".join(ours) + " | " + " | ".join(paper) + " |")
    setting = report["setting"]
    seeds = ", ".join(str(s) for s in report["seeds"])
    lines += [
        "",
        f"Ours: teacher-forced sequence error (%) on {setting['eval_samples']} held-out samples, mean ± std "
        f"over seeds {seeds}; N = {setting['block_size']}, L = {setting['query_len']}, "
        f"{setting['seq_len']} tokens, {setting['steps']} steps of {setting['batch']} "
        f"(`{report['command']}`, {report['device']}). Paper: Table 1, N = 5, 100k steps.",
    ]
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, help="override the config's steps")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides as for python -m train, e.g. global_batch_size=64"
    )
    parser.add_argument("--out", default=str(ROOT / "bench/results"))
    parser.add_argument("--runs-dir", default=str(ROOT / "runs/toy_table"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps else [])
    cfg = load_train_config(args.config, overrides)
    if cfg.data.kind != "toy" or cfg.model.mta is None:
        raise ValueError(f"config={args.config!r} is invalid: needs data.kind toy and a model with MTA")
    setting = {
        "config": to_dict(cfg),
        "block_size": cfg.data.toy_block_size,
        "query_len": cfg.data.toy_query_len,
        "seq_len": cfg.data.seq_len,
        "steps": cfg.steps,
        "batch": cfg.global_batch_size,
        "eval_samples": cfg.eval_batches * cfg.global_batch_size,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "toy_table.json", out / "toy_table.md"
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
    for answer in args.answers:
        for seed in args.seeds:
            for model in args.models:
                if (model, answer, seed) in done:
                    continue
                run_cfg = run_config(cfg, model, answer, seed, Path(args.runs_dir))
                start = time.perf_counter()
                result = train(run_cfg)
                seconds = time.perf_counter() - start
                metrics = result.eval_metrics or {}
                record = {
                    "model": model,
                    "answer": answer,
                    "seed": seed,
                    "sequence_error": metrics.get("sequence_error"),
                    "eval_loss": result.eval_loss,
                    "seconds": round(seconds, 1),
                    "run_dir": run_cfg.run_dir,
                }
                report["runs"].append(record)
                print(
                    f"{model:11s} answer={answer:5s} seed={seed}: "
                    f"error {100 * record['sequence_error']:.1f}% in {seconds:.0f} s",
                    flush=True,
                )
                json_path.write_text(json.dumps(report, indent=2) + "\n")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render(report))
    print(render(report))
    return report


if __name__ == "__main__":
    main()
