"""Forward of the fused MTA core op on the GPU (Triton): out [B, H, T, D] float32 and the base-2 lse.

Grid (q tiles, B, H / G). A program owns a q tile of one head group of G heads and loops over the kv
tiles up to the causal limit, recomputing the G score tiles (a loop over the C slabs), the band
correction (only on the kv tiles the band touches), the pre-softmax mix, the mask and an online softmax.
Without post_mix P V accumulates in the same loop; with it a first loop finds each row's log-sum-exp
and a second one mixes the normalised probabilities before P V. Probabilities use base 2 (log2(e)
folded into the scores). Attention dropout (training) drops the weights that multiply V, after the
post mix; the softmax sums count every weight.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels import triton_common as tc
from kernels.core_reference import MASK_VALUE


def _forward_kernel(*refs, cfg: tc.Cfg):
    names = ["q_ids", "kv_ids", "qp", "kp", "v", "band", "pre", "post", "seeds", "out", "lse"]
    r = tc.unpack(cfg, refs, names)
    q_start = pl.program_id(0) * cfg.block_q
    head0, _ = tc.program_heads(cfg)
    q_ids = r["q_ids"][pl.ds(q_start, cfg.block_q)]
    pre, post = tc.load_mix(r["pre"]), tc.load_mix(r["post"])
    seeds = tc.load_seeds(r["seeds"])
    kv_heads = [(head0 + h) // cfg.rep for h in range(cfg.group)]
    group = range(cfg.group)
    load_q = tc.resident(cfg, lambda a, c: r["qp"][a, c])  # [bq, Dk]

    def logits(t, in_band):
        k_start = t * cfg.block_k
        offs = tc.offsets(cfg, q_start, k_start)
        vis = tc.visible(cfg, q_ids, r["kv_ids"][pl.ds(k_start, cfg.block_k)], offs)
        s = tc.scores(
            cfg,
            load_q,
            lambda a, c: r["kp"][a, c, pl.ds(k_start, cfg.block_k), :],  # [bk, Dk]
            lambda a: tc.band_tile(cfg, r["band"], a, 0, offs),  # [bq, bk]
            in_band,
        )
        return tc.softmax_tiles(s, pre, vis), vis

    def load_v(h, t):
        return r["v"][kv_heads[h], pl.ds(t * cfg.block_k, cfg.block_k), :]  # [bk, D]

    def stats_step(t, carry, in_band):
        """Online softmax over kv tile t: per head (running max, running sum[, unnormalised PV])."""
        zl, vis = logits(t, in_band)
        keep = None if cfg.has_post else tc.dropout_keep(cfg, seeds, q_start, t * cfg.block_k)
        out = []
        for h in group:
            m, denom, *acc = carry[h]
            m_next = jnp.maximum(m, jnp.max(zl[h], axis=1))
            corr = jnp.exp2(m - m_next)
            p = jnp.where(vis, jnp.exp2(zl[h] - m_next[:, None]), 0.0)  # 0, not 2^0, on masked rows
            denom = corr * denom + jnp.sum(p, axis=1)
            if acc:  # without post_mix, PV is accumulated in the same pass
                vt = load_v(h, t)
                p_kept = p if keep is None else tc.drop([p], [keep[h]], cfg)[0]  # denom counts every weight
                acc = [corr[:, None] * acc[0] + pltriton.dot(p_kept.astype(vt.dtype), vt)]
            out.append((m_next, denom, *acc))
        return tuple(out)

    d = r["v"].shape[-1]
    row = jnp.zeros((cfg.block_q,), jnp.float32)
    zeros = jnp.zeros((cfg.block_q, d), jnp.float32)
    init = tuple((row + MASK_VALUE, row) + (() if cfg.has_post else (zeros,)) for _ in group)
    end, band_lo, band_hi = tc.kv_tiles_for_q(cfg, q_start)
    stats = tc.loop(cfg, 0, band_lo, band_hi, end, stats_step, init)
    lse2 = []
    for h in group:
        m, denom, *acc = stats[h]
        empty = denom == 0.0
        lse2.append(jnp.where(empty, 0.0, m + jnp.log2(jnp.where(empty, 1.0, denom))))
        if acc:
            r["out"][h] = acc[0] / jnp.where(empty, 1.0, denom)[:, None]
        r["lse"][h] = lse2[h]
    if not cfg.has_post:
        return

    def pv_step(t, accs, in_band):
        zl, vis = logits(t, in_band)
        p = tc.apply_mix([tc.probs(zl[h], lse2[h], vis) for h in group], post)
        p = tc.drop(p, tc.dropout_keep(cfg, seeds, q_start, t * cfg.block_k), cfg)
        out = []
        for h in group:
            vt = load_v(h, t)
            out.append(accs[h] + pltriton.dot(p[h].astype(vt.dtype), vt))
        return tuple(out)

    accs = tc.loop(cfg, 0, band_lo, band_hi, end, pv_step, tuple(zeros for _ in group))
    for h in group:
        r["out"][h] = accs[h]


def common_specs(cfg: tc.Cfg, qp, kp, v, band, pre, post, seeds, q_tiled: bool, chunks: int = 1):
    """In-specs and operands for (q_ids, kv_ids, qp, kp, v, band, pre, post, seeds); grid (tile, B,
    H / G * chunks). seeds [B, H] int32 (dropout) or None.

    q_tiled: the grid's first axis tiles the queries (forward, dQ) rather than the keys (dK/dV).
    """
    g, bq, bk = cfg.group, cfg.block_q, cfg.block_k
    slabs, q_len, kv_len = cfg.slabs, cfg.q_len, cfg.kv_len
    dk, kv_heads, d = qp.shape[-1], v.shape[1], v.shape[-1]
    qb, kb = (bq, kv_len) if q_tiled else (q_len, bk)

    def group_of(h):
        return h if chunks == 1 else h // chunks

    if q_tiled:
        qp_map = lambda i, b, h: (b, group_of(h), 0, i, 0)  # noqa: E731
        kp_map = lambda i, b, h: (b, group_of(h), 0, 0, 0)  # noqa: E731
    else:
        qp_map = lambda i, b, h: (b, group_of(h), 0, 0, 0)  # noqa: E731
        kp_map = lambda i, b, h: (b, group_of(h), 0, i, 0)  # noqa: E731
    specs = [
        pl.BlockSpec((None, q_len), lambda i, b, h: (b, 0)),
        pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
        pl.BlockSpec((None, g, slabs, qb, dk), qp_map),
        pl.BlockSpec((None, g, slabs, kb, dk), kp_map),
        pl.BlockSpec((None, kv_heads, kv_len, d), lambda i, b, h: (b, 0, 0, 0)),
    ]
    operands = [qp, kp, v]
    if band is not None:
        if q_tiled:
            band_map = lambda i, b, h: (b, group_of(h), i, 0)  # noqa: E731
        else:
            band_map = lambda i, b, h: (b, group_of(h), 0, 0)  # noqa: E731
        specs.append(pl.BlockSpec((None, g, bq if q_tiled else q_len, cfg.width), band_map))
        operands.append(band)
    for mix in (pre, post):
        if mix is not None:
            specs.append(pl.BlockSpec((None, g, g), lambda i, b, h: (group_of(h), 0, 0)))
            operands.append(mix)
    if seeds is not None:
        specs.append(pl.BlockSpec((None, g), lambda i, b, h: (b, group_of(h))))
        operands.append(seeds)
    return specs, operands


def forward(cfg: tc.Cfg, qp, kp, v, band, q_ids, kv_ids, pre, post, seeds):
    """-> out [B, H, T, D] float32, lse2 [B, H, T] (base 2, of the undropped weights; 0 for rows
    without a visible key)."""
    batch, heads = qp.shape[:2]
    d = v.shape[-1]
    specs, operands = common_specs(cfg, qp, kp, v, band, pre, post, seeds, q_tiled=True)
    grid = (cfg.q_len // cfg.block_q, batch, heads // cfg.group)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=grid,
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, cfg.group, cfg.block_q, d), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, cfg.group, cfg.block_q), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, cfg.q_len, d), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, cfg.q_len), jnp.float32),
        ],
        compiler_params=cfg.params,
        interpret=cfg.interpret,
        name="mta_core_fwd",
    )(q_ids, kv_ids, *operands)
