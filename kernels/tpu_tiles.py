"""Tile defaults for the TPU kernels from a VMEM model of one program.

A TPU program keeps its blocks in VMEM, double-buffered by the pipeline (qp [G, C, bq, Dk], kp
[G, C, bk, Dk], v, the band, segment ids, and per kernel its outputs: out / dq / dk / dv), its scratch
accumulators (float32: the online-softmax state, dq [G, C, bq, Dk], dk and dv) and the live float32
score tiles of the head group. `vmem_bytes` adds these up with Mosaic's (8, 128) padding. A kernel fits
when the estimate stays within 7/8 of the chip's VMEM, the vmem_limit_bytes the kernels ask for
(tpu_common.vmem_limit). `default_block_sizes` takes the largest tiles that fit, per kernel; `no_fit`
says when even the smallest do not (auto then runs blockwise). libtpu checks the model:
`python -m bench.compile_check --targets v4 v5e v5p v6e` compiles every layer at these defaults.
"""

from __future__ import annotations

import dataclasses
import math

from kernels.chips import Chip
from kernels.tpu_common import LANES, LIVE_SCORE_TILES, SUBLANES


@dataclasses.dataclass(frozen=True)
class TpuTiles:
    """block_q rows of queries and block_k of keys per program (block_k on lanes: a multiple of 128)."""

    block_q: int = 256
    block_k: int = 256

    def __post_init__(self):
        if self.block_q <= 0 or self.block_q % SUBLANES:
            raise ValueError(f"block_q={self.block_q} is invalid: must be a positive multiple of {SUBLANES}")
        if self.block_k <= 0 or self.block_k % SUBLANES:
            raise ValueError(f"block_k={self.block_k} is invalid: must be a positive multiple of {SUBLANES}")


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    """Tiles of the forward (and lse / post-mix passes), the delta and dQ kernels, and dK/dV."""

    fwd: TpuTiles = TpuTiles()
    dq: TpuTiles = TpuTiles()
    dkv: TpuTiles = TpuTiles()

    def with_blocks(self, block_q: int | None, block_k: int | None) -> TpuBlockSizes:
        def replace(tiles: TpuTiles) -> TpuTiles:
            return TpuTiles(block_q or tiles.block_q, block_k or tiles.block_k)

        return TpuBlockSizes(replace(self.fwd), replace(self.dq), replace(self.dkv))

    def max_blocks(self) -> tuple[int, int]:
        kernels = (self.fwd, self.dq, self.dkv)
        return max(t.block_q for t in kernels), max(t.block_k for t in kernels)


@dataclasses.dataclass(frozen=True)
class Problem:
    group: int
    slabs: int
    dk: int
    d: int
    width: int = 0
    itemsize: int = 2
    conv_q: int = 0  # the post-softmax conv's c_q (0: none): its kernels hold more, see vmem_bytes


