"""The TPU kernels' HBM bytes at chosen tiles for one MTA layer, and whether libtpu accepts those tiles.

    python -m bench.tile_bytes --target v5p --layer mix_all [--batch 4 --seq 2048 --heads 16 --head-dim 96]
        [--tiles 256x128,256x128,128x256 ...] [--compile] [--out bench/results/tile_bytes-<target>.json]

For the default tiles (kernels/tpu_tiles.py) and each --tiles set (forward, dQ and dK/dV tiles, each
block_q x block_k), it lowers the fused core's forward and backward for a compile-only TPU (kernels/aot.py)
and records every Mosaic kernel's declared cost: its FLOPs and the bytes its pipeline DMAs
(kernels/tpu_cost.py). With --compile, libtpu compiles each set: accepted (with the temp bytes) or its
message. Nothing runs on a chip: the bytes are the kernels' own estimates. The JSON at --out is replaced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.attention import layer_config  # noqa: E402
from bench.compile_check import LAYERS, abstract_inputs, tpu_kernels  # noqa: E402
from kernels import aot  # noqa: E402
from kernels.chips import get_chip  # noqa: E402
from kernels.ops import default_block_sizes, pallas_attention_core  # noqa: E402
from kernels.tpu_tiles import TpuBlockSizes, TpuTiles  # noqa: E402
from train.errors import short_error  # noqa: E402
from train.files import write_text_atomic  # noqa: E402


def parse_tiles(text: str) -> TpuBlockSizes:
    """ "256x128,256x128,128x256" -> the forward, dQ and dK/dV tiles."""
    try:
        tiles = []
        for part in text.split(","):
            block_q, block_k = part.split("x")  # exactly two: "128" must not take a default block_k
            tiles.append(TpuTiles(int(block_q), int(block_k)))
        fwd, dq, dkv = tiles
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"--tiles {text!r} is invalid: must be FWDQxFWDK,DQQxDQK,DKVQxDKVK ({error})"
        ) from error
    return TpuBlockSizes(fwd, dq, dkv)


def measure(
    chip, device, layer: str, shape: tuple[int, int, int, int], blocks: TpuBlockSizes | None, compile_it: bool
):
    """Lower (and with compile_it compile) the core's gradients at `blocks` (None: the defaults)."""
    cfg = layer_config(layer, shape[2])
    q, k, v, params, cotangent = abstract_inputs(device, shape, cfg, jnp.bfloat16)
    if blocks is None:
        blocks = default_block_sizes("tpu", chip, q, k, cfg)

    def loss(q, k, v, params, cotangent):
        out = pallas_attention_core(
            q,
            k,
            v,
            params,
            cfg,
            q_segment_ids=None,
            kv_segment_ids=None,
            dropout_rng=None,
            block_sizes=blocks,
        )
        return jnp.sum(out * cotangent.astype(jnp.float32))

    record = {name: dataclasses.asdict(getattr(blocks, name)) for name in ("fwd", "dq", "dkv")}
    with aot.target_mesh(device):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, v, params, cotangent).lower()
        kernels = tpu_kernels(lowered)
        record.update(
            kernel_bytes=sum(k["estimate_bytes_accessed"] for k in kernels),
            kernel_flops=sum(k["estimate_flops"] for k in kernels),
            kernels=kernels,
        )
        if compile_it:
            try:
                compiled = lowered.compile()
            except Exception as error:  # noqa: BLE001 - the compiler's refusal is the finding
                record.update(accepted=False, error=short_error(error))
            else:
                record.update(accepted=True, temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="v5p")
    parser.add_argument("--layer", default="mix_all", choices=LAYERS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=96)
    parser.add_argument(
        "--tiles", nargs="*", default=[], help="forward,dQ,dK/dV tiles, e.g. 256x128,256x128,128x256"
    )
    parser.add_argument("--compile", action="store_true", help="also compile each set with libtpu")
    parser.add_argument(
        "--out", type=Path, help="JSON (default: bench/results/tile_bytes-<target>-<layer>.json)"
    )
    args = parser.parse_args(argv)
    chip = get_chip(args.target)
    if chip.platform != "tpu":
        parser.error(f"--target {args.target} is invalid: the tile costs are the TPU kernels'")
    try:
        sets = [None] + [parse_tiles(t) for t in args.tiles]
    except ValueError as error:
        parser.error(str(error))
    device = aot.compile_only_device(chip)
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    rows = []
    for blocks in sets:
        row = {"default": blocks is None, **measure(chip, device, args.layer, shape, blocks, args.compile)}
        rows.append(row)
        tiles = " ".join(f"{n} {row[n]['block_q']}x{row[n]['block_k']}" for n in ("fwd", "dq", "dkv"))
        verdict = (
            "" if "accepted" not in row else (" accepted" if row["accepted"] else f" REFUSED: {row['error']}")
        )
        print(f"{tiles}: kernels move {row['kernel_bytes'] / 1e9:.2f} GB (declared){verdict}", flush=True)
    out = args.out or ROOT / "bench" / "results" / f"tile_bytes-{args.target}-{args.layer}.json"
    header = {
        "target": args.target,
        "layer": args.layer,
        "batch": args.batch,
        "seq": args.seq,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "dtype": "bfloat16",
        "mode": "fwd+bwd",
        "note": "kernel bytes and FLOPs are the Mosaic kernels' declared cost estimates: not measured",
    }
    write_text_atomic(out, json.dumps({**header, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
