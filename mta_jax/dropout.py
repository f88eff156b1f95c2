"""Attention dropout whose mask is a hash of (key, batch, head, query, key position).

Every path draws the same mask for the same PRNG key: the reference path hashes the whole
[B, H, T, S] grid at once, the blockwise path one tile at a time, from the tile's positions, and the
fused kernels in-kernel, per tile, from per-(batch, head) seeds computed outside (`head_seeds`).

The hash works on uint32 or, bit for bit the same, on int32 (wrapping multiplies, logical shifts,
an order-preserving sign flip for the final compare): the kernels use int32, which every Pallas
backend lowers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_GOLDEN, _M1, _M2 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35
_COL_MUL, _COL_ADD = 0x27D4EB2F, 0x165667B1


def _word(value: int, dtype) -> jax.Array:
    """The 32-bit constant `value` as a scalar of dtype (uint32, or int32 two's complement)."""
    if jnp.dtype(dtype) == jnp.int32 and value >= 2**31:
        value -= 2**32
    return jnp.asarray(value, dtype)


def _mix32(x: jax.Array) -> jax.Array:
    """The MurmurHash3 finaliser: a bijection on 32-bit words with full avalanche."""
    x = x ^ lax.shift_right_logical(x, _word(16, x.dtype))
    x = x * _word(_M1, x.dtype)
    x = x ^ lax.shift_right_logical(x, _word(13, x.dtype))
    x = x * _word(_M2, x.dtype)
    return x ^ lax.shift_right_logical(x, _word(16, x.dtype))


def _key_words(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two uint32 words from a typed PRNG key or a raw uint32 key."""
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    data = data.reshape(-1).astype(jnp.uint32)
    return data[0], data[-1]


def head_seeds(rng: jax.Array, num_batch: int, num_heads: int) -> jax.Array:
    """uint32 [B, H]: the hash state of each (batch row, head) before the positions enter."""
    word0, word1 = _key_words(rng)
    b = jnp.arange(num_batch, dtype=jnp.uint32)[:, None]
    h = jnp.arange(num_heads, dtype=jnp.uint32)[None, :]
    x = _mix32(word0 + b * jnp.uint32(_GOLDEN))
    return _mix32(x ^ (word1 + h * jnp.uint32(_M1)))


def row_hash(seed: jax.Array, rows: jax.Array) -> jax.Array:
    """seed (broadcastable) and query positions rows -> the hash state of each row (same dtype)."""
    return _mix32(seed + rows.astype(seed.dtype) * _word(_M2, seed.dtype))


def keep_bits(row_state: jax.Array, cols: jax.Array, rate: float) -> jax.Array:
    """Boolean: True where the weight at (row, col) is kept, probability 1 - rate.
    row_state from row_hash, cols key positions, broadcastable against each other."""
    dtype = row_state.dtype
    x = _mix32(row_state ^ (cols.astype(dtype) * _word(_COL_MUL, dtype) + _word(_COL_ADD, dtype)))
    threshold = min(round((1.0 - rate) * 2.0**32), 2**32 - 1)
    if jnp.dtype(dtype) == jnp.uint32:
        return x < jnp.uint32(threshold)
    flip = _word(2**31, dtype)  # x - 2^31 as int32 orders like x as uint32
    return (x ^ flip) < _word(threshold ^ 2**31, dtype)


def dropout_keep_mask(
    rng: jax.Array, rate: float, num_batch: int, num_heads: int, rows: jax.Array, cols: jax.Array
) -> jax.Array:
    """Boolean [B, H, R, C]: True where the attention weight is kept (probability 1 - rate).

    rows: [R] query positions, cols: [C] key positions (any integers; the same position always
    draws the same bit, wherever the tile containing it starts).
    """
    seeds = head_seeds(rng, num_batch, num_heads)[:, :, None, None]
    state = row_hash(seeds, rows.astype(jnp.uint32)[None, None, :, None])
    return keep_bits(state, cols.astype(jnp.uint32)[None, None, None, :], rate)


def apply_dropout(probs: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: kept weights are scaled by 1 / (1 - rate)."""
    return jnp.where(keep, probs / (1.0 - rate), 0.0)
