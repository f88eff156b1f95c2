"""What the GPU (Triton) kernels share: tile sizes, the static config, validation and tile-level helpers.

The kernels (triton_fwd.py, triton_bwd.py) compute kernels/core_reference.py's core op. Each program owns
one tile of rows (queries in the forward and dQ kernels, keys in dK/dV) of one head group of G heads and
loops over the tiles of the other axis. The C*Dk-wide QK contraction runs as a loop over the C slabs
(`qk_tile`), so only one q slab and one kp slab tile per pipeline stage sit in shared memory. The backward
kernels' accumulators are C*Dk wide too ([rows, C*Dk] per head); a program keeps `slab_chunk` slabs of them
in registers and the slab chunks are spread over the grid (each program recomputes the score tiles).
How big each of these is, and which tiles fit a GPU, is triton_tiles.py's resource model.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.core_reference import MASK_VALUE
from mta_jax import dropout

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """Tile sizes and launch options of one Triton kernel.

    block_q, block_k: rows of the query / key tiles (powers of two, >= 16).
    num_warps: warps per program; num_stages: software-pipelining depth of the streamed loads.
    slab_chunk: slabs of the C-wide accumulators one program keeps (backward kernels; must divide C;
    0 = all C). The forward has no C-wide accumulator and ignores it.
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    slab_chunk: int = 0

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value} is invalid: must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} is invalid: must be 1, 2, 4, 8 or 16")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} is invalid: must be >= 1")
        if self.slab_chunk < 0:
            raise ValueError(f"slab_chunk={self.slab_chunk} is invalid: must be >= 0")

    def chunk(self, slabs: int) -> int:
        """Slabs per program for C = slabs."""
        chunk = self.slab_chunk or slabs
        if slabs % chunk:
            raise ValueError(f"slab_chunk={chunk} is invalid: must divide the C={slabs} slabs")
        return chunk


