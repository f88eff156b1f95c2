"""Tile defaults for the Triton kernels from a resource model of one program (one thread block).

Two budgets bind on a Hopper GPU (H100 / H200: 227 KiB of shared memory and 64 Ki 32-bit registers
per block):
- shared memory: the pipelined loads, num_stages copies of each tile streamed per loop step
  (`smem_bytes`, buffer by buffer), plus the tiles a program keeps (q with one slab) and the
  scratch of one layout conversion of a score tile;
- registers: the float32 accumulators (out or dV: [rows, D] per head; dQ / dK: [rows, chunk * Dk] per
  head), the live score tiles (s, p, dp, ... of every head of the group) and the operand tiles of
  the G heads (v, dout), spread over the threads (`live_floats_per_thread`). A thread has at most
  255 registers; indices, pointers, masks and the compiler's temporaries take the rest, so the model
  allows a budget of live floats a thread.

The coefficients (COEFFICIENTS) were calibrated against XLA's Triton and ptxas -v for sm_90a on about
1,300 compiled kernels (G 1 and 4, C 1 and 6, D 64 and 128, tiles 16 to 128, 4 and 8 warps, every
slab chunk): with them no kernel the model accepts spills. `default_block_sizes` walks the candidates
from the largest tiles down and takes the first that fits, preferring no slab chunks (each chunk
recomputes the score tiles); `python -m bench.compile_check` reruns the real compilers on the defaults
(bench/results/compile-h100.json, compile-h200.json).

With head mixing (G > 1) the backward kernels hold G heads' score tiles, probabilities, dP and dS,
G dout and v tiles and G accumulators at once: at D = 128 no tile fits the registers, and the
smallest (16 x 16, one slab a program) leaves ptxas a few dozen bytes of spill stores in the dQ
kernel (24-60 bytes at G = 4; 0 at D = 64), well under 1 KB. The model then falls back to those tiles.
"""

from __future__ import annotations

import dataclasses
import itertools

from kernels.chips import Chip
from kernels.triton_common import KernelTiles, TritonBlockSizes

SMEM_SLACK = 0.9  # keep 10% of the opt-in shared memory free (barriers, alignment)
NUM_STAGES = 2  # pipelining depth of the streamed loads (>= 2: loads overlap the matrix unit)


@dataclasses.dataclass(frozen=True)
class Coefficients:
    """Live [bq, bk] score tiles per head and per program, operand elements per head per row of both
    tiles and D, and the budget of live float32 values per thread."""

    score_tiles_per_head: float
    score_tiles: float
    operands_per_head: float
    budget: float


# (one head a program, or a mixing group) x kernel, fitted to ptxas (module docstring).
COEFFICIENTS = {
    (False, "fwd"): Coefficients(0.0, 2, 0.0, 128),
    (False, "dq"): Coefficients(0.0, 1, 1.0, 144),
    (False, "dkv"): Coefficients(0.5, 2, 0.5, 104),
    (True, "fwd"): Coefficients(3.0, 8, 0.0, 104),
    (True, "dq"): Coefficients(0.0, 0, 0.25, 40),
    (True, "dkv"): Coefficients(0.0, 0, 0.0, 16),
}


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
    k = COEFFICIENTS[(g > 1, kind)]
    scores = (k.score_tiles_per_head * g + k.score_tiles) * bq * bk
    operands = k.operands_per_head * g * (bq + bk) * p.d
    return (acc + scores + operands) / (32 * tiles.num_warps)


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
        live_floats_per_thread(kind, p, tiles) <= COEFFICIENTS[(p.group > 1, kind)].budget
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
        else:  # nothing fits the model: the smallest tiles, one slab a program (module docstring)
            chosen[kind] = KernelTiles(16, max(16, _pow2_at_least(width)), 8, NUM_STAGES, 1)
    return TritonBlockSizes(**chosen)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
