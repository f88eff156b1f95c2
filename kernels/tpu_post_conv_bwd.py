"""Backward of the fused core op with the post-softmax conv, on the TPU (Mosaic).

First version: each program recomputes what its tile's halo needs from the neighbouring key tiles
t - 1 and t + 1 instead of carrying it through rings (docs/post_conv_kernels.md plans those). With
dPm = drop(dout V^T) and dPcm = visible * Mix_post^T(dPm):

- dPcm of the three key tiles over the q tile's rows and the `halo` rows below it gives, by the
  transposed conv, dP0 on the tile: dP0[i, j] = sum_{u,c} W[c_q-1-u, c] m_u(i + u) dPcm[i + u, j + pl - c];
- delta (q tiles outer): delta_i = sum_j P0 dP0;
- dQ (q tiles outer): dz = P0 (dP0 - delta), dS, then dq and the band's and pre mix's gradients
  (tpu_bwd.accumulate_dq);
- dK/dV (kv tiles outer): also P0 of the three key tiles with the `halo` rows above, for Pc as in the
  forward: dv = Pf^T dout, the post mix's and the conv kernel's partial gradients, and dk from dS.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import tpu_common as tc
from kernels.tpu_bwd import accumulate_dk, accumulate_dq, delta_kernel, mix_gradient
from kernels.tpu_common import LANES, NT_DIMS, SUBLANES, TN_DIMS, Config
from kernels.tpu_post_conv import call_kernel, halo_rows, post_conv_tiles, same_doc_rows, shift_keys

SIDES = (("_left", -1), ("", 0), ("_right", 1))  # block-name suffix and key-tile offset


def _valid_tile(cfg: Config, kj):
    return jnp.logical_and(kj >= 0, kj < cfg.num_k)


def _dpcm(r, cfg: Config, qi, kj, suffix: str):
    """dPm and dPcm of key tile kj (blocks v / kvseg + suffix) over the q tile's rows and the `halo`
    rows below: G x [bq + halo, bk] each."""
    bq, bk, halo = cfg.block_q, cfg.block_k, cfg.halo
    n = bq + halo
    local = lax.broadcasted_iota(jnp.int32, (n, bk), 0) + qi * bq
    cols = lax.broadcasted_iota(jnp.int32, (n, bk), 1) + kj * bk
    seg = tc.to_lanes(_with_below(r, "qseg", halo), bk)
    visible = jnp.logical_and(seg == r["kvseg" + suffix][0:1, :], local < cfg.q_len)
    visible = jnp.logical_and(visible, _valid_tile(cfg, kj))
    if cfg.causal:
        visible = jnp.logical_and(visible, cols <= local + cfg.shift)
    v = r["v" + suffix]
    dpf = [
        lax.dot_general(
            _with_below(r, "dout", halo, (t,)).astype(v.dtype), v[cfg.v_index(t)], NT_DIMS,
            preferred_element_type=jnp.float32,
        )
        for t in range(cfg.group)
    ]  # fmt: skip
    dpm = tc.drop(dpf, tc.dropout_keep(r, cfg, qi, kj, num_rows=n), cfg)
    dpc = tc.mix_tiles(dpm, r["post"], cfg, cfg.post_size, transpose=True) if cfg.post_size else dpm
    return dpm, [jnp.where(visible, x, 0.0) for x in dpc]


def _with_below(r, name: str, halo: int, index=()):
    """Rows of per-row block `name` with the `halo` rows of block name + "_below" under them."""
    main = r[name][index] if index else r[name][...]
    if not halo:
        return main
    below = r[name + "_below"][index] if index else r[name + "_below"][...]
    return jnp.concatenate([main, below], axis=0)


def _conv_transpose(r, cfg: Config, dpcm: dict) -> list:
    """dP0 [bq, bk] per head from dPcm of the key tiles {suffix: G x [bq + halo, bk]}."""
    bq, bk, halo = cfg.block_q, cfg.block_k, cfg.halo
    c_q, c_k = cfg.conv_q, cfg.conv_k
    n = bq + halo
    ref, base = r["postw"]
    seg = _with_below(r, "qseg", halo)  # [bq + halo, 128]
    own = tc.to_lanes(r["qseg"][...], bk)

    def up(x, u):  # out[i] = x[i + u], i < bq
        return (pltpu.roll(x, (-u) % n, 0) if u else x)[:bq]

    same_doc = [None] + [tc.to_lanes(up(seg, u), bk) == own for u in range(1, c_q)]
    out = []
    for t in range(cfg.group):
        left, cur, right = (dpcm[s][t] for s, _ in SIDES)
        by_row = [None] * c_q
        for c in range(c_k):
            shifted = shift_keys(cur, left, right, cfg.conv_left - c, bk)
            for u in range(c_q):
                w = ref[base + (t * c_q + c_q - 1 - u) * c_k + c]
                by_row[u] = w * shifted if by_row[u] is None else by_row[u] + w * shifted
        acc = None
        for u in range(c_q):
            part = up(by_row[u], u)
            if u:
                part = jnp.where(same_doc[u], part, 0.0)
            acc = part if acc is None else acc + part
        out.append(acc)
    return out


def _tile_dp(r, cfg: Config, qi, ki, p=None, visible=None):
    """dP0 [bq, bk] per head of tile (qi, ki): the transposed conv of dPcm on it and its neighbours."""
    return _conv_transpose(r, cfg, {s: _dpcm(r, cfg, qi, ki + d, s)[1] for s, d in SIDES})


def _tile_dz(r, cfg: Config, qi, ki, p):
    """dz = P0 (dP0 - delta) and dS of tile (qi, ki), given its P0 [bq, bk] per head."""
    dp = _tile_dp(r, cfg, qi, ki)
    dz = [p[t] * (dp[t] - tc.to_lanes(r["delta"][t], cfg.block_k)) for t in range(cfg.group)]
    ds = tc.mix_tiles(dz, r["pre"], cfg, cfg.pre_size, transpose=True) if cfg.pre_size else dz
    return dp, dz, ds


_delta = delta_kernel(_tile_dp)


def _dq(r, cfg: Config, qi, ki):
    @pl.when(ki == 0)
    def _init():
        for name in ("dq_acc", "dband", "dpre"):
            if name in r:
                r[name][...] = jnp.zeros(r[name].shape, r[name].dtype)

    @pl.when(tc.should_run(cfg, qi, ki))
    def _run():
        s, z, visible, offset = tc.tile_scores(r, cfg, qi, ki)
        p = tc.tile_probs(r, z, visible, cfg)
        _, dz, ds = _tile_dz(r, cfg, qi, ki, p)
        accumulate_dq(r, cfg, qi, ki, s, dz, ds, offset)

    @pl.when(ki == cfg.num_k - 1)
    def _store():
        r["dq"][...] = r["dq_acc"][...].astype(r["dq"].dtype)


def _dkv(r, cfg: Config, ki, qi):
    halo, bq, bk = cfg.halo, cfg.block_q, cfg.block_k
    c_q, c_k = cfg.conv_q, cfg.conv_k

    @pl.when(qi == 0)
    def _init():
        for name in ("dk_acc", "dv_acc", "dpost", "dw"):
            if name in r:
                r[name][...] = jnp.zeros(r[name].shape, r[name].dtype)

    @pl.when(tc.should_run(cfg, qi, ki))
    def _run():
        p_ext = {}  # P0 of the three key tiles, `halo` rows above the q tile included
        for suffix, d in SIDES:
            view = {**r, "kp": r["kp" + suffix], "kvseg": r["kvseg" + suffix]}
            _, z, visible, _ = tc.tile_scores(view, cfg, qi, ki + d, halo=halo)
            probs = tc.tile_probs(r, z, visible, cfg, halo=halo)
            p_ext[suffix] = [jnp.where(_valid_tile(cfg, ki + d), x, 0.0) for x in probs]
            if not d:
                tile_visible = visible[halo:]
        p = [x[halo:] for x in p_ext[""]]
        neighbours = lambda t: tuple(p_ext[s][t] for s, _ in SIDES)  # noqa: E731
        pcm = [jnp.where(tile_visible, x, 0.0) for x in post_conv_tiles(r, cfg, neighbours)]
        pf = tc.drop(tc.post_mix_tiles(pcm, r, cfg), tc.dropout_keep(r, cfg, qi, ki), cfg)
        for t in range(cfg.group):
            r["dv_acc"][t] += lax.dot_general(
                pf[t].astype(r["v"].dtype), r["dout"][t].astype(r["v"].dtype), TN_DIMS,
                preferred_element_type=jnp.float32,
            )  # fmt: skip
        dpcm = {}
        for suffix, d in SIDES:
            dpm_side, dpcm[suffix] = _dpcm(r, cfg, qi, ki + d, suffix)
            if not d:
                dpm = [x[:bq] for x in dpm_side]
        if cfg.post_size:
            for k, (b, c) in enumerate(tc.head_pairs(cfg, cfg.post_size)):
                r["dpost"][k] += tc.lane_partial(pcm[b] * dpm[c])
        # dW[t, c_q - 1 - u, c] = sum_ij m_u(i) dPcm[i, j] P0[i - u, j - pl + c], with m_u dPcm moved to
        # row halo + i - u of a [halo + bq, bk] tile so that it lines up with the halo'd P0.
        same_doc = same_doc_rows(r, cfg)
        n = halo + bq
        for t in range(cfg.group):
            grad = dpcm[""][t][:bq]
            moved = []
            for u in range(c_q):
                g = grad if not u else jnp.where(same_doc[u], grad, 0.0)
                if halo:
                    g = jnp.concatenate([jnp.zeros((halo, bk), jnp.float32), g], axis=0)
                moved.append(pltpu.roll(g, (-u) % n, 0) if u else g)
            left, cur, right = neighbours(t)
            for c in range(c_k):
                shifted = shift_keys(cur, left, right, c - cfg.conv_left, bk)
                for u in range(c_q):
                    r["dw"][(t * c_q + c_q - 1 - u) * c_k + c] += tc.lane_partial(moved[u] * shifted)
        _, _, ds = _tile_dz(r, cfg, qi, ki, p)
        accumulate_dk(r, cfg, ds)

    @pl.when(qi == cfg.num_q - 1)
    def _store():
        r["dk"][...] = r["dk_acc"][...].astype(r["dk"].dtype)
        r["dv"][...] = r["dv_acc"][...]


def _block_specs(cfg: Config, kv_major: bool, shapes: dict) -> dict:
    """Block specs by operand name; grid (B, H / G, outer, inner), kv tiles outer when kv_major."""
    G, bq, bk, halo = cfg.group, cfg.block_q, cfg.block_k, cfg.halo

    def tiles(o, i):
        if kv_major:
            ki, qi = o, i
            qi = jnp.maximum(qi, tc.first_q(cfg, ki)) if cfg.causal else qi
        else:
            qi, ki = o, i
            ki = jnp.minimum(ki, tc.last_k(cfg, qi)) if cfg.causal else ki
        return qi, ki

    key_of = {suffix: (lambda ki, d=d: jnp.clip(ki + d, 0, cfg.num_k - 1)) for suffix, d in SIDES}

    def heads(rows, tile_of, nd):
        def index_map(b, g, o, i):
            return (b, g) + (0,) * (nd - 4) + (tile_of(*tiles(o, i)), 0)

        return lambda shape: pl.BlockSpec((None, G, *shape[2:-2], rows, shape[-1]), index_map)

    def spec(name: str, shape):
        base = next(
            (b for b in ("qseg", "kvseg", "qp", "kp", "v", "band", "lse", "dout") if name.startswith(b)), name
        )
        suffix = name[len(base) :]
        rows = {"": bq, "_above": halo, "_below": halo}
        if base in ("qp", "band", "lse", "dout", "delta", "dq", "dband", "delta_out"):
            return heads(rows[suffix], lambda qi, ki: qi, len(shape))(shape)  # *_above / *_below: halo_rows
        if base == "qseg":
            return pl.BlockSpec((None, rows[suffix], LANES), lambda b, g, o, i: (b, tiles(o, i)[0], 0))
        if base == "kvseg":
            return pl.BlockSpec(
                (None, SUBLANES, bk), lambda b, g, o, i: (b, 0, key_of[suffix](tiles(o, i)[1]))
            )
        if base in ("kp", "dk", "dv"):
            return heads(bk, lambda qi, ki: key_of.get(suffix, key_of[""])(ki), len(shape))(shape)
        if base == "v":

            def vmap(b, g, o, i):
                head = lax.div(g * G, jnp.int32(cfg.kv_rep * cfg.v_heads_per_block))
                return (b, head, key_of[suffix](tiles(o, i)[1]), 0)

            return pl.BlockSpec((None, cfg.v_heads_per_block, bk, shape[3]), vmap)
        if base in ("dpre", "dpost", "dw"):  # partial sums of the program's outer tile
            return pl.BlockSpec((None, None, None) + tuple(shape[3:]), lambda b, g, o, i: (b, g, o, 0, 0, 0))
        return pl.BlockSpec(memory_space=pltpu.SMEM)  # pre, post, postw, seeds

    return {name: spec(name, shape) for name, shape in shapes.items()}


def _run(mode, body, cfg: Config, kv_major: bool, inputs: dict, outputs: dict, scratch: dict):
    inputs = {k: x for k, x in inputs.items() if x is not None}
    specs = _block_specs(cfg, kv_major, {k: x.shape for k, x in {**inputs, **outputs}.items()})
    batch, heads = inputs["qp"].shape[:2]
    outer, inner = (cfg.num_k, cfg.num_q) if kv_major else (cfg.num_q, cfg.num_k)
    grid = (batch, heads // cfg.group, outer, inner)
    return call_kernel(mode, body, cfg, grid, specs, inputs, outputs, scratch)


def _halo_inputs(cfg: Config, qp, qseg, lse, band, dout) -> dict:
    """The rows above (qp, qseg, lse, band) and below (qseg, dout) each of cfg's q tiles, as halo_rows."""
    if not cfg.halo:
        return {}
    above = functools.partial(halo_rows, block=cfg.block_q, halo=cfg.halo)
    below = functools.partial(above, below=True)
    rows = dict(
        qseg_below=below(qseg, axis=1), dout_below=below(dout, axis=2), qseg_above=above(qseg, axis=1)
    )
    rows.update(qp_above=above(qp, axis=3), lse_above=above(lse, axis=2))
    if band is not None:
        rows["band_above"] = above(band, axis=2)
    return rows


