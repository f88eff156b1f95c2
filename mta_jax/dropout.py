"""Attention dropout whose mask is a hash of (key, batch, head, query, key position).

Every path draws the same mask for the same PRNG key: the reference path hashes the whole
[B, H, T, S] grid at once, the blockwise path one tile at a time, from the tile's positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mix32(x: jax.Array) -> jax.Array:
    """The MurmurHash3 finaliser: a bijection on uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _key_words(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two uint32 words from a typed PRNG key or a raw uint32 key."""
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    data = data.reshape(-1).astype(jnp.uint32)
    return data[0], data[-1]


def dropout_keep_mask(
    rng: jax.Array, rate: float, num_batch: int, num_heads: int, rows: jax.Array, cols: jax.Array
) -> jax.Array:
    """Boolean [B, H, R, C]: True where the attention weight is kept (probability 1 - rate).

    rows: [R] query positions, cols: [C] key positions (any integers; the same position always
    draws the same bit, wherever the tile containing it starts).
    """
    word0, word1 = _key_words(rng)
    b = jnp.arange(num_batch, dtype=jnp.uint32)[:, None, None, None]
    h = jnp.arange(num_heads, dtype=jnp.uint32)[None, :, None, None]
    i = rows.astype(jnp.uint32)[None, None, :, None]
    j = cols.astype(jnp.uint32)[None, None, None, :]
    x = _mix32(word0 + b * jnp.uint32(0x9E3779B9))
    x = _mix32(x ^ (word1 + h * jnp.uint32(0x85EBCA6B)))
    x = _mix32(x + i * jnp.uint32(0xC2B2AE35))
    x = _mix32(x ^ (j * jnp.uint32(0x27D4EB2F) + jnp.uint32(0x165667B1)))
    threshold = min(round((1.0 - rate) * 2.0**32), 2**32 - 1)
    return x < jnp.uint32(threshold)


def apply_dropout(probs: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: kept weights are scaled by 1 / (1 - rate)."""
    return jnp.where(keep, probs / (1.0 - rate), 0.0)