@dataclasses.dataclass(frozen=True)
class TritonBlockSizes:
    """Tiles of the forward (also the lse pass with post-softmax mixing), dQ and dK/dV kernels."""

    fwd: KernelTiles = KernelTiles()
    dq: KernelTiles = KernelTiles()
    dkv: KernelTiles = KernelTiles()

    def with_blocks(self, block_q: int | None, block_k: int | None) -> TritonBlockSizes:
        """The same tiles with block_q / block_k replaced in every kernel (None keeps them)."""

        def replace(tiles: KernelTiles) -> KernelTiles:
            return dataclasses.replace(
                tiles, block_q=block_q or tiles.block_q, block_k=block_k or tiles.block_k
            )

        return TritonBlockSizes(replace(self.fwd), replace(self.dq), replace(self.dkv))

    def max_blocks(self) -> tuple[int, int]:
        """(largest block_q, largest block_k): T and S are padded to multiples of these."""
        kernels = (self.fwd, self.dq, self.dkv)
        return max(t.block_q for t in kernels), max(t.block_k for t in kernels)


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Static shapes and options of one kernel launch."""

    causal: bool
    tiles: KernelTiles
    q_len: int
    kv_len: int
    width: int  # band width W, 0 without a band
    slabs: int  # C
    group: int  # G
    has_pre: bool
    has_post: bool
    rep: int  # H / Hkv
    interpret: bool
    dropout_rate: float = 0.0  # attention dropout (0: none); the mask hashes mta_jax/dropout.py's way
    q_offset: int = 0  # rows padded in front of the queries: row r is query position r - q_offset
    kv_offset: int = 0  # the same for the keys

    @property
    def block_q(self) -> int:
        return self.tiles.block_q

    @property
    def block_k(self) -> int:
        return self.tiles.block_k

    @property
    def chunk(self) -> int:
        """Slabs of the C-wide accumulators per program."""
        return self.tiles.chunk(self.slabs)

    @property
    def num_chunks(self) -> int:
        return self.slabs // self.chunk

    @property
    def shift(self) -> int:
        """S - T: query row i sits at key position i + S - T."""
        return self.kv_len - self.q_len

    @property
    def params(self) -> pltriton.CompilerParams:
        return pltriton.CompilerParams(num_warps=self.tiles.num_warps, num_stages=self.tiles.num_stages)


# ----------------------------------------------------------------------------------------------------------
# Validation and XLA glue


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _mix_size(mix: jax.Array | None, heads: int, name: str) -> int:
    """Group size c of a [H / c, c, c] mix (1 when None)."""
    if mix is None:
        return 1
    if mix.ndim != 3 or mix.shape[1] != mix.shape[2] or mix.shape[0] * mix.shape[1] != heads:
        raise ValueError(f"{name} must have shape [H / c, c, c] with H = {heads}, got {mix.shape}")
    return mix.shape[1]


def validate(qp, kp, v, band, pre_mix, post_mix, blocks: TritonBlockSizes) -> tuple[int, int]:
    """Raise ValueError for unsupported shapes and tiles; return (W, G)."""
    batch, heads, slabs, q_len, dk = qp.shape
    kv_len, d = kp.shape[3], v.shape[3]
    if kp.shape != (batch, heads, slabs, kv_len, dk):
        raise ValueError(f"kp must have shape {(batch, heads, slabs, '*', dk)}, got {kp.shape}")
    if v.ndim != 4 or v.shape[0] != batch or v.shape[2] != kv_len or heads % v.shape[1]:
        raise ValueError(f"v must have shape [B, Hkv, S, D] with H % Hkv == 0, got {v.shape}")
    block_q, block_k = blocks.max_blocks()
    if q_len % block_q:
        raise ValueError(f"block_q={block_q} must divide T={q_len}")
    if kv_len % block_k:
        raise ValueError(f"block_k={block_k} must divide S={kv_len}")
    if dk % 16:
        raise ValueError(f"Dk must be a multiple of 16, got Dk={dk}")
    if d % 16:
        raise ValueError(f"D must be a multiple of 16, got D={d}")
    for tiles in (blocks.dq, blocks.dkv):
        tiles.chunk(slabs)
    width = 0
    if band is not None:
        width = band.shape[3]
        if band.shape != (batch, heads, q_len, width):
            raise ValueError(f"band must have shape [B, H, T, W], got {band.shape}")
        smallest = min(t.block_k for t in (blocks.fwd, blocks.dq, blocks.dkv))
        if width > smallest:
            raise ValueError(f"band width W={width} must be <= block_k={smallest}")
    c_pre, c_post = _mix_size(pre_mix, heads, "pre_mix"), _mix_size(post_mix, heads, "post_mix")
    group = max(c_pre, c_post)
    if group % min(c_pre, c_post):
        raise ValueError(f"mix group sizes must divide each other, got pre_mix {c_pre} and post_mix {c_post}")
    return width, group


def widen_mix(mix: jax.Array | None, group: int) -> jax.Array | None:
    """[H / c, c, c] -> block-diagonal [H / G, G, G] float32 (G a multiple of c)."""
    if mix is None:
        return None
    size = mix.shape[1]
    blocks = group // size
    grouped = mix.astype(jnp.float32).reshape(-1, blocks, size, size)
    wide = jnp.einsum("gpxy,pq->gpxqy", grouped, jnp.eye(blocks, dtype=jnp.float32))
    return wide.reshape(-1, group, group)


def unpack(cfg: Cfg, refs, names: list[str]) -> dict:
    """Map a kernel's positional refs to names; names the configuration leaves out map to None."""
    present = {"band": cfg.width > 0, "pre": cfg.has_pre, "post": cfg.has_post}
    present.update({"dband": cfg.width > 0, "dpre": cfg.has_pre, "dpost": cfg.has_post})
    present.update({"delta_in": not cfg.has_post, "delta_out": cfg.has_post, "seeds": cfg.dropout_rate > 0})
    out, it = {}, iter(refs)
    for name in names:
        out[name] = next(it) if present.get(name, True) else None
    if next(it, None) is not None:
        raise AssertionError("unused refs")
    return out


# ----------------------------------------------------------------------------------------------------------
# Tile-level pieces (traced inside the kernels)


def load_mix(ref) -> list[list[jax.Array]] | None:
    """[G, G] mix block -> nested list of scalars m[a][h] (a = source head, h = target head)."""
    if ref is None:
        return None
    group = ref.shape[0]
    return [[ref[a, h] for h in range(group)] for a in range(group)]


def apply_mix(tiles: list[jax.Array], mix) -> list[jax.Array]:
    """out[h] = sum_a mix[a][h] tiles[a]; identity when mix is None."""
    if mix is None:
        return tiles
    return [sum(tiles[a] * mix[a][h] for a in range(len(tiles))) for h in range(len(tiles))]


