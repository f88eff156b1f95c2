"""Incremental decoding: a fixed-size cache per attention layer and the attention of a window of new queries.

One code path serves prefill and generation: `attend_window` takes n new query rows (n = chunk length for
a prefill chunk, 1 for a generation step) at cache positions [length, length + n), writes their keys and
values, and computes exactly the rows that multi_token_attention's reference path computes for them:

    S (n rows x S_max keys) -> pre kq-conv -> pre head mix -> (mask) softmax -> post kq-conv (re-mask 0)
      -> post head mix -> @ V -> per-head RMSNorm -> depth scaling -> gate

The key-query convolution of a row reads the c_q - 1 rows before it: the cache keeps the last c_q - 1 rows
of each convolution's input (masked scores for the pre conv, probabilities for the post conv) with their
segment ids, so a row of another document is ignored as in the packed forward pass. Keys to the right of
a query (pad_key "right"/"both" read them) are invisible and thus zero, in the cache as in the full pass,
so the window is exact for every pad_key. Memory per generation step is O(S_max): [B, H, c_q - 1 + 1, S_max].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mta_jax.attention import MASK_VALUE, compute_dtype, head_output
from mta_jax.config import MTAConfig
from mta_jax.conv import conv_valid, mix_heads, same_document_rows
from mta_jax.params import MTAParams, key_padding

# Segment id of cache slots that hold nothing yet (never equal to a real document's id, which is >= 0).
EMPTY_SEGMENT = -1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """What one attention layer keeps between decoding calls; a part the layer does not need is None.

    k, v: [B, S_max, Hkv, D] keys (after RoPE) and values of the first `length` positions.
    segment_ids: [B, S_max] int32 document id of each cached key (EMPTY_SEGMENT where nothing is written).
    pre_rows: [B, H, c_q - 1, S_max] the last c_q - 1 rows of the pre conv's input (masked scores, float32).
    post_rows: [B, H, c_q - 1, S_max] the last c_q - 1 probability rows, the post conv's input.
    pre_row_segments, post_row_segments: [B, c_q - 1] int32 segment ids of those rows.
    length: int32 scalar, how many positions are written (shared by the batch).
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    length: jax.Array
    pre_rows: jax.Array | None = None
    pre_row_segments: jax.Array | None = None
    post_rows: jax.Array | None = None
    post_row_segments: jax.Array | None = None

    @property
    def max_len(self) -> int:
        return self.k.shape[1]


def check_decodable(cfg: MTAConfig) -> None:
    """Only causal attention can be decoded one token at a time."""
    if not cfg.causal:
        raise ValueError(
            "mta.causal=False is invalid for decoding: a non-causal layer reads future tokens, "
            "so it cannot be computed incrementally"
        )


def init_layer_cache(
    cfg: MTAConfig,
    batch: int,
    max_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype=jnp.float32,
) -> LayerCache:
    """An empty cache for S_max = max_len positions; k and v in `dtype`, score rows in float32."""
    check_decodable(cfg)
    for name, value in (("batch", batch), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
    rows_dtype = compute_dtype(dtype)

    def rows(conv):
        if conv is None:
            return None, None
        c_q = conv[0]
        return (
            jnp.zeros((batch, num_heads, c_q - 1, max_len), rows_dtype),
            jnp.full((batch, c_q - 1), EMPTY_SEGMENT, jnp.int32),
        )

    pre_rows, pre_row_segments = rows(cfg.pre_conv)
    post_rows, post_row_segments = rows(cfg.post_conv)
    return LayerCache(
        k=jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype),
        v=jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype),
        segment_ids=jnp.full((batch, max_len), EMPTY_SEGMENT, jnp.int32),
        length=jnp.zeros((), jnp.int32),
        pre_rows=pre_rows,
        pre_row_segments=pre_row_segments,
        post_rows=post_rows,
        post_row_segments=post_row_segments,
    )