def _padded(*dims: int, itemsize: int = 4) -> int:
    """Bytes of a VMEM buffer: last dim padded to 128 lanes, second-last to 8 sublanes."""
    dims = list(dims)
    dims[-1] = -(-dims[-1] // LANES) * LANES
    if len(dims) > 1:
        dims[-2] = -(-dims[-2] // SUBLANES) * SUBLANES
    return math.prod(dims) * itemsize


def vmem_bytes(kind: str, p: Problem, tiles: TpuTiles) -> int:
    """Estimated VMEM of one program of kernel `kind` ("fwd", "dq" or "dkv")."""
    g, c, bq, bk, isz = p.group, p.slabs, tiles.block_q, tiles.block_k, p.itemsize
    blocks = [
        _padded(g, c, bq, p.dk, itemsize=isz),  # qp
        _padded(g, c, bk, p.dk, itemsize=isz),  # kp
        _padded(g, bk, p.d, itemsize=isz),  # v (at most one kv head per query head)
        _padded(bq, LANES),  # q segment ids
        _padded(SUBLANES, bk),  # kv segment ids
    ]
    if p.width:
        blocks.append(_padded(g, bq, p.width))
    rows = _padded(g, bq, LANES)  # lse, delta
    if kind == "fwd":
        blocks += [_padded(g, bq, p.d), rows]
        scratch = 2 * rows + _padded(g, bq, p.d)
    elif kind == "dq":
        blocks += [_padded(g, bq, p.d), 2 * rows, _padded(g, c, bq, p.dk, itemsize=isz)]
        if p.width:
            blocks.append(_padded(g, bq, p.width))
        scratch = _padded(g, c, bq, p.dk)
    else:
        blocks += [_padded(g, bq, p.d), 2 * rows, _padded(g, c, bk, p.dk, itemsize=isz), _padded(g, bk, p.d)]
        scratch = _padded(g, c, bk, p.dk) + _padded(g, bk, p.d)
    live = LIVE_SCORE_TILES * g * bq * bk * 4
    if p.conv_q:
        # tpu_post_conv*.py: rows above / below the q tile, the two neighbouring key tiles' blocks, and
        # per head the probabilities and their gradients of three key tiles plus the conv's c_q row sums.
        halo = -(-(p.conv_q - 1) // SUBLANES) * SUBLANES
        blocks += [_padded(g, c, 2 * halo, p.dk, itemsize=isz), 2 * _padded(g, c, bk, p.dk, itemsize=isz)]
        blocks += [
            2 * _padded(g, bk, p.d, itemsize=isz),
            _padded(g, 2 * halo, p.d),
            2 * _padded(SUBLANES, bk),
        ]
        per_head = {"fwd": p.conv_q + 4, "dq": p.conv_q + 7, "dkv": 2 * p.conv_q + 10}[kind]
        live += g * per_head * (bq + 2 * halo) * bk * 4
        if kind == "fwd":
            scratch += 3 * _padded(g, bq + halo, bk)  # the ring of P tiles
    return 2 * sum(blocks) + scratch + live


def fits(kind: str, p: Problem, tiles: TpuTiles, chip: Chip) -> bool:
    """The estimate within 7/8 of VMEM, with no margin on top: the estimate counts LIVE_SCORE_TILES
    float32 score tiles per head, more than Mosaic keeps. libtpu 0.0.42 accepts 16-head mixing at
    256 x 256 on a v5p (dK/dV estimated at 1.08x the limit) and refuses dQ at 128 x 128 on a v4
    (estimated at 1.37x). Until 2026-12-07 the margin was 2x, which halved the 16-head layers' tiles."""
    return vmem_bytes(kind, p, tiles) <= chip.vmem_bytes * 7 // 8


# Tiles of at most 256 x 256: a [512, 512] float32 score tile is 256 vector registers, G of them
# (with P, dP, dS in the backward) spill, and Mosaic's compile time grows with the unrolled program
# (226 s for the 6x11 conv with mixing in groups of 4 at 512, D = 64, on a v5e).
SIZES_Q = (256, 128, 64, 32)
SIZES_K = (256, 128)


def _candidates(p: Problem, kind: str = "fwd") -> list[TpuTiles]:
    """Most scores a program first, then square, then the side that saves HBM traffic: the q-major
    kernels (fwd, dq) re-read the keys once per q tile, so a longer block_q; dK/dV re-reads the queries
    once per kv tile, so a longer block_k (v5e's post-conv forward at 256 x 128 declares 10.4 GB at the
    880M model's shapes, at 128 x 256 11.8 GB). block_k at least the band width."""
    longer = (lambda t: t.block_k) if kind == "dkv" else (lambda t: t.block_q)
    return sorted(
        (TpuTiles(bq, bk) for bq in SIZES_Q for bk in SIZES_K if bk >= p.width),
        key=lambda t: (-t.block_q * t.block_k, abs(t.block_q - t.block_k), -longer(t)),
    )


def default_block_sizes(chip: Chip, p: Problem) -> TpuBlockSizes:
    """Per kernel the largest tiles that fit; where none does, the smallest (see no_fit)."""
    chosen = {}
    for kind in ("fwd", "dq", "dkv"):
        candidates = _candidates(p, kind)
        chosen[kind] = next((t for t in candidates if fits(kind, p, t, chip)), candidates[-1])
    return TpuBlockSizes(**chosen)


# Where the estimate stops being a default and becomes a refusal: libtpu 0.0.42 accepted every kernel
# estimated at up to 1.08x the limit (dK/dV with 16 heads at 256 x 256 on a v5p; at the smallest tiles
# on a v4, float32, 1.003x) and refused the smallest one estimated above it (the delta / dQ kernels of
# 16 heads x 6 slabs at 32 x 128 on a v4, 1.14x). Between 1x and this the smallest tiles are tried.
NO_FIT_RATIO = 1.1


def no_fit(chip: Chip, p: Problem) -> str | None:
    """Why the kernels cannot hold this layer on `chip` (heads per program, slabs, and the first kernel
    whose smallest tiles' estimate exceeds NO_FIT_RATIO x the VMEM limit, with both sizes), or None."""
    smallest = _candidates(p)[-1]
    limit = chip.vmem_bytes * 7 // 8
    for kind in ("fwd", "dq", "dkv"):
        if vmem_bytes(kind, p, smallest) > NO_FIT_RATIO * limit:
            need = vmem_bytes(kind, p, smallest)
            return (
                f"{p.group} heads x {p.slabs} slabs{' with the post-softmax conv' if p.conv_q else ''} on "
                f"{chip.name} (its {kind} kernel needs "
                f"{need / 2**20:.1f} MiB of VMEM at the smallest tiles, {smallest.block_q} x "
                f"{smallest.block_k}; the limit is {limit / 2**20:.0f} MiB)"
            )
    return None