def apply_mix_t(tiles: list[jax.Array], mix) -> list[jax.Array]:
    """out[a] = sum_h mix[a][h] tiles[h] (the transpose of apply_mix); identity when mix is None."""
    if mix is None:
        return tiles
    return [sum(tiles[h] * mix[a][h] for h in range(len(tiles))) for a in range(len(tiles))]


def load_seeds(ref) -> list[jax.Array] | None:
    """[G] int32 block of dropout seeds (this batch row, the group's heads) -> G scalars."""
    if ref is None:
        return None
    return [ref[h] for h in range(ref.shape[0])]


def dropout_keep(cfg: Cfg, seeds, q_start, k_start) -> list[jax.Array] | None:
    """Per head the [bq, bk] boolean keep mask of the tile at (q_start, k_start) (None without
    dropout): mta_jax/dropout.py's hash of (seed, query position, key position)."""
    if seeds is None:
        return None
    rows = q_start + jnp.arange(cfg.block_q, dtype=jnp.int32) - cfg.q_offset
    cols = k_start + jnp.arange(cfg.block_k, dtype=jnp.int32) - cfg.kv_offset
    return [
        dropout.keep_bits(dropout.row_hash(seed, rows)[:, None], cols[None, :], cfg.dropout_rate)
        for seed in seeds
    ]


def drop(tiles: list[jax.Array], keep, cfg: Cfg) -> list[jax.Array]:
    """Inverted dropout of the G tiles (identity when keep is None)."""
    if keep is None:
        return tiles
    scale = 1.0 / (1.0 - cfg.dropout_rate)
    return [jnp.where(k, x * scale, 0.0) for x, k in zip(tiles, keep, strict=True)]


def offsets(cfg: Cfg, q_start, k_start) -> jax.Array:
    """[bq, bk] int32: (i + S - T) - j for the tile's rows i and columns j."""
    rows = q_start + cfg.shift + jnp.arange(cfg.block_q, dtype=jnp.int32)
    cols = k_start + jnp.arange(cfg.block_k, dtype=jnp.int32)
    return rows[:, None] - cols[None, :]


def visible(cfg: Cfg, q_ids, kv_ids, offs) -> jax.Array:
    """[bq, bk] bool from the tile's segment ids [bq], [bk] and offsets."""
    vis = q_ids[:, None] == kv_ids[None, :]
    if cfg.causal:
        vis = jnp.logical_and(vis, offs >= 0)
    return vis


def qk_tile(cfg: Cfg, load_q, load_k) -> jax.Array:
    """[bq, bk] float32 sum over the C slabs of load_q(c) [bq, Dk] . load_k(c) [bk, Dk]^T.

    A loop (not unrolled), so the pipeliner keeps num_stages slab tiles in shared memory, not C of them.
    """
    if cfg.slabs == 1:
        return pltriton.dot(load_q(0), load_k(0), trans_b=True)

    def body(c, acc):
        return acc + pltriton.dot(load_q(c), load_k(c), trans_b=True)

    init = jnp.zeros((cfg.block_q, cfg.block_k), jnp.float32)
    return lax.fori_loop(0, cfg.slabs, body, init)


def resident(cfg: Cfg, load):
    """load(a, c) for the program's own tile (q rows in the forward and dQ, k rows in dK/dV): with one
    slab the G tiles are loaded once, before the loop over the other axis; with several they are re-read
    slab by slab inside it (C slab tiles per head would not fit)."""
    if cfg.slabs > 1:
        return load
    tiles = [load(a, 0) for a in range(cfg.group)]
    return lambda a, c: tiles[a]


def band_tile(cfg: Cfg, band_ref, head: int, row0, offs) -> jax.Array:
    """The band correction of one [bq, bk] tile from band_ref [G, rows, W] (float32): entry (i, j) is
    band[head, row0 + i, offs[i, j]] where 0 <= offs < W, else 0 (W column loads and selects)."""
    rows = pl.ds(row0, cfg.block_q)
    bias = jnp.zeros((cfg.block_q, cfg.block_k), jnp.float32)
    for d in range(cfg.width):
        bias = jnp.where(offs == d, band_ref[head, rows, d][:, None], bias)
    return bias


