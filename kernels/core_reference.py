"""The fused kernels' core op, written densely in jnp: the yardstick every Pallas kernel is tested against.

The Pallas path splits MTA into XLA glue (kernels/dspace.py) and this core op, which is flash attention
with a wide QK contraction, a band correction near the causal diagonal, and head mixing in small groups:

    s[h, i, j]  = sum_c qp[h, c, i] . kp[h, c, j] - band[h, i, (i + S - T) - j]   (band only for 0 <= . < W)
    z[h]        = sum_h' pre_mix[g, h', h] s[h']          within contiguous head groups (identity if None)
    z           = MASK_VALUE where invisible
    P[h]        = softmax_j(z[h]), 0 where invisible (a row with no visible key is all 0)
    P[h]        = visible * key_query_conv(P[h], post_conv[h])   (only with post_conv: mta_jax/conv.py's)
    Pf[h]       = sum_h' post_mix[g, h', h] P[h']         (identity if None)
    Pf          = Pf * keep / (1 - rate)                  (attention dropout, only when asked for)
    out[h, i]   = sum_j Pf[h, i, j] v[h // (H / Hkv), j]

visible(i, j) = q_segment_ids[i] == kv_segment_ids[j] and (not causal or j <= i + S - T).

Shapes: qp [B, H, C, T, Dk]; kp [B, H, C, S, Dk] (C slabs: the QK contraction is C * Dk wide);
v [B, Hkv, S, D]; band [B, H, T, W] float32 or None;
q_segment_ids [B, T] and kv_segment_ids [B, S] int32; pre_mix / post_mix [H / c, c, c] in (in, out)
layout or None; post_conv [H, c_q, c_k] or None (the post-softmax conv, with pad_key's key padding
and the segment ids' row masks). qp already carries the softmax scale. Returns out [B, H, T, D]
float32 and the log-sum-exp of z per row, lse [B, H, T] float32 (0 for rows with no visible key).
Dropout: keep is mta_jax/dropout.py's mask from per-(batch row, head) seeds [B, H] at query positions
i - q_offset and key positions j - kv_offset (the offsets undo the kernels' front padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mta_jax import dropout
from mta_jax.conv import key_query_conv

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def core_visibility(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, causal: bool) -> jax.Array:
    """[B, T, S] boolean: key j visible to query i."""
    q_len, kv_len = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    visible = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        rows = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        visible &= jnp.arange(kv_len)[None, :] <= rows
    return visible


def expand_band(band: jax.Array, kv_len: int) -> jax.Array:
    """band [B, H, T, W] -> dense [B, H, T, S]: entry (i, j) is band[i, (i + S - T) - j] inside the band."""
    q_len, width = band.shape[2], band.shape[3]
    offset = (jnp.arange(q_len)[:, None] + (kv_len - q_len)) - jnp.arange(kv_len)[None, :]  # [T, S]
    inside = (offset >= 0) & (offset < width)
    taken = jnp.take_along_axis(
        band, jnp.broadcast_to(jnp.clip(offset, 0, width - 1), band.shape[:2] + offset.shape), axis=-1
    )
    return jnp.where(inside, taken, 0.0)


def _mix(x: jax.Array, mix: jax.Array | None) -> jax.Array:
    """x [B, H, T, S]; mix [H / c, c, c] (in, out)."""
    if mix is None:
        return x
    batch, heads, q_len, kv_len = x.shape
    groups, size, _ = mix.shape
    grouped = x.reshape(batch, groups, size, q_len, kv_len)
    return jnp.einsum("bghts,gho->bgots", grouped, mix.astype(x.dtype)).reshape(x.shape)


def core_reference(
    qp: jax.Array,
    kp: jax.Array,
    v: jax.Array,
    band: jax.Array | None,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    pre_mix: jax.Array | None,
    post_mix: jax.Array | None,
    *,
    causal: bool,
    dropout_seeds: jax.Array | None = None,
    dropout_rate: float = 0.0,
    q_offset: int = 0,
    kv_offset: int = 0,
    post_conv: jax.Array | None = None,
    pad_key: str = "both",
) -> tuple[jax.Array, jax.Array]:
    """The core op, materialising [B, H, T, S]. Returns (out [B, H, T, D] float32, lse [B, H, T])."""
    acc = jnp.promote_types(qp.dtype, jnp.float32)
    heads, kv_heads = qp.shape[1], v.shape[1]
    s = jnp.einsum("bhctd,bhcsd->bhts", qp, kp, preferred_element_type=acc)
    if band is not None:
        s = s - expand_band(band.astype(acc), kp.shape[3])
    z = _mix(s, pre_mix)
    visible = core_visibility(q_segment_ids, kv_segment_ids, causal)[:, None]
    z = jnp.where(visible, z, MASK_VALUE)
    m = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.where(visible, jnp.exp(z - m), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(total == 0.0, 1.0, total)
    empty = total[..., 0] == 0.0
    lse = jnp.where(empty, 0.0, m[..., 0] + jnp.log(jnp.where(empty, 1.0, total[..., 0])))
    if post_conv is not None:
        probs = key_query_conv(probs, post_conv.astype(acc), visible[:, 0], pad_key, q_segment_ids)
        probs = jnp.where(visible, probs, 0.0)
    probs = _mix(probs, post_mix)
    if dropout_rate:
        rows = jnp.arange(qp.shape[3], dtype=jnp.int32)[:, None] - q_offset
        cols = jnp.arange(kp.shape[3], dtype=jnp.int32)[None, :] - kv_offset
        seeds = jax.lax.bitcast_convert_type(dropout_seeds, jnp.int32)[:, :, None, None]
        state = dropout.row_hash(seeds, rows)
        probs = dropout.apply_dropout(probs, dropout.keep_bits(state, cols, dropout_rate), dropout_rate)
    v_per_head = jnp.repeat(v, heads // kv_heads, axis=1)
    out = jnp.einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), v_per_head, preferred_element_type=acc)
    return out, lse