def backward_post_conv(cfg_dq: Config, cfg_dkv: Config, res, dout):
    """Cotangents of (qp, kp, v, band, qseg, kvseg, pre, post, seeds, postw) given dout [B, H, T, D]."""
    qp, kp, v, band, qseg, kvseg, pre, post, seeds, postw, lse = res
    batch, heads, n_slabs, _, dk = qp.shape
    kv_len, dim = kp.shape[3], v.shape[-1]
    G, f32 = cfg_dq.group, jnp.float32
    inputs = {**tc.base_inputs(qp, kp, v, band, qseg, kvseg, pre, post, seeds), "lse": lse, "dout": dout}
    inputs.update(postw=postw, v_left=v, v_right=v, kvseg_left=kvseg, kvseg_right=kvseg)
    halo_dq = _halo_inputs(cfg_dq, qp, qseg, lse, band, dout)
    rows_only = {**inputs, **{k: x for k, x in halo_dq.items() if k.endswith("_below")}}
    delta_out = {"delta_out": jax.ShapeDtypeStruct(lse.shape, f32)}
    delta = _run("delta_post_conv", _delta, cfg_dq, False, rows_only, delta_out, {})["delta_out"]
    inputs["delta"] = delta

    lanes = LANES if cfg_dq.block_k >= LANES else cfg_dq.block_k
    outs = {"dq": jax.ShapeDtypeStruct(qp.shape, qp.dtype)}
    if band is not None:
        outs["dband"] = jax.ShapeDtypeStruct(band.shape, f32)
    pre_pairs = tc.head_pairs(cfg_dq, cfg_dq.pre_size or 1)
    if cfg_dq.pre_size:
        outs["dpre"] = jax.ShapeDtypeStruct((batch, heads // G, cfg_dq.num_q, len(pre_pairs), 1, lanes), f32)
    scratch = {"dq_acc": ((G, n_slabs, cfg_dq.block_q, dk), f32)}
    dq_in = {**rows_only, "delta": delta}
    dq_res = _run("dq_post_conv", _dq, cfg_dq, False, dq_in, outs, scratch)

    lanes = LANES if cfg_dkv.block_k >= LANES else cfg_dkv.block_k
    post_pairs = tc.head_pairs(cfg_dkv, cfg_dkv.post_size or 1)
    taps = G * cfg_dkv.conv_q * cfg_dkv.conv_k
    dkv_outs = {
        "dk": jax.ShapeDtypeStruct(kp.shape, kp.dtype),
        "dv": jax.ShapeDtypeStruct((batch, heads, kv_len, dim), f32),
        "dw": jax.ShapeDtypeStruct((batch, heads // G, cfg_dkv.num_k, taps, 1, lanes), f32),
    }
    if cfg_dkv.post_size:
        shape = (batch, heads // G, cfg_dkv.num_k, len(post_pairs), 1, lanes)
        dkv_outs["dpost"] = jax.ShapeDtypeStruct(shape, f32)
    bk = cfg_dkv.block_k
    scratch = {"dk_acc": ((G, n_slabs, bk, dk), f32), "dv_acc": ((G, bk, dim), f32)}
    dkv_in = {**inputs, **_halo_inputs(cfg_dkv, qp, qseg, lse, band, dout), "kp_left": kp, "kp_right": kp}
    dkv_res = _run("dkv_post_conv", _dkv, cfg_dkv, True, dkv_in, dkv_outs, scratch)
    dv = dkv_res["dv"].reshape(batch, v.shape[1], heads // v.shape[1], kv_len, dim).sum(axis=2)
    dpostw = jnp.sum(dkv_res["dw"], axis=(0, 2, 4, 5)).reshape(-1)  # [H / G, G * c_q * c_k] -> flat
    return (
        dq_res["dq"],
        dkv_res["dk"],
        dv.astype(v.dtype),
        dq_res.get("dband"),
        None,
        None,
        mix_gradient(dq_res.get("dpre"), pre_pairs, pre, G),
        mix_gradient(dkv_res.get("dpost"), post_pairs, post, G),
        None,
        dpostw,
    )
