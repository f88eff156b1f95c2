"""The TPU kernels' cost estimates (pl.CostEstimate): their FLOPs on every computed tile pair and the HBM
bytes their pipelines DMA, which XLA's scheduler and cost analysis (train/compile.py's roofline) use.

Bytes come from the kernel's own grid and block specs (pipeline_bytes): the Pallas TPU pipeline copies an
operand's block at every grid step whose block index differs from the step before, so the streamed side
(k and v tiles of a q-major kernel) is read once per computed tile pair, the resident side once per outer
tile, and the skipped causal tiles, whose index maps repeat the last block, cost nothing. The index maps
are evaluated in numpy on all grid steps at once, from their jaxprs, so the count also works while the
kernel is traced under jit for a compile-only device (where no jax array can be computed).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.extend.core import Literal

if TYPE_CHECKING:
    from kernels.tpu_common import Config

# Which count the Mosaic kernels declare, recorded in train.compile's JSON: "pipeline-dma" (this file).
# The kernels before 2026-12-06 declared each operand once, which left their re-reads out of the roofline.
COST_MODEL = "pipeline-dma"

# FLOP per computed score and head, by kernel: wide = the QK contraction (C * Dk), d = the value width,
# conv = 2 c_q c_k (the post conv on the vector unit). The post-conv backward kernels rebuild dPcm on three
# key tiles (a d-wide product each); dK/dV also P on three key tiles, the conv for Pc and dW's sums.
_FLOPS_PER_SCORE = {
    "fwd": lambda wide, d, conv: 2 * (wide + d),
    "lse": lambda wide, d, conv: 2 * wide,
    "fwd_post": lambda wide, d, conv: 2 * (wide + d),
    "delta": lambda wide, d, conv: 2 * (wide + d),
    "dq": lambda wide, d, conv: 2 * (2 * wide + d),
    "dkv": lambda wide, d, conv: 2 * (2 * wide + 2 * d),
    "fwd_post_conv": lambda wide, d, conv: 2 * (wide + d) + conv,
    "delta_post_conv": lambda wide, d, conv: 2 * (wide + 3 * d) + conv,
    "dq_post_conv": lambda wide, d, conv: 2 * (2 * wide + 3 * d) + conv,
    "dkv_post_conv": lambda wide, d, conv: 2 * (4 * wide + 4 * d) + 3 * conv,
}


def tiles_computed(cfg: Config) -> int:
    """Number of (q tile, kv tile) pairs the kernels compute (causal skipping included)."""
    if not cfg.causal:
        return cfg.num_q * cfg.num_k
    total = 0
    for qi in range(cfg.num_q):
        row = qi * cfg.block_q + cfg.block_q - 1 + cfg.shift
        total += 0 if row < 0 else min(row // cfg.block_k, cfg.num_k - 1) + 1
    return total


def cost_estimate(
    mode: str, cfg: Config, batch: int, qp_shape, dim: int, grid, specs, arrays
) -> pl.CostEstimate:
    """Kernel `mode`'s work on every computed (q tile, kv tile) pair of its B x H heads, and the bytes its
    pipeline moves over `grid` for `arrays` (inputs, then outputs) under `specs`."""
    scores = batch * cfg.heads * tiles_computed(cfg) * cfg.block_q * cfg.block_k
    conv = 2 * cfg.conv_q * cfg.conv_k if mode.endswith("_post_conv") else 0
    flops = scores * _FLOPS_PER_SCORE[mode](qp_shape[2] * qp_shape[4], dim, conv)
    flops += 2 * scores * (cfg.pre_size + cfg.post_size)  # head mixing on the vector unit
    nbytes = pipeline_bytes(grid, specs, arrays)
    return pl.CostEstimate(flops=int(flops), transcendentals=int(scores), bytes_accessed=int(nbytes))


def pipeline_bytes(grid: tuple[int, ...], specs, arrays) -> int:
    """HBM bytes the Pallas TPU pipeline moves for one pallas_call: a blocked operand's block once for
    every grid step (in grid order, the last axis fastest) whose block index differs from the step
    before, an unblocked (SMEM) operand once."""
    steps = [x.ravel().astype(np.int32) for x in np.indices(grid)]
    total = 0
    for spec, a in zip(specs, arrays, strict=True):
        itemsize = jnp.dtype(a.dtype).itemsize
        if spec.block_shape is None:
            total += math.prod(a.shape) * itemsize
            continue
        index = np.stack([np.broadcast_to(x, steps[0].shape) for x in index_map_numpy(spec.index_map, steps)])
        fetches = 1 + int(np.count_nonzero(np.any(index[:, 1:] != index[:, :-1], axis=0)))
        total += fetches * math.prod(d for d in spec.block_shape if d is not None) * itemsize
    return total


def index_map_numpy(index_map, steps: list[np.ndarray]) -> list[np.ndarray]:
    """index_map(*grid indices) with each index a vector of grid steps, computed in numpy."""
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    closed = jax.make_jaxpr(index_map)(*(scalar for _ in steps))
    return _eval(closed.jaxpr, closed.consts, steps)


def _trunc_div(a, b):
    return np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))  # lax.div rounds toward zero


_NUMPY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": _trunc_div, "rem": np.fmod,
    "neg": np.negative, "max": np.maximum, "min": np.minimum, "abs": np.abs, "sign": np.sign,
    "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "eq": np.equal,
    "ne": np.not_equal, "and": np.logical_and, "or": np.logical_or, "not": np.logical_not,
    "clamp": lambda lo, x, hi: np.clip(x, lo, hi),
    "select_n": lambda which, *cases: np.choose(np.asarray(which, np.int32), np.broadcast_arrays(*cases)),
}  # fmt: skip
_IDENTITY = ("convert_element_type", "copy", "copy_p", "squeeze", "reshape", "broadcast_in_dim")


def _eval(jaxpr, consts, args) -> list:
    """A jaxpr of integer scalar arithmetic (what index maps do), elementwise over numpy vectors."""
    env = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = np.asarray(value)
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in ("pjit", "jit", "closed_call"):
            inner = eqn.params["jaxpr"]
            outs = _eval(inner.jaxpr, inner.consts, ins)
        elif name in _NUMPY:
            outs = [_NUMPY[name](*ins)]
        elif name in _IDENTITY:
            outs = [np.asarray(ins[0])]
        else:
            raise NotImplementedError(f"index map uses {name!r}: tpu_cost.py cannot evaluate it in numpy")
        for var, value in zip(eqn.outvars, outs, strict=True):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]
