"""Decoding throughput and cache memory of an MTA model against its baseline of the same size.

    python bench/decode.py [--dim 256] [--layers 4] [--heads 4] [--batches 1 8] [--cache-lens 256 1024]
        [--steps 32] [--runs 5] [--out bench/results]

The MTA model has the paper's MTA options (c_q = 6, c_k = 11 before and after the softmax, head mixing
over all heads, group norm, scalar gate) with the key-query conv in every 4th layer from the third (the
released configs' choice; --kq-conv-layers all puts it everywhere); the baseline is `cfg.baseline()`.
For each model, batch size and cache length S_max, one jitted program runs --steps greedy decoding
steps (a lax.fori_loop over MTATransformer.decode) on a cache marked as holding S_max - steps tokens:
every step reads all S_max slots, so what they hold does not change the work. Times are the median of
--runs calls after a warm-up call (block_until_ready), the two models' calls alternating (ABBA) so that
a noisy shared machine slows both alike; tokens/s = batch * steps / median. cache_bytes is
the sum of the cache arrays' nbytes. Writes <out>/decode-<device>.json ("cpu" or the GPU's kind).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, with or without the package installed
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench.train_step import device_slug  # noqa: E402
from mta_jax.config import ModelConfig, MTAConfig  # noqa: E402
from mta_jax.decode import cache_bytes  # noqa: E402
from mta_jax.model import MTATransformer, count_params  # noqa: E402
from train.files import write_text_atomic  # noqa: E402

PAPER_MTA = MTAConfig(pre_conv=(6, 11), post_conv=(6, 11), group_norm=True, gate="scalar")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/decode.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--kq-conv-layers", choices=("paper", "all"), default="paper")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cache-lens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=32, help="decoding steps per timed call")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per point (median)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON")
    args = parser.parse_args(argv)
    for name in ("dim", "layers", "heads", "vocab", "steps", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: must be >= 1")
    for length in args.cache_lens:
        if length <= args.steps:
            parser.error(f"--cache-lens {length} is invalid: must exceed --steps={args.steps}")
    return args


def model_configs(args: argparse.Namespace) -> dict[str, ModelConfig]:
    mta = dataclasses.replace(PAPER_MTA, pre_head_mix=args.heads, post_head_mix=args.heads)
    layers = tuple(range(2, args.layers, 4)) if args.kq_conv_layers == "paper" else None
    cfg = ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        mta=mta,
        kq_conv_layers=layers,
        dtype=args.dtype,
    )
    return {"mta": cfg, "baseline": cfg.baseline()}


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def decode_steps(graphdef, state, cache, tokens, *, steps):
    """`steps` greedy decoding steps from tokens [B]; returns the last tokens [B]."""
    model = nnx.merge(graphdef, state)

    def step(_, carry):
        tokens, cache = carry
        logits, cache = model.decode(tokens[:, None], cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    return jax.lax.fori_loop(0, steps, step, (tokens, cache))[0]


def prepare(cfg: ModelConfig, batch: int, cache_len: int, args: argparse.Namespace) -> tuple:
    """(a call that runs the jitted steps, compiled and warmed up; the record's fixed fields)."""
    model = MTATransformer(cfg, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    cache = model.init_cache(batch, cache_len)
    start = jnp.asarray(cache_len - args.steps, jnp.int32)
    cache = dataclasses.replace(
        cache, layers=tuple(dataclasses.replace(layer, length=start) for layer in cache.layers)
    )
    tokens = jnp.zeros((batch,), jnp.int32)
    run = functools.partial(decode_steps, graphdef, state, cache, tokens, steps=args.steps)
    began = time.perf_counter()
    run().block_until_ready()
    fields = {
        "batch": batch,
        "cache_len": cache_len,
        "steps": args.steps,
        "compile_and_first_call_s": time.perf_counter() - began,
        "cache_bytes": cache_bytes(cache),
        "kv_bytes": sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers),
    }
    return run, fields


def measure_pair(configs: dict[str, ModelConfig], batch: int, cache_len: int, args) -> list[dict]:
    """Both models at one point, their timed calls alternating (ABBA order) so that a noisy shared
    machine slows both alike."""
    prepared = {name: prepare(cfg, batch, cache_len, args) for name, cfg in configs.items()}
    names = list(prepared)
    times = {name: [] for name in names}
    for index in range(args.runs):
        for name in names if index % 2 == 0 else reversed(names):
            began = time.perf_counter()
            prepared[name][0]().block_until_ready()
            times[name].append(time.perf_counter() - began)
    records = []
    for name in names:
        median = statistics.median(times[name])
        records.append(
            {
                "model": name,
                **prepared[name][1],
                "median_s": median,
                "min_s": min(times[name]),
                "times_s": times[name],
                "tokens_per_s": batch * args.steps / median,
                "ms_per_step": 1000 * median / args.steps,
            }
        )
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = jax.devices()[0]
    slug = "cpu" if device.platform == "cpu" else device_slug(device.device_kind)
    configs = model_configs(args)
    report = {
        "device": slug,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "command": shlex.join(["python", "bench/decode.py", *(sys.argv[1:] if argv is None else argv)]),
        "timestamp_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "models": {
            name: {
                "params": count_params(cfg),
                "kq_conv_layers": cfg.kq_conv_layers,
                "mta": cfg.mta is not None,
            }
            for name, cfg in configs.items()
        },
        "records": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decode-{slug}.json"
    for batch in args.batches:
        for cache_len in args.cache_lens:
            for record in measure_pair(configs, batch, cache_len, args):
                report["records"].append(record)
                name = record["model"]
                write_text_atomic(path, json.dumps(report, indent=1) + "\n")  # after every point
                speed = f"{record['tokens_per_s']:9.1f} tokens/s, {record['ms_per_step']:7.2f} ms/step"
                memory = f"cache {record['cache_bytes'] / 2**20:8.2f} MiB"
                print(f"{name:8s} batch {batch:3d} cache {cache_len:6d}: {speed}, {memory}", flush=True)
    report["ratios"] = ratios(report["records"])
    write_text_atomic(path, json.dumps(report, indent=1) + "\n")
    for point in report["ratios"]:
        time_ratio, bytes_ratio = point["mta_over_baseline_time"], point["mta_over_baseline_cache_bytes"]
        print(
            f"batch {point['batch']:3d} cache {point['cache_len']:6d}: MTA / baseline time per token "
            f"{time_ratio:.2f}x, cache bytes {bytes_ratio:.3f}x"
        )
    print(f"wrote {path}")
    return 0


def ratios(records: list[dict]) -> list[dict]:
    """MTA over baseline, per (batch, cache_len): time per token and cache bytes."""
    by_point = {}
    for record in records:
        by_point.setdefault((record["batch"], record["cache_len"]), {})[record["model"]] = record
    points = []
    for (batch, cache_len), pair in by_point.items():
        if {"mta", "baseline"} <= set(pair):
            mta, base = pair["mta"], pair["baseline"]
            points.append(
                {
                    "batch": batch,
                    "cache_len": cache_len,
                    "mta_over_baseline_time": mta["median_s"] / base["median_s"],
                    "mta_over_baseline_cache_bytes": mta["cache_bytes"] / base["cache_bytes"],
                }
            )
    return points


if __name__ == "__main__":
    sys.exit(main())
