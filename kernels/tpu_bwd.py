"""Backward of the fused MTA core op on the TPU (Mosaic): a delta kernel (post_mix only), dQ and dK/dV.

- delta (with post_mix): delta_b = rowsum(P_b dP_b) over kv tiles (kv innermost). Without it
  delta = rowsum(dout * out), with or without dropout (out sums the dropped weights).
- dQ, grid (B, H / G, q tiles, kv tiles): dqp, the band's gradient and the mixes' per-program partials.
- dK/dV, grid (B, H / G, kv tiles, q tiles): dkp and dV per query head (summed over each kv head's
  query heads in XLA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import tpu_common as tc
from kernels.tpu_common import LANES, TN_DIMS, Config


def delta_kernel(tile_dp):
    """The body of a kernel that sums delta_b[i] = sum_j P_b[i, j] dP_b[i, j] over kv tiles, with
    tile_dp(r, cfg, qi, ki, p, visible) -> dP [G x [bq, bk]] of the tile."""

    def body(r, cfg: Config, qi, ki):
        @pl.when(ki == 0)
        def _init():
            r["delta_out"][...] = jnp.zeros(r["delta_out"].shape, jnp.float32)

        @pl.when(tc.should_run(cfg, qi, ki))
        def _run():
            _, z, visible, _ = tc.tile_scores(r, cfg, qi, ki)
            p = tc.tile_probs(r, z, visible, cfg)
            dp = tile_dp(r, cfg, qi, ki, p, visible)
            for t in range(cfg.group):
                r["delta_out"][t] += jnp.sum(p[t] * dp[t], axis=1, keepdims=True)

    return body


# With post_mix only: dP = post_mix^T(drop(dout v^T)).
_delta_post = delta_kernel(
    lambda r, cfg, qi, ki, p, visible: tc.tile_dprobs(r, p, visible, cfg, tc.dropout_keep(r, cfg, qi, ki))[1]
)


def accumulate_dq(r, cfg: Config, qi, ki, s, dz, ds, offset):
    """dq_acc += dS kp, the pre mix's partial gradient and the band's, from one tile's s, dz and dS."""
    n_slabs = r["qp"].shape[1]
    for t in range(cfg.group):
        ds_t = ds[t].astype(r["kp"].dtype)
        for c in range(n_slabs):
            r["dq_acc"][t, c] += lax.dot_general(
                ds_t, r["kp"][t, c], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
    if cfg.pre_size:
        for k, (a, b) in enumerate(tc.head_pairs(cfg, cfg.pre_size)):
            r["dpre"][k] += tc.lane_partial(s[a] * dz[b])
    if cfg.width:

        @pl.when(tc.band_hits(cfg, qi, ki))
        def _band():
            lane = lax.broadcasted_iota(jnp.int32, (cfg.block_q, cfg.width), 1)
            for t in range(cfg.group):
                acc = jnp.zeros((cfg.block_q, cfg.width), jnp.float32)
                for w in range(cfg.width):
                    col = jnp.sum(jnp.where(offset == w, ds[t], 0.0), axis=1, keepdims=True)
                    acc = jnp.where(lane == w, col, acc)
                r["dband"][t] -= acc


def _dq(r, cfg: Config, qi, ki):
    """dqp, dband and the mixes' partial gradients, accumulated over kv tiles."""

    @pl.when(ki == 0)
    def _init():
        for name in ("dq_acc", "dband", "dpre", "dpost"):
            if name in r:
                r[name][...] = jnp.zeros(r[name].shape, r[name].dtype)

    @pl.when(tc.should_run(cfg, qi, ki))
    def _run():
        s, z, visible, offset = tc.tile_scores(r, cfg, qi, ki)
        p, _, dpf, dz, ds = tc.tile_grads(r, s, z, visible, cfg, tc.dropout_keep(r, cfg, qi, ki))
        accumulate_dq(r, cfg, qi, ki, s, dz, ds, offset)
        if cfg.post_size:
            for k, (b, c) in enumerate(tc.head_pairs(cfg, cfg.post_size)):
                r["dpost"][k] += tc.lane_partial(p[b] * dpf[c])

    @pl.when(ki == cfg.num_k - 1)
    def _store():
        r["dq"][...] = r["dq_acc"][...].astype(r["dq"].dtype)


def accumulate_dk(r, cfg: Config, ds):
    """dk_acc += dS^T qp for one tile's dS."""
    for t in range(cfg.group):
        ds_t = ds[t].astype(r["qp"].dtype)
        for c in range(r["qp"].shape[1]):
            r["dk_acc"][t, c] += lax.dot_general(
                ds_t, r["qp"][t, c], TN_DIMS, preferred_element_type=jnp.float32
            )


def _dkv(r, cfg: Config, ki, qi):
    """dkp and per-query-head dv, accumulated over q tiles."""

    @pl.when(qi == 0)
    def _init():
        r["dk_acc"][...] = jnp.zeros(r["dk_acc"].shape, jnp.float32)
        r["dv_acc"][...] = jnp.zeros(r["dv_acc"].shape, jnp.float32)

    @pl.when(tc.should_run(cfg, qi, ki))
    def _run():
        s, z, visible, _ = tc.tile_scores(r, cfg, qi, ki)
        _, pf, _, _, ds = tc.tile_grads(r, s, z, visible, cfg, tc.dropout_keep(r, cfg, qi, ki))
        accumulate_dk(r, cfg, ds)
        v_dtype = r["v"].dtype
        for t in range(cfg.group):
            r["dv_acc"][t] += lax.dot_general(
                pf[t].astype(v_dtype),
                r["dout"][t].astype(v_dtype),
                TN_DIMS,
                preferred_element_type=jnp.float32,
            )

    @pl.when(qi == cfg.num_q - 1)
    def _store():
        r["dk"][...] = r["dk_acc"][...].astype(r["dk"].dtype)
        r["dv"][...] = r["dv_acc"][...]


def mix_gradient(partials, pairs, mix, group: int):
    """The flat block-diagonal mix's gradient from the kernels' partials [B, H / G, tiles, pairs, 1, lanes]
    (None without the mix)."""
    if mix is None:
        return None
    sums = jnp.sum(partials, axis=(0, 2, 4, 5))  # [H / G, pairs]
    flat = jnp.array([a * group + b for a, b in pairs])
    return jnp.zeros((sums.shape[0], group * group), jnp.float32).at[:, flat].set(sums).reshape(mix.shape)


def backward(cfg_dq: Config, cfg_dkv: Config, res, dout):
    """Cotangents of (qp, kp, v, band, qseg, kvseg, pre, post, seeds) given dout [B, H, T, D]; the delta and
    dQ kernels run at cfg_dq's tiles, dK/dV at cfg_dkv's."""
    qp, kp, v, band, qseg, kvseg, pre, post, seeds, out, lse = res
    batch, heads, n_slabs, _, dk = qp.shape
    kv_len, dim = kp.shape[3], v.shape[-1]
    G, f32 = cfg_dq.group, jnp.float32
    inputs = tc.base_inputs(qp, kp, v, band, qseg, kvseg, pre, post, seeds)
    if cfg_dq.post_size:
        delta_out = {"delta_out": jax.ShapeDtypeStruct(lse.shape, f32)}
        delta_in = {**inputs, "lse": lse, "dout": dout}
        delta = tc.run_kernel("delta", _delta_post, cfg_dq, delta_in, delta_out, {})["delta_out"]
    else:
        delta = tc.lane_rows(jnp.sum(dout * out, axis=-1))
    inputs = {**inputs, "lse": lse, "delta": delta, "dout": dout}

    partial_lanes = min(cfg_dq.block_k, LANES)
    pair_lists = {name: tc.head_pairs(cfg_dq, size or 1) for name, size in
                  (("dpre", cfg_dq.pre_size), ("dpost", cfg_dq.post_size))}  # fmt: skip
    outs = {"dq": jax.ShapeDtypeStruct(qp.shape, qp.dtype)}
    if band is not None:
        outs["dband"] = jax.ShapeDtypeStruct(band.shape, f32)
    for name, size in (("dpre", cfg_dq.pre_size), ("dpost", cfg_dq.post_size)):
        if size:
            shape = (batch, heads // G, cfg_dq.num_q, len(pair_lists[name]), 1, partial_lanes)
            outs[name] = jax.ShapeDtypeStruct(shape, f32)
    scratch = {"dq_acc": ((G, n_slabs, cfg_dq.block_q, dk), f32)}
    dq_res = tc.run_kernel("dq", _dq, cfg_dq, inputs, outs, scratch)

    dkv_outs = {
        "dk": jax.ShapeDtypeStruct(kp.shape, kp.dtype),
        "dv": jax.ShapeDtypeStruct((batch, heads, kv_len, dim), f32),
    }
    bk = cfg_dkv.block_k
    scratch = {"dk_acc": ((G, n_slabs, bk, dk), f32), "dv_acc": ((G, bk, dim), f32)}
    dkv_res = tc.run_kernel("dkv", _dkv, cfg_dkv, inputs, dkv_outs, scratch)
    dv = dkv_res["dv"].reshape(batch, v.shape[1], heads // v.shape[1], kv_len, dim).sum(axis=2)

    return (
        dq_res["dq"],
        dkv_res["dk"],
        dv.astype(v.dtype),
        dq_res.get("dband"),
        None,
        None,
        mix_gradient(dq_res.get("dpre"), pair_lists["dpre"], pre, G),
        mix_gradient(dq_res.get("dpost"), pair_lists["dpost"], post, G),
        None,
    )
