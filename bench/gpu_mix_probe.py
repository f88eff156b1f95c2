"""Probe: would the Triton kernels compile with head mixing over more heads than the GPU limit allows?

    python bench/gpu_mix_probe.py [--group 16] [--target h200] [--head-dims 64] [--modes fwd]
        [--out bench/results/gpu_mix_probe]

kernels/ops.py refuses head-mixing groups over MAX_MIX_GROUP["cuda"] (4) on GPU. This lifts that limit
in this process only and runs bench/compile_check.py's `mix_all` layer (mixing over all 16 heads) at
T = 1024 for a GPU target: XLA's Triton and ptxas report whether they accept the kernels and with how
many spill bytes. Nothing in the dispatch changes; the JSON is <out>/compile-<target>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernels import aot, ops  # noqa: E402, F401  (aot sets the plugins' environment first)
from kernels.chips import CHIPS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=16, help="the GPU mixing limit to try")
    gpus = [name for name, chip in CHIPS.items() if chip.platform != "tpu"]
    parser.add_argument("--target", default="h200", choices=gpus)
    parser.add_argument("--head-dims", nargs="+", default=["64"])
    parser.add_argument("--modes", nargs="+", default=["fwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--out", default=str(ROOT / "bench/results/gpu_mix_probe"))
    args = parser.parse_args(argv)
    if args.group < 1:
        parser.error(f"--group={args.group} is invalid: must be >= 1")
    ops.MAX_MIX_GROUP.update(cuda=args.group, gpu=args.group)
    from bench import compile_check

    return compile_check.main(
        ["--targets", args.target, "--layers", "mix_all", "--paths", "pallas", "--head-dims", *args.head_dims]
        + ["--lengths", "1024", "--modes", *args.modes, "--out", args.out]
    )


if __name__ == "__main__":
    sys.exit(main())