def scatter_band(cfg: Cfg, dband_ref, head: int, offs, grad) -> None:
    """dband[head, i, offs[i, j]] = grad[i, j] for the tile's in-band entries (each (i, d) has one j).

    dband_ref is block_k wide: a row's offsets in one tile are block_k consecutive integers, so
    offs mod block_k addresses each entry once (no two lanes of a store share an address, which the
    interpreter's masked scatter needs), and offsets 0 <= d < W land in column d.
    """
    inside = jnp.logical_and(offs >= 0, offs < cfg.width)
    rows = lax.broadcasted_iota(jnp.int32, offs.shape, 0)
    cols = lax.rem(offs + cfg.block_k * (1 + cfg.block_q // cfg.block_k + 1), cfg.block_k)
    pltriton.store(dband_ref.at[head, rows, cols], grad, mask=inside)


def scores(cfg: Cfg, load_q, load_k, load_band, in_band) -> list[jax.Array]:
    """The G raw score tiles s[a] [bq, bk] float32: QK over C slabs, minus the band where in_band.

    load_q(a, c), load_k(a, c): slab c of head a; load_band(a): head a's band tile [bq, bk].
    in_band: False (no band at all) or a traced bool, true on the tiles the band touches.
    """
    tiles = [qk_tile(cfg, lambda c, a=a: load_q(a, c), lambda c, a=a: load_k(a, c)) for a in range(cfg.group)]
    if in_band is False:
        return tiles

    def with_band():
        return tuple(s - load_band(a) for a, s in enumerate(tiles))

    return list(lax.cond(in_band, with_band, lambda: tuple(tiles)))


def loop(cfg: Cfg, start, band_lo, band_hi, end, body, carry):
    """Run body(t, carry, in_band) over tiles [start, end), in_band = band_lo <= t < band_hi (or False)."""
    if not cfg.width:
        return lax.fori_loop(start, end, lambda t, c: body(t, c, False), carry)
    return lax.fori_loop(
        start, end, lambda t, c: body(t, c, jnp.logical_and(t >= band_lo, t < band_hi)), carry
    )


def _div_tiles(x, block: int, above: int = 0):
    """floor(max(x, 0) / block), plus `above` unless x < 0 (then 0): a tile index, or with above=1 a count."""
    q = lax.div(jnp.maximum(x, 0), jnp.int32(block))
    if above:
        return jnp.where(x < 0, 0, q + above)
    return q


def kv_tiles_for_q(cfg: Cfg, q_start):
    """(end, band_lo, band_hi) kv-tile bounds for the q tile starting at q_start."""
    n_kv = cfg.kv_len // cfg.block_k
    last_col = q_start + cfg.block_q - 1 + cfg.shift  # rightmost causally visible column of the tile
    end = jnp.minimum(_div_tiles(last_col, cfg.block_k, 1), n_kv) if cfg.causal else jnp.int32(n_kv)
    band_lo = _div_tiles(q_start + cfg.shift - (cfg.width - 1), cfg.block_k)
    band_hi = _div_tiles(last_col, cfg.block_k, 1)
    return end, band_lo, band_hi


def q_tiles_for_kv(cfg: Cfg, k_start):
    """(start, band_lo, band_hi) q-tile bounds for the kv tile starting at k_start."""
    first_row = k_start - cfg.shift  # first row that sees column k_start causally
    start = _div_tiles(first_row, cfg.block_q) if cfg.causal else jnp.int32(0)
    last_row = k_start + cfg.block_k - 1 + cfg.width - 1 - cfg.shift
    return start, _div_tiles(first_row, cfg.block_q), _div_tiles(last_row, cfg.block_q, 1)


def softmax_tiles(scores_: list[jax.Array], pre, vis) -> list[jax.Array]:
    """Mixed, base-2 scaled and masked logits zl[h] [bq, bk]."""
    return [jnp.where(vis, z * LOG2E, MASK_VALUE) for z in apply_mix(scores_, pre)]


def probs(zl, lse2, vis):
    """Normalised probabilities P = 2^(zl - lse2), 0 where invisible."""
    return jnp.where(vis, jnp.exp2(zl - lse2[:, None]), 0.0)


def program_heads(cfg: Cfg, num_chunks: int = 1):
    """(first head of this program's group, its slab chunk) from the grid's third axis."""
    index = pl.program_id(2)
    if num_chunks == 1:
        return index * cfg.group, 0
    return lax.div(index, num_chunks) * cfg.group, lax.rem(index, num_chunks)
