"""Which keys each query may see: causal order and packed-document segments."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visibility_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Boolean [B or 1, T, S]: True where query t may attend to key s.

    Causal order is bottom-right aligned: query t sits at position t + (S - T), so with T == S
    key s is visible iff s <= t. With segment ids ([B, T] and [B, S]) a query only sees keys of
    its own segment (packed documents).
    """
    visible = jnp.ones((1, q_len, kv_len), bool)
    if causal:
        q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        visible = visible & (jnp.arange(kv_len)[None, :] <= q_pos)[None]
    if q_segment_ids is not None:
        visible = visible & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return visible


def default_positions(seq_len: int, segment_ids: jax.Array | None) -> jax.Array:
    """RoPE positions when none are given: 0..T-1, restarting per document with segment ids."""
    return jnp.arange(seq_len) if segment_ids is None else positions_from_segment_ids(segment_ids)


def positions_from_segment_ids(segment_ids: jax.Array) -> jax.Array:
    """[B, T] positions that restart at 0 wherever the segment id changes (packed documents)."""
    seq_len = segment_ids.shape[-1]
    index = jnp.arange(seq_len)
    starts = jnp.concatenate(
        [
            jnp.ones_like(segment_ids[..., :1], bool),
            segment_ids[..., 1:] != segment_ids[..., :-1],
        ],
        axis=-1,
    )
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
    return index - start_index
