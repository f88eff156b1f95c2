"""Backward of the fused MTA core op on the GPU (Triton): the dQ and dK/dV kernels.

- dQ, grid (q tiles, B, H / G * chunks): a program loops over kv tiles, recomputes the score tiles and
  probabilities, and accumulates dqp for its chunk of slabs. It also returns the band's gradient and
  per-program partial sums of the mixes' gradients, and with post_mix computes delta = rowsum(P dP) in
  a first loop (these side outputs come from chunk 0).
- dK/dV, grid (kv tiles, B, H / G * chunks): a program loops over q tiles and accumulates dkp for its
  chunk of slabs and dV per query head (summed over each kv head's query heads in XLA; chunk 0 stores it).

With several chunks every program recomputes the score tiles: more FLOPs, but accumulators that fit
in registers ([rows, chunk * Dk] per head instead of [rows, C * Dk]).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels import triton_common as tc
from kernels.triton_fwd import common_specs


def _store_when(pred, store):
    """Run store() only where pred holds (pred may be a Python bool)."""
    if pred is True:
        store()
    else:
        pl.when(pred)(store)


def _dq_kernel(*refs, cfg: tc.Cfg):
    names = ["q_ids", "kv_ids", "qp", "kp", "v", "band", "pre", "post", "seeds", "dout", "lse", "delta_in"]
    names += ["dqp", "dband", "dpre", "dpost", "delta_out"]
    r = tc.unpack(cfg, refs, names)
    q_start = pl.program_id(0) * cfg.block_q
    head0, chunk = tc.program_heads(cfg, cfg.num_chunks)
    slab0 = chunk * cfg.chunk
    first_chunk = True if cfg.num_chunks == 1 else chunk == 0
    q_ids = r["q_ids"][pl.ds(q_start, cfg.block_q)]
    pre, post = tc.load_mix(r["pre"]), tc.load_mix(r["post"])
    seeds = tc.load_seeds(r["seeds"])
    kv_heads = [(head0 + h) // cfg.rep for h in range(cfg.group)]
    group = range(cfg.group)
    lse2 = [r["lse"][h] for h in group]
    row = jnp.zeros((cfg.block_q,), jnp.float32)
    load_q = tc.resident(cfg, lambda a, c: r["qp"][a, c])  # [bq, Dk]

    def recompute(t, in_band):
        """Scores, probabilities, offsets and dPf (through the dropout, before the post-mix transpose)
        of kv tile t."""
        k_start = t * cfg.block_k
        offs = tc.offsets(cfg, q_start, k_start)
        vis = tc.visible(cfg, q_ids, r["kv_ids"][pl.ds(k_start, cfg.block_k)], offs)
        s = tc.scores(
            cfg,
            load_q,
            lambda a, c: r["kp"][a, c, pl.ds(k_start, cfg.block_k), :],
            lambda a: tc.band_tile(cfg, r["band"], a, 0, offs),
            in_band,
        )
        zl = tc.softmax_tiles(s, pre, vis)
        p = [tc.probs(zl[h], lse2[h], vis) for h in group]
        dpf = []
        for h in group:
            vt = r["v"][kv_heads[h], pl.ds(k_start, cfg.block_k), :]
            dpf.append(pltriton.dot(r["dout"][h].astype(vt.dtype), vt, trans_b=True))
        return s, p, offs, tc.drop(dpf, tc.dropout_keep(cfg, seeds, q_start, k_start), cfg)

    end, band_lo, band_hi = tc.kv_tiles_for_q(cfg, q_start)
    if cfg.has_post:

        def delta_step(t, carry, in_band):
            delta, dpost = carry
            _, p, _, dpf = recompute(t, in_band)
            dp = tc.apply_mix_t(dpf, post)
            delta = tuple(delta[a] + jnp.sum(p[a] * dp[a], axis=1) for a in group)
            dpost = tuple(tuple(dpost[a][h] + jnp.sum(p[a] * dpf[h], axis=1) for h in group) for a in group)
            return delta, dpost

        init = (tuple(row for _ in group), tuple(tuple(row for _ in group) for _ in group))
        delta, dpost = tc.loop(cfg, 0, band_lo, band_hi, end, delta_step, init)

        def store_delta():
            for a in group:
                r["delta_out"][a] = delta[a]
                for h in group:
                    r["dpost"][a, h, :] = dpost[a][h]

        _store_when(first_chunk, store_delta)
    else:
        delta = [r["delta_in"][h] for h in group]

    def dq_step(t, carry, in_band):
        dq, dpre = carry
        s, p, offs, dpf = recompute(t, in_band)
        dp = tc.apply_mix_t(dpf, post)
        dz = [p[a] * (dp[a] - delta[a][:, None]) for a in group]
        ds = tc.apply_mix_t(dz, pre)
        if cfg.has_pre:
            dpre = tuple(tuple(dpre[a][h] + jnp.sum(s[a] * dz[h], axis=1) for h in group) for a in group)
        k_start = t * cfg.block_k
        new_dq = []
        for a in group:
            ds_a = ds[a].astype(r["kp"].dtype)
            for i in range(cfg.chunk):
                kt = r["kp"][a, slab0 + i, pl.ds(k_start, cfg.block_k), :]  # [bk, Dk]
                new_dq.append(dq[a * cfg.chunk + i] + pltriton.dot(ds_a, kt))
        if in_band is not False:

            def store_band_grads():
                for a in group:
                    tc.scatter_band(cfg, r["dband"], a, offs, -ds[a])

            pl.when(in_band if first_chunk is True else jnp.logical_and(in_band, first_chunk))(
                store_band_grads
            )
        return tuple(new_dq), dpre

    dk = r["qp"].shape[-1]
    init = (
        tuple(jnp.zeros((cfg.block_q, dk), jnp.float32) for _ in range(cfg.group * cfg.chunk)),
        tuple(tuple(row for _ in group) for _ in group) if cfg.has_pre else (),
    )
    dq, dpre = tc.loop(cfg, 0, band_lo, band_hi, end, dq_step, init)
    for a in group:
        for i in range(cfg.chunk):
            r["dqp"][a, i] = dq[a * cfg.chunk + i].astype(r["dqp"].dtype)

    def store_dpre():
        for a in group:
            for h in group:
                r["dpre"][a, h, :] = dpre[a][h]

    if cfg.has_pre:
        _store_when(first_chunk, store_dpre)


def backward_dq(cfg: tc.Cfg, qp, kp, v, band, q_ids, kv_ids, pre, post, seeds, dout, lse2, out):
    """-> dqp, dband [B,H,T,W] or None, dpre [H/G,G,G] or None, dpost or None, delta [B,H,T]."""
    batch, heads = qp.shape[:2]
    g, bq, d, nc = cfg.group, cfg.block_q, v.shape[-1], cfg.num_chunks
    n_q = cfg.q_len // bq
    specs, operands = common_specs(cfg, qp, kp, v, band, pre, post, seeds, q_tiled=True, chunks=nc)
    row_spec = pl.BlockSpec((None, g, bq), lambda i, b, h: (b, h // nc, i))
    specs += [pl.BlockSpec((None, g, bq, d), lambda i, b, h: (b, h // nc, i, 0)), row_spec]
    operands += [dout, lse2]
    if not cfg.has_post:
        specs.append(row_spec)
        operands.append(jnp.sum(dout * out, axis=-1))
    out_specs = [
        pl.BlockSpec((None, g, cfg.chunk, bq, qp.shape[-1]), lambda i, b, h: (b, h // nc, h % nc, i, 0))
    ]
    out_shape = [jax.ShapeDtypeStruct(qp.shape, qp.dtype)]
    if cfg.width:  # block_k wide (tc.scatter_band); the first W columns are the band's gradient
        out_specs.append(pl.BlockSpec((None, g, bq, cfg.block_k), lambda i, b, h: (b, h // nc, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, cfg.q_len, cfg.block_k), jnp.float32))
    partial_shape = jax.ShapeDtypeStruct((n_q, batch, heads // g, g, g, bq), jnp.float32)
    partial_spec = pl.BlockSpec((None, None, None, g, g, bq), lambda i, b, h: (i, b, h // nc, 0, 0, 0))
    for present in (cfg.has_pre, cfg.has_post):
        if present:
            out_specs.append(partial_spec)
            out_shape.append(partial_shape)
    if cfg.has_post:
        out_specs.append(row_spec)
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, cfg.q_len), jnp.float32))
    results = list(
        pl.pallas_call(
            functools.partial(_dq_kernel, cfg=cfg),
            grid=(n_q, batch, heads // g * nc),
            in_specs=specs,
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=cfg.params,
            interpret=cfg.interpret,
            name="mta_core_bwd_dq",
        )(q_ids, kv_ids, *operands)
    )
    dqp = results.pop(0)
    dband = _written_band(cfg, results.pop(0)) if cfg.width else None
    dpre = results.pop(0).sum(axis=(0, 1, 5)) if cfg.has_pre else None
    dpost = results.pop(0).sum(axis=(0, 1, 5)) if cfg.has_post else None
    delta = results.pop(0) if cfg.has_post else operands[-1]
    return dqp, dband, dpre, dpost, delta


def _written_band(cfg: tc.Cfg, dband: jax.Array) -> jax.Array:
    """The band's gradient [B, H, T, W] from the kernel's block_k-wide output, zero where no kernel
    wrote: entries whose key i + S - T - d lies outside [0, S)."""
    dband = dband[..., : cfg.width]
    keys = jnp.arange(cfg.q_len)[:, None] + cfg.shift - jnp.arange(cfg.width)[None, :]  # [T, W]
    return jnp.where((keys >= 0) & (keys < cfg.kv_len), dband, 0.0)


def _dkv_kernel(*refs, cfg: tc.Cfg):
    names = ["q_ids", "kv_ids", "qp", "kp", "v", "band", "pre", "post", "seeds", "dout", "lse", "delta"]
    names += ["dkp", "dv"]
    r = tc.unpack(cfg, refs, names)
    k_start = pl.program_id(0) * cfg.block_k
    head0, chunk = tc.program_heads(cfg, cfg.num_chunks)
    slab0 = chunk * cfg.chunk
    kv_ids = r["kv_ids"][pl.ds(k_start, cfg.block_k)]
    pre, post = tc.load_mix(r["pre"]), tc.load_mix(r["post"])
    seeds = tc.load_seeds(r["seeds"])
    group = range(cfg.group)
    v_rows = pl.ds(k_start, cfg.block_k)
    load_k = tc.resident(cfg, lambda a, c: r["kp"][a, c])  # [bk, Dk]

    def step(t, carry, in_band):
        dk, dv = carry
        q_start = t * cfg.block_q
        rows = pl.ds(q_start, cfg.block_q)
        offs = tc.offsets(cfg, q_start, k_start)
        vis = tc.visible(cfg, r["q_ids"][rows], kv_ids, offs)
        s = tc.scores(
            cfg,
            lambda a, c: r["qp"][a, c, rows, :],
            load_k,
            lambda a: tc.band_tile(cfg, r["band"], a, q_start, offs),
            in_band,
        )
        zl = tc.softmax_tiles(s, pre, vis)
        p = [tc.probs(zl[h], r["lse"][h, rows], vis) for h in group]
        keep = tc.dropout_keep(cfg, seeds, q_start, k_start)
        pf = tc.drop(tc.apply_mix(p, post), keep, cfg)
        dpf, new_dv = [], []
        for h in group:
            vt = r["v"][(head0 + h) // cfg.rep, v_rows, :]  # [bk, D]
            dout = r["dout"][h, rows, :].astype(vt.dtype)  # [bq, D]
            dpf.append(pltriton.dot(dout, vt, trans_b=True))
            new_dv.append(dv[h] + pltriton.dot(pf[h].astype(vt.dtype), dout, trans_a=True))
        dp = tc.apply_mix_t(tc.drop(dpf, keep, cfg), post)
        dz = [p[a] * (dp[a] - r["delta"][a, rows][:, None]) for a in group]
        ds = tc.apply_mix_t(dz, pre)
        new_dk = []
        for a in group:
            for i in range(cfg.chunk):
                qt = r["qp"][a, slab0 + i, rows, :]  # [bq, Dk]
                new_dk.append(dk[a * cfg.chunk + i] + pltriton.dot(ds[a].astype(qt.dtype), qt, trans_a=True))
        return tuple(new_dk), tuple(new_dv)

    dk_dim, d = r["qp"].shape[-1], r["v"].shape[-1]
    init = (
        tuple(jnp.zeros((cfg.block_k, dk_dim), jnp.float32) for _ in range(cfg.group * cfg.chunk)),
        tuple(jnp.zeros((cfg.block_k, d), jnp.float32) for _ in group),
    )
    start, band_lo, band_hi = tc.q_tiles_for_kv(cfg, k_start)
    dk, dv = tc.loop(cfg, start, band_lo, band_hi, jnp.int32(cfg.q_len // cfg.block_q), step, init)
    for a in group:
        for i in range(cfg.chunk):
            r["dkp"][a, i] = dk[a * cfg.chunk + i].astype(r["dkp"].dtype)

    def store_dv():
        for a in group:
            r["dv"][a] = dv[a]

    _store_when(True if cfg.num_chunks == 1 else chunk == 0, store_dv)


def backward_dkv(cfg: tc.Cfg, qp, kp, v, band, q_ids, kv_ids, pre, post, seeds, dout, lse2, delta):
    """-> dkp [B,H,C,S,Dk], dv [B,Hkv,S,D]."""
    batch, heads = qp.shape[:2]
    g, bk, d, nc = cfg.group, cfg.block_k, v.shape[-1], cfg.num_chunks
    specs, operands = common_specs(cfg, qp, kp, v, band, pre, post, seeds, q_tiled=False, chunks=nc)
    row_spec = pl.BlockSpec((None, g, cfg.q_len), lambda i, b, h: (b, h // nc, 0))
    specs += [pl.BlockSpec((None, g, cfg.q_len, d), lambda i, b, h: (b, h // nc, 0, 0)), row_spec, row_spec]
    operands += [dout, lse2, delta]
    dkp, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(cfg.kv_len // bk, batch, heads // g * nc),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, g, cfg.chunk, bk, kp.shape[-1]), lambda i, b, h: (b, h // nc, h % nc, i, 0)),
            pl.BlockSpec((None, g, bk, d), lambda i, b, h: (b, h // nc, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(kp.shape, kp.dtype),
            jax.ShapeDtypeStruct((batch, heads, cfg.kv_len, d), jnp.float32),
        ],
        compiler_params=cfg.params,
        interpret=cfg.interpret,
        name="mta_core_bwd_dkv",
    )(q_ids, kv_ids, *operands)
    dv = dv.reshape(batch, v.shape[1], cfg.rep, cfg.kv_len, d).sum(axis=2).astype(v.dtype)
    return dkp, dv
