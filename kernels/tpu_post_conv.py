"""Forward of the fused core op with the post-softmax key-query conv, on the TPU (Mosaic).

The plan is docs/post_conv_kernels.md. Two passes: tpu_fwd.py's lse kernel, then `_fwd_post_conv`, on the
grid (B, H / G, q tiles, kv tiles + 1). At kv step s a program computes the normalised P0 of key tile s
on its q tile's rows and on the `halo` rows above them (Config.halo: c_q - 1 rounded up to 8) and keeps
it in a 3-slot VMEM ring; then it finishes key tile s - 1, one step late, because the conv reads that
tile's neighbours on both sides:

    Pc[i, j] = visible(i, j) * sum_{u, c} W[c_q - 1 - u, c] * m_u(i) * P0[i - u, j - pl + c]

(m_u(i): row i - u lies in row i's document). Key shifts are lane rotations (pltpu.roll) with the
wrapped lanes taken from the neighbouring tile, row shifts sublane rotations of the halo'd tile. Then
the post mix, dropout and Pf V with v of tile s - 1. The backward is tpu_post_conv_bwd.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import tpu_common as tc
from kernels.tpu_common import LANES, SUBLANES, Config
from kernels.tpu_cost import cost_estimate
from kernels.tpu_fwd import fwd_online

RING = 3  # P0 of key tiles s - 2, s - 1 and s


def shift_keys(cur, left, right, e: int, bk: int):
    """out[:, j] = P0[:, j + e] of tile `cur`, reading `left` / `right` (its neighbours) past its edges."""
    if e == 0:
        return cur
    lane = lax.broadcasted_iota(jnp.int32, cur.shape, 1)
    shift = (-e) % bk
    if e < 0:
        return jnp.where(lane + e < 0, pltpu.roll(left, shift, 1), pltpu.roll(cur, shift, 1))
    return jnp.where(lane + e >= bk, pltpu.roll(right, shift, 1), pltpu.roll(cur, shift, 1))


def shift_rows(x, u: int, halo: int, bq: int):
    """out[i] = x[halo + i - u] for i < bq (x holds `halo` rows above the tile's bq rows)."""
    shift = (u - halo) % x.shape[0]
    return (pltpu.roll(x, shift, 0) if shift else x)[:bq]


def ring_tiles(r, slots):
    """tiles(t) -> P0 of head t of key tiles (s - 2, s - 1, s) from their ring slots."""
    return lambda t: tuple(r["ring"][slot, t] for slot in slots)


def same_doc_rows(r, cfg: Config) -> list:
    """[None] + [bq, bk] masks m_u(i): query row i - u is in row i's document (u = 1 .. c_q - 1)."""
    bq, bk, halo = cfg.block_q, cfg.block_k, cfg.halo
    seg = tc.with_halo(r, "qseg", halo)  # [halo + bq, 128]
    own = tc.to_lanes(r["qseg"][...], bk)
    return [None] + [tc.to_lanes(shift_rows(seg, u, halo, bq), bk) == own for u in range(1, cfg.conv_q)]


def post_conv_tiles(r, cfg: Config, tiles) -> list:
    """The post conv of a key tile for every head of the group: G x [bq, bk], not re-masked.
    tiles(t) -> P0 [halo + bq, bk] of head t on the key tiles (left neighbour, the tile, right neighbour)."""
    bq, bk, halo = cfg.block_q, cfg.block_k, cfg.halo
    c_q, c_k = cfg.conv_q, cfg.conv_k
    ref, base = r["postw"]
    same_doc = same_doc_rows(r, cfg)
    out = []
    for t in range(cfg.group):
        p_left, p_cur, p_right = tiles(t)
        by_row = [None] * c_q  # by_row[u] = sum_c W[c_q - 1 - u, c] P0[., j - pl + c]
        for c in range(c_k):
            shifted = shift_keys(p_cur, p_left, p_right, c - cfg.conv_left, bk)
            for u in range(c_q):
                w = ref[base + (t * c_q + c_q - 1 - u) * c_k + c]
                by_row[u] = w * shifted if by_row[u] is None else by_row[u] + w * shifted
        acc = None
        for u in range(c_q):
            part = shift_rows(by_row[u], u, halo, bq)
            if u:
                part = jnp.where(same_doc[u], part, 0.0)
            acc = part if acc is None else acc + part
        out.append(acc)
    return out


def _visible(r, cfg: Config, qi, ki):
    """[bq, bk] visibility of tile (qi, ki), the key tile's segment ids in block kvseg_out."""
    bq, bk = cfg.block_q, cfg.block_k
    visible = tc.to_lanes(r["qseg"][...], bk) == r["kvseg_out"][0:1, :]
    if cfg.causal:
        rows = lax.broadcasted_iota(jnp.int32, (bq, bk), 0) + (qi * bq + cfg.shift)
        cols = lax.broadcasted_iota(jnp.int32, (bq, bk), 1) + ki * bk
        visible = jnp.logical_and(visible, cols <= rows)
    return visible


def _fwd_post_conv(r, cfg: Config, qi, s):
    """Kv step s: P0 of key tile s into the ring, then Pc, the mix, dropout and Pf V of key tile s - 1."""
    new_slot = lax.rem(s, RING)

    @pl.when(s == 0)
    def _init():
        r["out"][...] = jnp.zeros(r["out"].shape, jnp.float32)
        r["ring"][...] = jnp.zeros(r["ring"].shape, jnp.float32)

    computes = jnp.logical_and(s < cfg.num_k, tc.should_run(cfg, qi, s))

    @pl.when(computes)
    def _new_tile():
        _, z, visible, _ = tc.tile_scores(r, cfg, qi, s, halo=cfg.halo)
        p = tc.tile_probs(r, z, visible, cfg, halo=cfg.halo)
        for t in range(cfg.group):
            r["ring"][new_slot, t] = p[t]

    @pl.when(jnp.logical_and(s > 0, jnp.logical_not(computes)))
    def _no_tile():  # past the last key tile, or hidden by causality: P0 is 0 there
        r["ring"][new_slot] = jnp.zeros(r["ring"].shape[1:], jnp.float32)

    done = s - 1

    @pl.when(jnp.logical_and(s > 0, tc.should_run(cfg, qi, done)))
    def _finish():
        pc = post_conv_tiles(r, cfg, ring_tiles(r, (lax.rem(s + 1, RING), lax.rem(s + 2, RING), new_slot)))
        visible = _visible(r, cfg, qi, done)
        pf = tc.post_mix_tiles([jnp.where(visible, x, 0.0) for x in pc], r, cfg)
        pf = tc.drop(pf, tc.dropout_keep(r, cfg, qi, done), cfg)
        for t in range(cfg.group):
            v = r["v"][cfg.v_index(t)]
            r["out"][t] += lax.dot_general(
                pf[t].astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )


def _block_specs(cfg: Config, shapes: dict) -> dict:
    """Block specs of the post-conv forward by operand name; grid (B, H / G, q tiles, kv tiles + 1)."""
    G, bq, bk, halo = cfg.group, cfg.block_q, cfg.block_k, cfg.halo

    def clamp(ki, qi):
        ki = jnp.minimum(ki, cfg.num_k - 1)
        return jnp.minimum(ki, tc.last_k(cfg, qi)) if cfg.causal else ki

    def new(qi, s):  # the key tile whose P0 step s computes
        return clamp(s, qi)

    def done(qi, s):  # the key tile step s finishes
        return clamp(jnp.maximum(s - 1, 0), qi)

    def heads(rows, tile_of, nd):
        def index_map(b, g, qi, s):
            return (b, g) + (0,) * (nd - 4) + (tile_of(qi, s), 0)

        return lambda shape: pl.BlockSpec((None, G, *shape[2:-2], rows, shape[-1]), index_map)

    def vmap(b, g, qi, s):
        return (b, lax.div(g * G, jnp.int32(cfg.kv_rep * cfg.v_heads_per_block)), done(qi, s), 0)

    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    # The *_above arrays are halo_rows': block qi holds the rows above q tile qi.
    specs = {
        "qp": heads(bq, lambda qi, s: qi, 5),
        "qp_above": heads(halo, lambda qi, s: qi, 5),
        "kp": heads(bk, new, 5),
        "v": lambda shape: pl.BlockSpec((None, cfg.v_heads_per_block, bk, shape[3]), vmap),
        "band": heads(bq, lambda qi, s: qi, 4),
        "band_above": heads(halo, lambda qi, s: qi, 4),
        "lse": heads(bq, lambda qi, s: qi, 4),
        "lse_above": heads(halo, lambda qi, s: qi, 4),
        "out": heads(bq, lambda qi, s: qi, 4),
        "qseg": lambda shape: pl.BlockSpec((None, bq, LANES), lambda b, g, qi, s: (b, qi, 0)),
        "qseg_above": lambda shape: pl.BlockSpec((None, halo, LANES), lambda b, g, qi, s: (b, qi, 0)),
        "kvseg": lambda shape: pl.BlockSpec((None, SUBLANES, bk), lambda b, g, qi, s: (b, 0, new(qi, s))),
        "kvseg_out": lambda shape: pl.BlockSpec(
            (None, SUBLANES, bk), lambda b, g, qi, s: (b, 0, done(qi, s))
        ),
    }
    return {name: (specs[name](shape) if name in specs else smem) for name, shape in shapes.items()}


def halo_rows(x: jax.Array, *, block: int, halo: int, axis: int, below: bool = False) -> jax.Array:
    """The `halo` rows above (or below) each `block`-row tile of x along `axis`, tile after tile:
    [..., T / block * halo, ...], zeros past the sequence's ends. A separate small array, because a
    Mosaic call given one array twice makes XLA copy it."""
    length = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, block) if below else (halo, 0)
    padded = jnp.pad(x, pad)
    start = block if below else 0
    rows = lax.slice_in_dim(padded, start, start + length, axis=axis)
    tiles = rows.reshape(*x.shape[:axis], length // block, block, *x.shape[axis + 1 :])
    taken = lax.slice_in_dim(tiles, 0, halo, axis=axis + 1)
    return taken.reshape(*x.shape[:axis], length // block * halo, *x.shape[axis + 1 :])


def forward_post_conv(cfg: Config, qp, kp, v, band, qseg, kvseg, pre, post, seeds, postw):
    """out [B, H, T, D] float32 and lse [B, H, T, 128] of the core op with the post conv; postw is the
    flat [H * c_q * c_k] float32 conv kernel."""
    batch, heads, n_slabs, q_len, _ = qp.shape
    dim = v.shape[-1]
    f32 = jnp.float32
    rows = (cfg.group, cfg.block_q)
    inputs = tc.base_inputs(qp, kp, v, band, qseg, kvseg, pre, post, seeds)
    lse_sds = jax.ShapeDtypeStruct((batch, heads, q_len, LANES), f32)
    stats = {"m": ((*rows, LANES), f32), "l": ((*rows, LANES), f32)}
    lse = tc.run_kernel(
        "lse", fwd_online, cfg, {**inputs, "v": None, "seeds": None}, {"lse": lse_sds}, stats
    )["lse"]

    inputs = {**inputs, "lse": lse, "postw": postw, "kvseg_out": kvseg}
    if cfg.halo:
        above = functools.partial(halo_rows, block=cfg.block_q, halo=cfg.halo)
        inputs.update(
            qp_above=above(qp, axis=3), qseg_above=above(qseg, axis=1), lse_above=above(lse, axis=2)
        )
        inputs["band_above"] = None if band is None else above(band, axis=2)
    inputs = {k: x for k, x in inputs.items() if x is not None}
    outputs = {"out": jax.ShapeDtypeStruct((batch, heads, q_len, dim), f32)}
    scratch = {"ring": ((RING, cfg.group, cfg.halo + cfg.block_q, cfg.block_k), f32)}
    specs = _block_specs(cfg, {k: x.shape for k, x in {**inputs, **outputs}.items()})
    grid = (batch, heads // cfg.group, cfg.num_q, cfg.num_k + 1)
    res = call_kernel("fwd_post_conv", _fwd_post_conv, cfg, grid, specs, inputs, outputs, scratch)
    return res["out"], lse


def call_kernel(mode: str, body, cfg: Config, grid, specs: dict, inputs: dict, outputs: dict, scratch: dict):
    """pallas_call of body(r, cfg, outer, inner) over `grid`, with VMEM for the conv's live tiles on top of
    tpu_common's estimate. Returns the outputs by name."""
    names = tuple(inputs) + tuple(outputs) + tuple(scratch)
    arrays = {**inputs, **outputs}
    blocks = [(specs[k].block_shape, x.dtype) for k, x in arrays.items() if specs[k].block_shape]
    # The conv keeps c_q row sums and a few shifted copies of one head's halo'd tile live.
    conv_tiles = (cfg.conv_q + 4) * (2 * cfg.halo + cfg.block_q) * cfg.block_k * 4
    limit = min(tc.vmem_limit(cfg, blocks, scratch.values()) + 2 * conv_tiles, cfg.vmem_bytes * 7 // 8)
    results = pl.pallas_call(
        lambda *refs: tc.bind_refs(*refs, body=body, cfg=cfg, names=names),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=grid,
            in_specs=[specs[k] for k in inputs],
            out_specs=[specs[k] for k in outputs],
            scratch_shapes=[pltpu.VMEM(shape, dtype) for shape, dtype in scratch.values()],
        ),
        out_shape=list(outputs.values()),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"), vmem_limit_bytes=int(limit)
        ),
        cost_estimate=cost_estimate(
            mode, cfg, inputs["qp"].shape[0], inputs["qp"].shape, inputs["v"].shape[-1], grid,
            [specs[k] for k in arrays], list(arrays.values()),
        ),
        interpret=cfg.interpret,
        name=f"mta_core_{mode}",
    )(*inputs.values())
    return dict(zip(outputs, results, strict=True))
