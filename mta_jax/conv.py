"""The MTA mixing operations on materialised scores [B, H, T, S]: key-query conv and head mixing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mta_jax.params import key_padding


@functools.partial(jax.jit, static_argnames="pad_key")  # one compiled op, also when called eagerly
def key_query_conv(
    scores: jax.Array,
    kernel: jax.Array,
    visible: jax.Array,
    pad_key: str,
    q_segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Depthwise 2-D cross-correlation of the scores over the (query, key) plane (spec section 1).

    scores: [B, H, T, S]; kernel: [H, c_q, c_k]; visible: [B or 1, T, S] boolean.
    Invisible scores are zeroed first; the query axis is padded with c_q - 1 zero rows on the past
    side, the key axis per pad_key. So out[i, j] = sum_{a, c} W[a, c] * S0[i - (c_q - 1) + a, j - pl + c].
    With q_segment_ids [B, T] a row i only reads rows of its own segment, so packed documents
    never mix (the packing-correct convolution). The result is NOT re-masked.
    """
    num_heads, c_q, c_k = kernel.shape
    q_len, kv_len = scores.shape[-2:]
    pad_left, pad_right = key_padding(c_k, pad_key)
    masked = jnp.where(visible[:, None], scores, 0)
    padded = jnp.pad(masked, ((0, 0), (0, 0), (c_q - 1, 0), (pad_left, pad_right)))
    if q_segment_ids is not None:
        padded_segments = jnp.pad(q_segment_ids, ((0, 0), (c_q - 1, 0)), constant_values=-1)
    kernel = kernel.astype(scores.dtype)
    out = jnp.zeros_like(scores)
    for a in range(c_q):
        rows = padded[:, :, a : a + q_len, :]  # query i - (c_q - 1) + a for every i
        if q_segment_ids is not None:
            same_document = padded_segments[:, a : a + q_len] == q_segment_ids  # [B, T]
            rows = jnp.where(same_document[:, None, :, None], rows, 0)
        for c in range(c_k):
            weight = kernel[:, a, c].reshape(1, num_heads, 1, 1)
            out = out + weight * rows[..., c : c + kv_len]
    return out


def mix_heads(scores: jax.Array, mix: jax.Array) -> jax.Array:
    """Linear map over the head axis inside contiguous groups: out[g, o] = sum_h x[g, h] M[g, h, o].

    scores: [B, H, T, S]; mix: [H / g, g, g] in (in, out) layout.
    """
    batch, num_heads, q_len, kv_len = scores.shape
    groups, group_size, _ = mix.shape
    grouped = scores.reshape(batch, groups, group_size, q_len, kv_len)
    mixed = jnp.einsum("bghts,gho->bgots", grouped, mix.astype(scores.dtype))
    return mixed.reshape(batch, num_heads, q_len, kv_len)
