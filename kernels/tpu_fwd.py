"""Forward of the fused MTA core op on the TPU (Mosaic): out [B, H, T, D] float32 and lse [B, H, T, 128].

Grid (B, H / G, q tiles, kv tiles), kv innermost. Without post_mix: online softmax with running max /
sum / accumulator in VMEM scratch. With post_mix: a first pass computes the lse, a second one the
normalised P, mixes it across the group and accumulates P V. Attention dropout (training) drops the
weights that multiply V, after the post mix; the softmax sums count every weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import tpu_common as tc
from kernels.core_reference import MASK_VALUE
from kernels.tpu_common import LANES, Config


def fwd_online(r, cfg: Config, qi, ki):
    """Online softmax + P V (no post_mix), or the lse alone (`out` absent)."""

    @pl.when(ki == 0)
    def _init():
        r["m"][...] = jnp.full(r["m"].shape, MASK_VALUE, jnp.float32)
        r["l"][...] = jnp.zeros(r["l"].shape, jnp.float32)
        if "acc" in r:
            r["acc"][...] = jnp.zeros(r["acc"].shape, jnp.float32)

    @pl.when(tc.should_run(cfg, qi, ki))
    def _run():
        _, z, visible, _ = tc.tile_scores(r, cfg, qi, ki)
        keep = tc.dropout_keep(r, cfg, qi, ki) if "acc" in r else None
        for t in range(cfg.group):
            m_prev, l_prev = r["m"][t], r["l"][t]  # [bq, 128]
            m_next = jnp.maximum(m_prev, jnp.max(z[t], axis=1, keepdims=True))
            # Guard: an all-invisible tile has z == m_next == MASK_VALUE; exp(0) = 1 must not count.
            p = jnp.where(visible, jnp.exp(z[t] - tc.to_lanes(m_next, cfg.block_k)), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            r["m"][t] = m_next
            r["l"][t] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            if "acc" in r:
                v = r["v"][cfg.v_index(t)]
                p_kept = p if keep is None else tc.drop([p], [keep[t]], cfg)[0]  # l counts every weight
                pv = lax.dot_general(
                    p_kept.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
                )
                d = r["acc"].shape[-1]
                r["acc"][t] = tc.to_lanes(alpha, d) * r["acc"][t] + pv

    @pl.when(ki == cfg.num_k - 1)
    def _store():
        for t in range(cfg.group):
            total, m = r["l"][t], r["m"][t]
            empty = total == 0.0
            safe_l = jnp.where(empty, 1.0, total)
            r["lse"][t] = jnp.where(empty, 0.0, m + jnp.log(safe_l))
            if "out" in r:
                d = r["out"].shape[-1]
                r["out"][t] = r["acc"][t] * tc.to_lanes(1.0 / safe_l, d)


def _fwd_post(r, cfg: Config, qi, ki):
    """Second forward pass with post_mix: normalised P, mixed, times V."""

    @pl.when(ki == 0)
    def _init():
        r["out"][...] = jnp.zeros(r["out"].shape, jnp.float32)

    @pl.when(tc.should_run(cfg, qi, ki))
    def _run():
        _, z, visible, _ = tc.tile_scores(r, cfg, qi, ki)
        pf = tc.post_mix_tiles(tc.tile_probs(r, z, visible, cfg), r, cfg)
        pf = tc.drop(pf, tc.dropout_keep(r, cfg, qi, ki), cfg)
        for t in range(cfg.group):
            v = r["v"][cfg.v_index(t)]
            r["out"][t] += lax.dot_general(
                pf[t].astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )


def forward(cfg: Config, qp, kp, v, band, qseg, kvseg, pre, post, seeds):
    """Returns out [B, H, T, D] float32 and lse [B, H, T, 128] (of the undropped weights)."""
    batch, heads, _, q_len, _ = qp.shape
    dim = v.shape[-1]
    rows = (cfg.group, cfg.block_q)
    f32 = jnp.float32
    inputs = tc.base_inputs(qp, kp, v, band, qseg, kvseg, pre, post, seeds)
    out_sds = jax.ShapeDtypeStruct((batch, heads, q_len, dim), f32)
    lse_sds = jax.ShapeDtypeStruct((batch, heads, q_len, LANES), f32)
    stats = {"m": ((*rows, LANES), f32), "l": ((*rows, LANES), f32)}
    if not cfg.post_size:
        outputs = {"out": out_sds, "lse": lse_sds}
        res = tc.run_kernel("fwd", fwd_online, cfg, inputs, outputs, {**stats, "acc": ((*rows, dim), f32)})
        return res["out"], res["lse"]
    lse = tc.run_kernel(
        "lse", fwd_online, cfg, {**inputs, "v": None, "seeds": None}, {"lse": lse_sds}, stats
    )["lse"]
    out = tc.run_kernel("fwd_post", _fwd_post, cfg, {**inputs, "lse": lse}, {"out": out_sds}, {})["out"]
    return out, lse
