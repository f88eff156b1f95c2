"""What the TPU (Mosaic) kernels share: the static config, tile-level pieces and the pallas_call plumbing.

The kernels (tpu_fwd.py, tpu_bwd.py) compute kernels/core_reference.py's core op. Grid (B, H / G, outer
tiles, inner tiles), the inner axis "arbitrary" with VMEM scratch accumulators. One program holds the
score tiles of a whole head group of G heads (G = the larger mixing group size, 1 without mixes), so
the pre-softmax head mix is G x G scalar multiply-adds on those tiles (weights in SMEM). Causal block
skipping: tiles above the (bottom-right) diagonal are skipped with pl.when, and their index maps point
at a block that is already loaded, so no DMA is spent on them. The band [B, H, T, W] is expanded
in-kernel with W iota selects, only on tiles that intersect it.

Layouts as in jax's ops/tpu/flash_attention.py: q segment ids [B, T, 128] (lane-broadcast), kv segment ids
[B, 8, S] (sublane-broadcast), lse and delta [B, H, T, 128].
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.core_reference import MASK_VALUE
from kernels.tpu_cost import cost_estimate
from mta_jax import dropout

LANES = 128
SUBLANES = 8
LIVE_SCORE_TILES = 8  # float32 [bq, bk] tiles per head a backward step keeps (s, z, P, dP, dz, ds, ...)
NT_DIMS = (((1,), (1,)), ((), ()))  # a [m, k] . b [n, k] -> [m, n]
TN_DIMS = (((0,), (0,)), ((), ()))  # a [k, m] . b [k, n] -> [m, n]


@dataclasses.dataclass(frozen=True)
class Config:
    """Static shapes and options shared by all kernels."""

    causal: bool
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    heads: int
    group: int  # G: heads per program
    pre_size: int  # pre_mix group size (0: no pre_mix)
    post_size: int  # post_mix group size (0: no post_mix)
    kv_rep: int  # query heads per kv head
    v_heads_per_block: int  # kv heads in one v block
    width: int  # band width W (0: no band)
    interpret: bool
    vmem_bytes: int = 16 * 2**20  # VMEM of the chip compiled for (kernels/chips.py)
    dropout_rate: float = 0.0  # attention dropout (0: none); the mask hashes mta_jax/dropout.py's way
    q_offset: int = 0  # rows padded in front of the queries: row r is query position r - q_offset
    kv_offset: int = 0  # the same for the keys
    conv_q: int = 0  # post-softmax conv (c_q, c_k) and its left key padding (0: no post conv)
    conv_k: int = 0
    conv_left: int = 0

    @property
    def num_q(self) -> int:
        return self.q_len // self.block_q

    @property
    def num_k(self) -> int:
        return self.kv_len // self.block_k

    @property
    def shift(self) -> int:
        """Bottom-right causal alignment: query i sees key j <= i + shift."""
        return self.kv_len - self.q_len

    @property
    def halo(self) -> int:
        """Rows above a q tile that the post conv reads: c_q - 1 rounded up to whole sublane tiles."""
        return -(-(self.conv_q - 1) // SUBLANES) * SUBLANES if self.conv_q > 1 else 0

    def v_index(self, head: int) -> int:
        """Index into the v block of the kv head of head `head` of the group."""
        return head * self.v_heads_per_block // self.group


# ----------------------------------------------------------------------------------------------------------
# Tile helpers


def to_lanes(x: jax.Array, n: int) -> jax.Array:
    """[r, 128] lane-broadcast values -> [r, n]."""
    if n == LANES:
        return x
    if n % LANES == 0:
        return jnp.tile(x, (1, n // LANES))
    return x[:, :n]


def lane_partial(x: jax.Array) -> jax.Array:
    """[r, n] -> [1, min(n, 128)] partial sums (the total is their sum)."""
    col = jnp.sum(x, axis=0, keepdims=True)
    if col.shape[1] <= LANES:
        return col
    out = col[:, :LANES]
    for k in range(1, col.shape[1] // LANES):
        out = out + col[:, k * LANES : (k + 1) * LANES]
    return out


def last_k(cfg: Config, qi):
    """Last kv tile a causal q tile sees (0 when it sees none)."""
    row = jnp.maximum(qi * cfg.block_q + cfg.block_q - 1 + cfg.shift, 0)
    return jnp.minimum(lax.div(row, jnp.int32(cfg.block_k)), cfg.num_k - 1)  # row >= 0: no sign fix-up


def first_q(cfg: Config, ki):
    """First q tile that sees causal kv tile ki."""
    col = jnp.maximum(ki * cfg.block_k - cfg.shift, 0)
    return jnp.minimum(lax.div(col, jnp.int32(cfg.block_q)), cfg.num_q - 1)


def should_run(cfg: Config, qi, ki):
    if not cfg.causal:
        return True
    return ki * cfg.block_k <= qi * cfg.block_q + cfg.block_q - 1 + cfg.shift


def band_hits(cfg: Config, qi, ki, halo: int = 0):
    """Whether tile (qi, ki), with `halo` rows above it, intersects the band 0 <= (i + shift) - j < W."""
    lo = qi * cfg.block_q - halo + cfg.shift - ki * cfg.block_k - (cfg.block_k - 1)
    hi = qi * cfg.block_q + cfg.block_q - 1 + cfg.shift - ki * cfg.block_k
    return jnp.logical_and(lo < cfg.width, hi >= 0)


def mix_weight(mix, cfg: Config, src: int, dst: int):
    """Scalar weight (src -> dst) of this program's head group.

    mix = (flat [H / G * G * G] SMEM ref, offset of this program's group)."""
    ref, base = mix
    return ref[base + src * cfg.group + dst]


def mix_tiles(tiles, ref, cfg: Config, size: int, transpose: bool = False):
    """out[dst] = sum_src w[src, dst] tiles[src] (transpose: out[src] = sum_dst w[src, dst] tiles[dst]).

    Only pairs inside the same contiguous sub-group of `size` heads carry weight."""
    out = []
    for o in range(cfg.group):
        lo = (o // size) * size
        acc = None
        for t in range(lo, lo + size):
            w = mix_weight(ref, cfg, o, t) if transpose else mix_weight(ref, cfg, t, o)
            acc = w * tiles[t] if acc is None else acc + w * tiles[t]
        out.append(acc)
    return out


# ----------------------------------------------------------------------------------------------------------
# Kernel bodies


def with_halo(r, name: str, halo: int, index=()):
    """Rows of per-row block `name` (at `index`) with the `halo` rows of block name + "_above" on top."""
    main = r[name][index] if index else r[name][...]
    if not halo:
        return main
    above = r[name + "_above"][index] if index else r[name + "_above"][...]
    return jnp.concatenate([above, main], axis=0)


def tile_scores(r, cfg: Config, qi, ki, halo: int = 0):
    """Score tiles of the head group. Returns (s [G x [bq, bk]] pre-mix scores with band, z [G x ...] masked
    logits, visible [bq, bk], offset [bq, bk] = (i + shift) - j). With halo > 0 the tiles also hold the
    `halo` rows above the q tile (blocks qp_above, qseg_above, band_above): [halo + bq, bk]; rows before
    the sequence are hidden."""
    bq, bk = cfg.block_q, cfg.block_k
    shape = (halo + bq, bk)
    local = lax.broadcasted_iota(jnp.int32, shape, 0) + (qi * bq - halo)
    rows = local + cfg.shift
    cols = lax.broadcasted_iota(jnp.int32, shape, 1) + ki * bk
    visible = to_lanes(with_halo(r, "qseg", halo), bk) == r["kvseg"][0:1, :]
    if halo:
        visible = jnp.logical_and(visible, local >= 0)
    if cfg.causal:
        visible = jnp.logical_and(visible, cols <= rows)
    offset = rows - cols
    n_slabs = r["qp"].shape[1]
    s = []
    for t in range(cfg.group):
        acc = None
        for c in range(n_slabs):
            kp = r["kp"][t, c]
            part = lax.dot_general(r["qp"][t, c], kp, NT_DIMS, preferred_element_type=jnp.float32)
            if halo:  # float32 results are whole (8, 128) tiles; bfloat16 halo rows would not be
                above = lax.dot_general(r["qp_above"][t, c], kp, NT_DIMS, preferred_element_type=jnp.float32)
                part = jnp.concatenate([above, part], axis=0)
            acc = part if acc is None else acc + part
        s.append(acc)
    if cfg.width:

        def sub_band(tiles):
            out = []
            for t in range(cfg.group):
                band = with_halo(r, "band", halo, (t,)).astype(jnp.float32)  # [halo + bq, W]
                bias = jnp.zeros(shape, jnp.float32)
                for w in range(cfg.width):
                    bias = jnp.where(offset == w, band[:, w : w + 1], bias)
                out.append(tiles[t] - bias)
            return tuple(out)

        s = list(lax.cond(band_hits(cfg, qi, ki, halo), sub_band, lambda tiles: tuple(tiles), tuple(s)))
    z = mix_tiles(s, r["pre"], cfg, cfg.pre_size) if cfg.pre_size else s
    z = [jnp.where(visible, zt, MASK_VALUE) for zt in z]
    return s, z, visible, offset


def tile_probs(r, z, visible, cfg: Config, halo: int = 0):
    """Normalised P [G x [halo + bq, bk]] from the saved lse (of block lse, with lse_above's rows on top)."""
    return [
        jnp.where(visible, jnp.exp(z[t] - to_lanes(with_halo(r, "lse", halo, (t,)), cfg.block_k)), 0.0)
        for t in range(cfg.group)
    ]


def dropout_keep(r, cfg: Config, qi, ki, num_rows: int | None = None):
    """Per head of the group the [bq, bk] boolean keep mask of tile (qi, ki) (None without dropout):
    mta_jax/dropout.py's hash of (seed of the batch row and head, query position, key position).
    num_rows: rows from the tile's first (default bq; more reach into the next q tile)."""
    if not cfg.dropout_rate:
        return None
    ref, base = r["seeds"]
    bq, bk = cfg.block_q, cfg.block_k
    n = num_rows or bq
    rows = lax.broadcasted_iota(jnp.int32, (n, LANES), 0) + (qi * bq - cfg.q_offset)
    cols = lax.broadcasted_iota(jnp.int32, (n, bk), 1) + (ki * bk - cfg.kv_offset)
    return [
        dropout.keep_bits(to_lanes(dropout.row_hash(ref[base + t], rows), bk), cols, cfg.dropout_rate)
        for t in range(cfg.group)
    ]


def drop(tiles, keep, cfg: Config):
    """Inverted dropout of the G tiles (identity when keep is None)."""
    if keep is None:
        return tiles
    scale = 1.0 / (1.0 - cfg.dropout_rate)
    return [jnp.where(k, x * scale, 0.0) for x, k in zip(tiles, keep, strict=True)]


def post_mix_tiles(p, r, cfg: Config):
    return mix_tiles(p, r["post"], cfg, cfg.post_size) if cfg.post_size else p


def tile_dprobs(r, p, visible, cfg: Config, keep=None):
    """dPf_c = drop(dout_c v_c^T) and dP_b = sum_c post[b, c] dPf_c. Returns (dpf, dp)."""
    v_dtype = r["v"].dtype
    dpf = [
        lax.dot_general(
            r["dout"][t].astype(v_dtype), r["v"][cfg.v_index(t)], NT_DIMS, preferred_element_type=jnp.float32
        )
        for t in range(cfg.group)
    ]
    dpf = drop(dpf, keep, cfg)
    dp = mix_tiles(dpf, r["post"], cfg, cfg.post_size, transpose=True) if cfg.post_size else dpf
    return dpf, dp


def tile_grads(r, s, z, visible, cfg: Config, keep=None):
    """Backward of one tile. Returns (p, pf, dpf, dz, ds) lists over the group; pf is what multiplies
    v (mixed and dropped), dpf the gradient of the mixed probabilities (through the dropout)."""
    p = tile_probs(r, z, visible, cfg)
    pf = drop(post_mix_tiles(p, r, cfg), keep, cfg)
    dpf, dp = tile_dprobs(r, p, visible, cfg, keep)
    dz = [p[t] * (dp[t] - to_lanes(r["delta"][t], cfg.block_k)) for t in range(cfg.group)]
    ds = mix_tiles(dz, r["pre"], cfg, cfg.pre_size, transpose=True) if cfg.pre_size else dz
    return p, pf, dpf, dz, ds


def head_pairs(cfg: Config, size: int):
    """(src, dst) head pairs within the contiguous sub-groups of `size`."""
    return [(a, b) for a in range(cfg.group) for b in range((a // size) * size, (a // size + 1) * size)]


# ----------------------------------------------------------------------------------------------------------
# pallas_call plumbing


def bind_refs(*refs, body, cfg: Config, names: tuple[str, ...]):
    """The kernel: refs by name (SMEM tables with this program's offset), then body(r, cfg, outer, inner)."""
    r = dict(zip(names, refs, strict=True))
    for name in ("pre", "post"):  # program ids are read here, outside any pl.when (interpret mode needs it)
        if name in r:
            r[name] = (r[name], pl.program_id(1) * (cfg.group * cfg.group))
    if "postw" in r:  # flat [H * c_q * c_k] post-conv weights: this program's first head
        r["postw"] = (r["postw"], pl.program_id(1) * (cfg.group * cfg.conv_q * cfg.conv_k))
    if "seeds" in r:  # flat [B * H]: this program's batch row, first head of its group
        r["seeds"] = (r["seeds"], pl.program_id(0) * cfg.heads + pl.program_id(1) * cfg.group)
    body(r, cfg, pl.program_id(2), pl.program_id(3))  # (outer tile, inner tile)


def block_specs(cfg: Config, kv_major: bool):
    """Block specs by operand name; grid (B, H / G, outer, inner)."""
    G, bq, bk = cfg.group, cfg.block_q, cfg.block_k

    def tiles(qi_or_ki, inner):
        if kv_major:
            ki, qi = qi_or_ki, inner
            if cfg.causal:
                qi = jnp.maximum(qi, first_q(cfg, ki))
        else:
            qi, ki = qi_or_ki, inner
            if cfg.causal:
                ki = jnp.minimum(ki, last_k(cfg, qi))
        return qi, ki

    def qmap(nd):
        def index_map(b, g, o, i):
            qi = tiles(o, i)[0]
            return (b, g) + (0,) * (nd - 4) + (qi, 0)

        return index_map

    def kmap(nd):
        def index_map(b, g, o, i):
            ki = tiles(o, i)[1]
            return (b, g) + (0,) * (nd - 4) + (ki, 0)

        return index_map

    def vmap(b, g, o, i):
        return (b, lax.div(g * G, jnp.int32(cfg.kv_rep * cfg.v_heads_per_block)), tiles(o, i)[1], 0)

    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    nv = cfg.v_heads_per_block
    return {
        "qp": lambda shape: pl.BlockSpec((None, G, shape[2], bq, shape[4]), qmap(5)),
        "kp": lambda shape: pl.BlockSpec((None, G, shape[2], bk, shape[4]), kmap(5)),
        "v": lambda shape: pl.BlockSpec((None, nv, bk, shape[3]), vmap),
        "band": lambda shape: pl.BlockSpec((None, G, bq, shape[3]), qmap(4)),
        "qseg": lambda shape: pl.BlockSpec((None, bq, LANES), lambda b, g, o, i: (b, tiles(o, i)[0], 0)),
        "kvseg": lambda shape: pl.BlockSpec((None, SUBLANES, bk), lambda b, g, o, i: (b, 0, tiles(o, i)[1])),
        "pre": lambda shape: smem,
        "post": lambda shape: smem,
        "seeds": lambda shape: smem,
        "q_rows": lambda shape: pl.BlockSpec((None, G, bq, shape[3]), qmap(4)),  # lse, delta, dout, out
        "k_rows": lambda shape: pl.BlockSpec((None, G, bk, shape[3]), kmap(4)),  # dv per query head
        "k_slabs": lambda shape: pl.BlockSpec((None, G, shape[2], bk, shape[4]), kmap(5)),
        "partial": lambda shape: pl.BlockSpec(
            (None, None, None) + tuple(shape[3:]),
            (lambda b, g, o, i: (b, g, i, 0, 0, 0)) if kv_major else (lambda b, g, o, i: (b, g, o, 0, 0, 0)),
        ),
    }


def padded_bytes(shape, dtype) -> int:
    """VMEM bytes of a block: last dim padded to 128 lanes, second-last to 8 sublanes."""
    dims = [d for d in shape if d is not None] or [1]
    dims[-1] = -(-dims[-1] // LANES) * LANES
    if len(dims) > 1:
        dims[-2] = -(-dims[-2] // SUBLANES) * SUBLANES
    return math.prod(dims) * jnp.dtype(dtype).itemsize


def vmem_limit(cfg: Config, blocks, scratch) -> int:
    """Scoped VMEM to ask for: twice the estimate of tpu_tiles.py (double-buffered blocks, scratch,
    live score tiles) for Mosaic's own temporaries, at least 16 MiB, at most 7/8 of the chip's VMEM."""
    need = sum(2 * padded_bytes(shape, dtype) for shape, dtype in blocks)
    need += sum(padded_bytes(shape, dtype) for shape, dtype in scratch)
    need += LIVE_SCORE_TILES * cfg.group * cfg.block_q * cfg.block_k * 4
    return int(min(max(2 * need, 16 * 2**20), cfg.vmem_bytes * 7 // 8))


_SPEC_KIND = {
    "lse": "q_rows",
    "delta": "q_rows",
    "dout": "q_rows",
    "out": "q_rows",
    "delta_out": "q_rows",
    "dband": "band",
    "dq": "qp",
    "dk": "k_slabs",
    "dv": "k_rows",
    "dpre": "partial",
    "dpost": "partial",
}


def run_kernel(mode: str, body, cfg: Config, inputs: dict, outputs: dict, scratch: dict):
    """Runs body(r, cfg, outer, inner) as kernel `mode`. inputs: name -> array (None entries dropped);
    outputs: name -> ShapeDtypeStruct; scratch: name -> (shape, dtype). Returns the outputs as a dict."""
    kv_major = mode == "dkv"
    specs = block_specs(cfg, kv_major)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    in_specs = [specs[_SPEC_KIND.get(k, k)](v.shape) for k, v in inputs.items()]
    out_specs = [specs[_SPEC_KIND.get(k, k)](v.shape) for k, v in outputs.items()]
    outer, inner = (cfg.num_k, cfg.num_q) if kv_major else (cfg.num_q, cfg.num_k)
    batch = next(iter(inputs.values())).shape[0]
    grid = (batch, cfg.heads // cfg.group, outer, inner)
    names = tuple(inputs) + tuple(outputs) + tuple(scratch)
    kernel = functools.partial(bind_refs, body=body, cfg=cfg, names=names)
    arrays = [*inputs.values(), *outputs.values()]
    blocks = [
        (spec.block_shape, a.dtype)
        for spec, a in zip(in_specs + out_specs, arrays, strict=True)
        if spec.block_shape
    ]
    dim = inputs["v"].shape[-1] if "v" in inputs else 0
    results = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM(shape, dtype) for shape, dtype in scratch.values()],
        ),
        out_shape=list(outputs.values()),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=vmem_limit(cfg, blocks, scratch.values()),
        ),
        cost_estimate=cost_estimate(
            mode, cfg, batch, inputs["qp"].shape, dim, grid, in_specs + out_specs, arrays
        ),
        interpret=cfg.interpret,
        name=f"mta_core_{mode}",
    )(*inputs.values())
    return dict(zip(outputs, results, strict=True))


def lane_rows(x: jax.Array) -> jax.Array:
    """[B, H, T] -> [B, H, T, 128] lane-broadcast."""
    return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def base_inputs(qp, kp, v, band, qseg, kvseg, pre, post, seeds) -> dict:
    names = ("qp", "kp", "v", "band", "qseg", "kvseg", "pre", "post", "seeds")
    return dict(zip(names, (qp, kp, v, band, qseg, kvseg, pre, post, seeds), strict=True))
