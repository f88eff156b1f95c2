"""Real text: a byte-level MTA model and the baseline of the same size, trained for the same steps on the same
text, compared by validation bits per byte.

    python bench/real_text.py [--config configs/train/tiny_lm.yaml] [--text FILE] [--steps N]
        [--eval-tokens 30000] [--out bench/results] [--runs-dir runs/real_text]

Both runs use the config's data, optimizer, batch and seed (so they see the same rows in the same order);
the baseline is `model.baseline()`, the same model with no MTA part. After training, each final checkpoint is
scored by `python -m train.evaluate perplexity` on the run's held-out documents (the last
data.eval_fraction of them). Writes <out>/real_text-<device>.json (both runs: parameters, steps, wall time,
last train loss, validation nats/token, bits/byte, perplexity) and prints a small table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from mta_jax.model import count_params  # noqa: E402
from train.config import TrainConfig, load_train_config  # noqa: E402
from train.files import write_text_atomic  # noqa: E402
from train.loop import train  # noqa: E402

MODELS = ("baseline", "mta")


def run_config(cfg: TrainConfig, model: str, runs_dir: Path) -> TrainConfig:
    """The config of one of the two runs: the MTA model of cfg, or its baseline."""
    model_cfg = cfg.model.baseline() if model == "baseline" else cfg.model
    return dataclasses.replace(cfg, model=model_cfg, run_dir=str(runs_dir / model), progress=False)


def device_name() -> str:
    device = jax.devices()[0]
    return "cpu" if device.platform == "cpu" else device.device_kind.lower().replace(" ", "-")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/train/tiny_lm.yaml"))
    parser.add_argument("--text", default=None, help="the text file (default: the config's data.path)")
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
    parser.add_argument("--eval-tokens", type=int, default=30_000, help="held-out tokens to score")
    parser.add_argument("--eval-seq-len", type=int, default=None, help="default: the config's data.seq_len")
    parser.add_argument("--out", default=str(ROOT / "bench/results"))
    parser.add_argument("--runs-dir", default=str(ROOT / "runs/real_text"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    overrides = [f"steps={args.steps}"] if args.steps else []
    if args.text:
        overrides.append(f"data.path={args.text}")
    cfg = load_train_config(args.config, overrides)
    if cfg.data.kind != "text" or cfg.model.mta is None:
        raise ValueError(f"config={args.config!r} is invalid: needs data.kind text and a model with MTA")
    if not Path(cfg.data.path).exists():
        raise ValueError(f"data.path={cfg.data.path!r} is invalid: no such file")
    seq_len = args.eval_seq_len or cfg.data.seq_len
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "command": f"python bench/real_text.py {argv_text}".strip(),
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "text": cfg.data.path,
        "tokenizer": cfg.data.tokenizer,
        "steps": cfg.steps,
        "global_batch_size": cfg.global_batch_size,
        "seq_len": cfg.data.seq_len,
        "eval": {
            "tokens": args.eval_tokens,
            "seq_len": seq_len,
            "documents": "held out (data.eval_fraction)",
        },
        "runs": {},
    }
    from train.evaluate import main as evaluate  # the evaluation CLI, scoring each final checkpoint

    for model in MODELS:
        run_cfg = run_config(cfg, model, Path(args.runs_dir))
        start = time.perf_counter()
        result = train(run_cfg)
        seconds = time.perf_counter() - start
        scores = Path(run_cfg.run_dir) / "validation.json"
        code = evaluate(
            ["perplexity", "--checkpoint", run_cfg.run_dir, "--seq-len", str(seq_len)]
            + ["--max-tokens", str(args.eval_tokens), "--output", str(scores)]
        )
        if code != 0:
            raise RuntimeError(f"evaluating {run_cfg.run_dir} failed (exit {code})")
        validation = json.loads(scores.read_text())
        last = max(result.losses) if result.losses else None
        report["runs"][model] = {
            "parameters": count_params(run_cfg.model),
            "train_seconds": round(seconds, 1),
            "last_train_loss": None if last is None else result.losses[last],
            **{
                k: validation[k] for k in ("tokens", "bytes", "nats_per_token", "perplexity", "bits_per_byte")
            },
            "run_dir": run_cfg.run_dir,
        }
    mta, base = report["runs"]["mta"], report["runs"]["baseline"]
    report["bits_per_byte_difference"] = mta["bits_per_byte"] - base["bits_per_byte"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"real_text-{report['device']}.json"
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"wrote {path}")
    return report


def render(report: dict) -> str:
    """A markdown table of the two runs."""
    lines = [
        "| Model | Parameters | Validation bits/byte | Perplexity (per token) | Train time |",
        "|---|---|---|---|---|",
    ]
    for model in MODELS:
        run = report["runs"][model]
        lines.append(
            f"| {'MTA' if model == 'mta' else 'Transformer'} | {run['parameters']:,} | "
            f"{run['bits_per_byte']:.3f} | {run['perplexity']:.2f} | {run['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
