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
    c_q, c_k = kernel.shape[1:]
    pad_left, pad_right = key_padding(c_k, pad_key)
    masked = jnp.where(visible[:, None], scores, 0)
    padded = jnp.pad(masked, ((0, 0), (0, 0), (c_q - 1, 0), (pad_left, pad_right)))
    row_masks = None
    if q_segment_ids is not None:
        padded_segments = jnp.pad(q_segment_ids, ((0, 0), (c_q - 1, 0)), constant_values=-1)
        row_masks = same_document_rows(padded_segments, c_q)
    return conv_valid(padded, kernel, row_masks)


def mix_heads(scores: jax.Array, mix: jax.Array) -> jax.Array:
    """Linear map over the head axis inside contiguous groups: out[g, o] = sum_h x[g, h] M[g, h, o].

    scores: [B, H, T, S]; mix: [H / g, g, g] in (in, out) layout.
    """
    batch, num_heads, q_len, kv_len = scores.shape
    groups, group_size, _ = mix.shape
    grouped = scores.reshape(batch, groups, group_size, q_len, kv_len)
    mixed = jnp.einsum("bghts,gho->bgots", grouped, mix.astype(scores.dtype))
    return mixed.reshape(batch, num_heads, q_len, kv_len)


def same_document_rows(row_segment_ids: jax.Array | None, c_q: int) -> jax.Array | None:
    """[B, c_q, R] masks for conv_valid: may output row r read input row r + a (a < c_q)?

    row_segment_ids: [B, R + c_q - 1], the ids of the input rows (output row r is input row
    r + c_q - 1). None (no segments) gives None: every row may be read.
    """
    if row_segment_ids is None:
        return None
    num_rows = row_segment_ids.shape[1] - (c_q - 1)
    own = row_segment_ids[:, c_q - 1 :]
    return jnp.stack([row_segment_ids[:, a : a + num_rows] == own for a in range(c_q)], axis=1)


@jax.custom_vjp
def conv_valid(x: jax.Array, kernel: jax.Array, row_masks: jax.Array | None) -> jax.Array:
    """The key-query conv on a tile that already holds its halo: no padding, 'valid' output.

    x: [B, H, R + c_q - 1, C + c_k - 1] scores, zero where invisible; kernel: [H, c_q, c_k];
    row_masks: [B, c_q, R] booleans from same_document_rows, or None.
    out[b, h, r, c] = sum_{a, e} kernel[h, a, e] * row_masks[b, a, r] * x[b, h, r + a, c + e]: [B, H, R, C].
    A custom VJP keeps one residual (x) instead of the c_q * c_k shifted windows autodiff would save.
    """
    return _conv_valid_forward(x, kernel, row_masks)


def _conv_valid_forward(x, kernel, row_masks):
    num_heads, c_q, c_k = kernel.shape
    num_rows, num_cols = x.shape[2] - (c_q - 1), x.shape[3] - (c_k - 1)
    kernel = kernel.astype(x.dtype)
    out = jnp.zeros(x.shape[:2] + (num_rows, num_cols), x.dtype)
    for a in range(c_q):
        part = jnp.zeros_like(out)
        for e in range(c_k):
            part = part + kernel[:, a, e][None, :, None, None] * x[:, :, a : a + num_rows, e : e + num_cols]
        if row_masks is not None:
            part = jnp.where(row_masks[:, a][:, None, :, None], part, 0)
        out = out + part
    return out


def _conv_valid_fwd(x, kernel, row_masks):
    return _conv_valid_forward(x, kernel, row_masks), (x, kernel, row_masks)


def _conv_valid_bwd(residuals, grad):
    x, kernel, row_masks = residuals
    num_heads, c_q, c_k = kernel.shape
    grad = grad.astype(x.dtype)
    weights = kernel.astype(x.dtype)
    grad_x = jnp.zeros_like(x)
    for a in range(c_q):
        g = _mask_rows(grad, row_masks, a)
        # grad_x[r + a, c + e] += W[a, e] * g[r, c]: slices of one padded copy of g, as in the forward.
        padded = jnp.pad(g, ((0, 0), (0, 0), (c_q - 1, c_q - 1), (c_k - 1, c_k - 1)))
        for e in range(c_k):
            shifted = jax.lax.slice_in_dim(padded, c_q - 1 - a, c_q - 1 - a + x.shape[2], axis=2)
            shifted = jax.lax.slice_in_dim(shifted, c_k - 1 - e, c_k - 1 - e + x.shape[3], axis=3)
            grad_x = grad_x + weights[:, a, e][None, :, None, None] * shifted

    def tap(_, index):
        """grad_kernel[:, a, e] = sum over b, r, c of g_a[b, :, r, c] * x[b, :, r + a, c + e]."""
        a, e = index // c_k, index % c_k
        window = jax.lax.dynamic_slice(x, (0, 0, a, e), grad.shape)
        return None, jnp.sum(_mask_rows(grad, row_masks, a) * window, axis=(0, 2, 3))

    # One tap per scan step: unrolled, XLA would keep every product g * window alive at once.
    _, taps = jax.lax.scan(tap, None, jnp.arange(c_q * c_k))  # [c_q * c_k, H]
    grad_kernel = taps.T.reshape(num_heads, c_q, c_k).astype(kernel.dtype)
    return grad_x, grad_kernel, None


def _mask_rows(grad, row_masks, a):
    """grad [B, H, R, C] with the rows that may not read input row r + a zeroed; a may be traced."""
    if row_masks is None:
        return grad
    mask = jax.lax.dynamic_index_in_dim(row_masks, a, axis=1, keepdims=False)  # [B, R]
    return jnp.where(mask[:, None, :, None], grad, 0)


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)
