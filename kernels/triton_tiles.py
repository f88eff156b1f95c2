"""Tile defaults for the Triton kernels from a resource model of one program (one thread block).

Two budgets bind on a Hopper GPU (H100 / H200: 227 KiB of shared memory and 64 Ki 32-bit registers
per block):
- shared memory: the pipelined loads, num_stages copies of each tile streamed per loop step
  (`smem_bytes`, buffer by buffer), plus the tiles a program keeps (q with one slab) and the
  scratch of one layout conversion of a score tile;
- registers: the float32 accumulators (out or dV: [rows, D] per head; dQ / dK: [rows, chunk * Dk] per
  head) and the live score tiles (s, p, dp, ... of every head of the group) spread over the threads
  (`live_floats_per_thread`). A thread has at most 255 registers; indices, pointers, masks and
  the compiler's temporaries take the rest, so the model allows LIVE_BUDGET floats a thread.

The coefficients were calibrated against XLA's Triton and ptxas for sm_90a (`python -m
kernels.compile_check` reruns the real compilers on the defaults; bench/results/compile-h100.json).
`default_block_sizes` walks the candidates from the largest tiles down and takes the first that fits,
preferring no slab chunks (each chunk recomputes the score tiles).
"""

from __future__ import annotations

import dataclasses
import itertools

from kernels.chips import Chip
from kernels.triton_common import KernelTiles, TritonBlockSizes

LIVE_BUDGET = 96  # float32 values a thread may keep live beside the compiler's own registers
SMEM_SLACK = 0.9  # keep 10% of the opt-in shared memory free (barriers, alignment)
NUM_STAGES = 2  # pipelining depth of the streamed loads (>= 2: loads overlap the matrix unit)
# Live [bq, bk] float32 score tiles per head of the group, and besides them per program.
SCORE_TILES = {"fwd": (1.5, 1.5), "dq": (3.0, 2.0), "dkv": (3.0, 2.0)}


@dataclasses.dataclass(frozen=True)
class Problem:
    """What the tiles depend on: G heads a program, C slabs of Dk, D, a band or not, input dtype size."""

    group: int
    slabs: int
    dk: int
    d: int
    itemsize: int = 2


def live_floats_per_thread(kind: str, p: Problem, tiles: KernelTiles) -> float:
    """Float32 values a thread keeps live: accumulators plus score tiles, over 32 * num_warps threads."""
    bq, bk, g = tiles.block_q, tiles.block_k, p.group
    chunk = tiles.chunk(p.slabs)
    if kind == "fwd":
        acc = g * bq * p.d
    elif kind == "dq":
        acc = g * chunk * bq * p.dk
    else:  # dkv: dK for the chunk and dV
        acc = g * chunk * bk * p.dk + g * bk * p.d
    per_head, shared = SCORE_TILES[kind]
    scores = (per_head * g + shared) * bq * bk
    return (acc + scores) / (32 * tiles.num_warps)


def smem_bytes(kind: str, p: Problem, tiles: KernelTiles) -> int:
    """Shared memory of one program: num_stages copies of every streamed tile plus kept tiles."""
    bq, bk, g, s, isz = tiles.block_q, tiles.block_k, p.group, tiles.num_stages, p.itemsize
    chunk = tiles.chunk(p.slabs)
    own, other = (bq, bk) if kind in ("fwd", "dq") else (bk, bq)
    if p.slabs > 1:  # the slab loop streams one own and one other slab tile per stage
        qk = s * (own + other) * p.dk * isz
    else:  # one slab: the own tiles of all G heads stay, the other's stream
        qk = g * own * p.dk * isz + s * g * other * p.dk * isz
    if kind == "fwd":
        extra = s * g * bk * p.d * isz  # v
    elif kind == "dq":
        extra = s * g * bk * p.d * isz + g * chunk * bk * p.dk * isz  # v, kp slabs of the chunk
    else:
        extra = s * g * bq * p.d * isz + g * chunk * bq * p.dk * isz  # dout, qp slabs of the chunk
    conversion = 2 * bq * bk * 4  # a score tile transposed or cast through shared memory
    return int(qk + extra + conversion)


def fits(kind: str, p: Problem, tiles: KernelTiles, chip: Chip) -> bool:
    return (
        live_floats_per_thread(kind, p, tiles) <= LIVE_BUDGET
        and smem_bytes(kind, p, tiles) <= SMEM_SLACK * chip.smem_per_block
    )


def candidates(kind: str, p: Problem, width: int):
    """KernelTiles to try, best first: no slab chunks, then the most scores per program."""
    sizes = (128, 64, 32, 16)
    chunks = [c for c in range(p.slabs, 0, -1) if p.slabs % c == 0] if kind != "fwd" else [p.slabs]
    options = []
    for bq, bk, warps, chunk in itertools.product(sizes, sizes, (8, 4), chunks):
        if bk < width:  # the band must fit in one kv tile
            continue
        tiles = KernelTiles(bq, bk, warps, NUM_STAGES, 0 if chunk == p.slabs else chunk)
        recompute = p.slabs // chunk
        options.append(((recompute, -bq * bk, -min(bq, bk), -warps), tiles))
    return [tiles for _, tiles in sorted(options, key=lambda item: item[0])]


def default_block_sizes(chip: Chip, p: Problem, width: int = 0) -> TritonBlockSizes:
    """The first candidate of each kernel that the resource model says fits `chip`."""
    chosen = {}
    for kind in ("fwd", "dq", "dkv"):
        for tiles in candidates(kind, p, width):
            if fits(kind, p, tiles, chip):
                chosen[kind] = tiles
                break
        else:  # nothing fits the model: the smallest tiles, the compiler will say how far off
            chosen[kind] = KernelTiles(16, max(16, _pow2_at_least(width)), 8, NUM_STAGES, 1)
    return TritonBlockSizes(**chosen)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