def cache_bytes(cache) -> int:
    """Bytes held by the arrays of a cache (any pytree of arrays)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(cache))


def attend_window(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: LayerCache,
    params: MTAParams,
    cfg: MTAConfig,
    *,
    segment_ids: jax.Array,
    layer_index: int | None = None,
) -> tuple[jax.Array, LayerCache]:
    """Attention of n new queries at positions [length, length + n) over the cache plus themselves.

    q: [B, n, H, D]; k, v: [B, n, Hkv, D] (after RoPE); segment_ids: [B, n] int document ids (>= 0).
    Returns ([B, n, H, D] in q's dtype, before wo; the cache with the n positions appended).
    The caller must keep length + n <= S_max (checked here when the length is known at trace time).
    """
    check_decodable(cfg)
    batch, n, num_heads, head_dim = q.shape
    max_len, num_kv_heads = cache.max_len, cache.k.shape[2]
    _check_window(q, k, v, cache, segment_ids)
    start = cache.length
    segment_ids = segment_ids.astype(jnp.int32)
    keys = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, start, 0, 0))
    values = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, start, 0, 0))
    key_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, start))

    acc_dtype = compute_dtype(q.dtype)
    group = num_heads // num_kv_heads
    q_grouped = q.astype(keys.dtype).reshape(batch, n, num_kv_heads, group, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_grouped, keys, preferred_element_type=acc_dtype)
    scores = scores.reshape(batch, num_heads, n, max_len) * head_dim**-0.5

    query_positions = start + jnp.arange(n)
    causal = jnp.arange(max_len)[None, :] <= query_positions[:, None]  # [n, S_max]
    visible = causal[None] & (segment_ids[:, :, None] == key_segments[:, None, :])  # [B, n, S_max]

    updates = {}
    if params.pre_conv is not None:
        scores, updates["pre_rows"], updates["pre_row_segments"] = _conv_rows(
            scores, cache.pre_rows, cache.pre_row_segments, params.pre_conv, visible, cfg.pad_key, segment_ids
        )
    if params.pre_head_mix is not None:
        scores = mix_heads(scores, params.pre_head_mix)
    scores = jnp.where(visible[:, None], scores, MASK_VALUE)
    probs = jnp.where(visible[:, None], jax.nn.softmax(scores, axis=-1), 0.0)
    if params.post_conv is not None:
        probs, updates["post_rows"], updates["post_row_segments"] = _conv_rows(
            probs,
            cache.post_rows,
            cache.post_row_segments,
            params.post_conv,
            visible,
            cfg.pad_key,
            segment_ids,
        )
        probs = jnp.where(visible[:, None], probs, 0.0)
    if params.post_head_mix is not None:
        probs = mix_heads(probs, params.post_head_mix)

    probs = probs.astype(values.dtype).reshape(batch, num_kv_heads, group, n, max_len)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values, preferred_element_type=acc_dtype)
    out = head_output(out.reshape(batch, n, num_heads, head_dim), params, cfg, layer_index).astype(q.dtype)
    new_cache = dataclasses.replace(
        cache, k=keys, v=values, segment_ids=key_segments, length=start + n, **updates
    )
    return out, new_cache


def _conv_rows(rows, cached_rows, cached_segments, kernel, visible, pad_key, segment_ids):
    """The key-query conv of n new rows [B, H, n, S] given the c_q - 1 cached rows before them.

    Returns (conv output [B, H, n, S] not re-masked, the last c_q - 1 input rows, their segment ids).
    """
    c_q, c_k = kernel.shape[1:]
    masked = jnp.where(visible[:, None], rows, 0).astype(cached_rows.dtype)
    all_rows = jnp.concatenate([cached_rows, masked], axis=2)  # [B, H, c_q - 1 + n, S]
    all_segments = jnp.concatenate([cached_segments, segment_ids], axis=1)  # [B, c_q - 1 + n]
    pad_left, pad_right = key_padding(c_k, pad_key)
    padded = jnp.pad(all_rows, ((0, 0), (0, 0), (0, 0), (pad_left, pad_right)))
    out = conv_valid(padded, kernel, same_document_rows(all_segments, c_q))
    keep = all_rows.shape[2] - (c_q - 1)
    return out, all_rows[:, :, keep:], all_segments[:, keep:]


def _check_window(q, k, v, cache: LayerCache, segment_ids) -> None:
    batch, n = q.shape[:2]
    if q.ndim != 4 or k.shape != (batch, n, *cache.k.shape[2:]) or v.shape != k.shape:
        raise ValueError(
            f"q.shape={q.shape}, k.shape={k.shape}, v.shape={v.shape} are invalid: must be [B, n, H, D] and "
            f"[B, n, Hkv, D] with B, Hkv, D of the cache's k {cache.k.shape}"
        )
    if segment_ids.shape != (batch, n) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(
            f"segment_ids with shape {segment_ids.shape} and dtype {segment_ids.dtype} is invalid: "
            f"must be integer [B, n] = {(batch, n)}"
        )
    if n > cache.max_len:
        raise ValueError(f"n={n} new positions is invalid: the cache holds at most {cache.max_len}")
    if isinstance(cache.length, jax.core.Tracer):
        return  # traced: the caller keeps length + n <= S_max
    length = int(cache.length)
    if length + n > cache.max_len:
        raise ValueError(
            f"n={n} new positions is invalid: the cache holds {length} of at most {cache.max_len} positions"
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelCache:
    """The decoding state of a whole model.

    layers: one LayerCache per attention layer. last_segment, last_position: [B] int32 segment id and
    RoPE position of the last token written (0 and -1 when empty), so that new tokens continue its
    document by default.
    """

    layers: tuple[LayerCache, ...]
    last_segment: jax.Array
    last_position: jax.Array

    @property
    def length(self) -> jax.Array:
        return self.layers[0].length

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len


def continued_positions(
    segment_ids: jax.Array, last_segment: jax.Array, last_position: jax.Array
) -> jax.Array:
    """[B, n] RoPE positions of new tokens: they continue the cached document when their segment id
    equals its id (last_segment [B], whose last token sat at last_position [B]) and restart at 0 at
    every new segment id, as default_positions does for a whole sequence."""
    extended = jnp.concatenate([last_segment[:, None], segment_ids], axis=1)  # [B, 1 + n]
    index = jnp.arange(extended.shape[1])
    starts = jnp.concatenate(
        [jnp.ones_like(extended[:, :1], bool), extended[:, 1:] != extended[:, :-1]], axis=1
    )
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    relative = index - start_index
    in_cached_document = start_index == 0
    positions = relative + jnp.where(in_cached_document, last_position[:, None], 0)
    return positions[:, 1:]
