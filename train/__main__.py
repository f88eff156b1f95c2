"""The training CLI: python -m train --config configs/train/X.yaml key.sub=value ...

Prints the resolved config (also saved as <run_dir>/config.yaml), trains, and exits 0 when the run
finished or was stopped cleanly (SIGTERM or Ctrl-C: saved at the end of the step); a bad config or data
path exits 2 with its message, a NaN or inf loss 3 (the last checkpoint is kept), a second Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import logging
import sys

from train.config import check_resumable, dump, load_train_config


def _log_to_stderr() -> None:
    """The run's own log lines ("train" logger) on stderr, whatever other libraries did to logging."""
    logger = logging.getLogger("train")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a YAML file under configs/train/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value pairs that replace config values")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    _log_to_stderr()
    try:
        cfg = load_train_config(args.config, args.overrides)
        check_resumable(cfg, cfg.run_dir)  # train() checks again; here it stops before jax starts
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(dump(cfg), end="", flush=True)
    if args.print_config:
        return 0

    from train.loop import NonFiniteLossError, train  # jax starts after the config is known to be valid

    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted: stopped without saving; the last checkpoint is kept", file=sys.stderr)
        return 130
    status = "preempted" if result.preempted else "finished"
    eval_text = "" if result.eval_loss is None else f", eval loss {result.eval_loss:.4f}"
    if result.eval_metrics and "sequence_error" in result.eval_metrics:
        eval_text += f", sequence error {100 * result.eval_metrics['sequence_error']:.1f}%"
    print(f"{status} at step {result.step}{eval_text}; run directory {cfg.run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
