"""Incremental decoding (mta_jax/decode.py) against the full forward pass: prefill plus step-by-step
decoding must give the full pass's logits, with random MTA parameters and every layer type."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mta_jax.config import ModelConfig, MTAConfig
from mta_jax.decode import EMPTY_SEGMENT, attend_window, cache_bytes, continued_positions, init_layer_cache
from mta_jax.layers import MTA_PARAM_NAMES
from mta_jax.masks import positions_from_segment_ids
from mta_jax.model import MTATransformer
from mta_jax.rope import RopeScaling
from tests.helpers import FULL, mta, random_mta_params, random_qkv, random_segment_ids

ATOL = 2e-5
BATCH, PROMPT, NEW = 2, 11, 6

# Every layer type over tiny models (2 layers, dim 32, 4 heads of 8); each pad_key: the layer tests below.
MODELS = {
    # pre + post conv (pad both), pre/post head mixing, group norm, depth scaling, scalar gate, GQA,
    # the conv on layer 1 only, half-rotation RoPE with Llama 3 scaling active at these positions.
    "full_gqa_subset_rope": dict(
        mta=FULL,
        num_kv_heads=2,
        kq_conv_layers=(1,),
        rope_style="half",
        rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position=16),
    ),
    # pad_key right (even c_k), wide conv windows, elementwise gate, the conv on every layer.
    "right_elementwise": dict(
        mta=MTAConfig(pre_conv=(4, 4), post_conv=(3, 2), pad_key="right", gate="elementwise", group_norm=True)
    ),
    # no MTA part at all, one kv head, linear RoPE scaling.
    "baseline": dict(mta=None, num_kv_heads=1, rope_scaling=RopeScaling("linear", factor=2.0)),
}


def random_model(rng: np.random.Generator, **fields) -> MTATransformer:
    """A tiny model (2 layers unless fields say otherwise) whose MTA parameters are random."""
    fields = {"num_layers": 2, **fields}
    cfg = ModelConfig(vocab_size=31, dim=32, num_heads=4, attention_implementation="reference", **fields)
    model = MTATransformer(cfg, rngs=nnx.Rngs(int(rng.integers(2**31))))
    model.eval()
    for layer in model.layers:
        attention = layer.attention
        params = random_mta_params(attention.mta, attention.num_heads, attention.head_dim, rng)
        for name in MTA_PARAM_NAMES:
            if getattr(params, name) is not None:
                getattr(attention, name)[...] = getattr(params, name)
    return model


@functools.partial(jax.jit, static_argnames="graphdef")
def full_forward(graphdef, state, tokens, segment_ids):
    return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunks", "max_len"))
def prefill_then_steps(graphdef, state, tokens, segment_ids, *, chunks, max_len):
    """Logits [B, T, V] of a prefill in chunks of the given sizes, then one step per remaining token
    (steps take the default segment: they continue the last document). Also returns the cache."""
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens.shape[0], max_len)
    logits, start = [], 0
    for size in chunks:
        window = slice(start, start + size)
        ids = None if segment_ids is None else segment_ids[:, window]
        chunk_logits, cache = model.decode(tokens[:, window], cache, segment_ids=ids)
        logits.append(chunk_logits)
        start += size

    def step(cache, token):
        step_logits, cache = model.decode(token[:, None], cache)
        return cache, step_logits[:, 0]

    cache, step_logits = jax.lax.scan(step, cache, tokens[:, start:].T)
    return jnp.concatenate([*logits, step_logits.transpose(1, 0, 2)], axis=1), cache


def packed_segments(rng: np.random.Generator) -> jax.Array:
    """[B, PROMPT + NEW]: random documents in the prompt; the new tokens continue the last one."""
    prompt = np.asarray(random_segment_ids(rng, BATCH, PROMPT, max_docs=3))
    return jnp.asarray(np.concatenate([prompt, np.repeat(prompt[:, -1:], NEW, axis=1)], axis=1))


@pytest.mark.parametrize(
    "name, packed, chunks",
    [
        ("full_gqa_subset_rope", True, (PROMPT,)),
        pytest.param("right_elementwise", False, (PROMPT,), marks=pytest.mark.slow),
        ("baseline", False, (3, PROMPT - 3)),
    ],
)
def test_prefill_and_steps_match_the_full_forward_pass(rng, name, packed, chunks):
    model = random_model(rng, **MODELS[name])
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(rng.integers(0, 31, (BATCH, PROMPT + NEW)), jnp.int32)
    segment_ids = packed_segments(rng) if packed else None
    expected = full_forward(graphdef, state, tokens, segment_ids)
    logits, cache = prefill_then_steps(
        graphdef, state, tokens, segment_ids, chunks=chunks, max_len=PROMPT + NEW + 3
    )
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=1e-5)
    assert int(cache.length) == PROMPT + NEW
    assert np.array_equal(cache.last_segment, (segment_ids[:, -1] if packed else np.zeros(BATCH)))
    positions = positions_from_segment_ids(segment_ids) if packed else jnp.arange(PROMPT + NEW)
    assert np.array_equal(cache.last_position, np.broadcast_to(positions[..., -1], (BATCH,)))
    if name == "full_gqa_subset_rope":  # the conv rows are cached only in layer 1
        assert cache.layers[0].pre_rows is None and cache.layers[0].post_rows is None
        assert cache.layers[1].pre_rows.shape == (BATCH, 4, 2, PROMPT + NEW + 3)
        assert cache.layers[1].post_row_segments.shape == (BATCH, 1)


@functools.partial(jax.jit, static_argnames="cfg")
def _window(q, k, v, cache, params, cfg, segment_ids):
    return attend_window(q, k, v, cache, params, cfg, segment_ids=segment_ids, layer_index=3)


def layer_case(rng, pad_key, seq=9, heads=4, kv_heads=2, dim=8):
    """A layer config with both convs and every other part (the elementwise gate with pad_key "right"),
    random parameters whose right-hand conv
    taps are large, random q, k, v [1, seq, ...], packed segment ids and the reference outputs."""
    gate = "elementwise" if pad_key == "right" else "scalar"
    cfg = dataclasses.replace(FULL, pad_key=pad_key, pre_conv=(3, 5), post_conv=(2, 3), gate=gate)
    params = random_mta_params(cfg, heads, dim, rng)
    right_taps = jnp.arange(5) > 2
    params = dataclasses.replace(params, pre_conv=params.pre_conv + 3.0 * right_taps)
    q, k, v = random_qkv(rng, 1, seq, heads, kv_heads, dim)
    segment_ids = random_segment_ids(rng, 1, seq, max_docs=2)
    expected = mta(q, k, v, params, cfg, segment_ids=segment_ids, layer_index=3)
    return cfg, params, (q, k, v, segment_ids), expected


def run_windows(cfg, params, inputs, sizes, cache):
    """attend_window over consecutive windows of the given sizes: ([1, sum(sizes), H, D], cache)."""
    outputs, start = [], 0
    for size in sizes:
        q, k, v, ids = (x[:, start : start + size] for x in inputs)
        out, cache = _window(q, k, v, cache, params, cfg, ids)
        outputs.append(out)
        start += size
    return jnp.concatenate(outputs, axis=1), cache


@pytest.mark.parametrize("pad_key", ["both", "right", "left"])
def test_keys_right_of_the_diagonal_are_never_read(rng, pad_key):
    """Pads "right" and "both" read keys after the query: they are invisible, hence zero, so the window
    is exact. Proof: cache slots not yet written hold large junk, the kernels' right-hand taps are
    large, and one step at a time still gives the reference path's outputs on the whole sequence."""
    cfg, params, inputs, expected = layer_case(rng, pad_key)
    cache = init_layer_cache(cfg, 1, 12, 4, 2, 8)
    junk = jnp.asarray(50.0 * rng.standard_normal(cache.k.shape), jnp.float32)
    cache = dataclasses.replace(cache, k=junk, v=-junk)
    out, cache = run_windows(cfg, params, inputs, [1] * 9, cache)
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=1e-5)
    segment_ids = inputs[3]
    assert np.array_equal(cache.segment_ids[:, :9], segment_ids)
    assert np.all(cache.segment_ids[:, 9:] == EMPTY_SEGMENT)
    assert np.array_equal(cache.pre_row_segments, segment_ids[:, -2:])


def test_prefill_in_chunks_equals_one_chunk(rng):
    """Chunks of 4 + 5 (rows of the conv read across the chunk boundary) and 1 chunk of 9 give the same
    outputs (the reference's) and the same cache, conv rows included."""
    cfg, params, inputs, expected = layer_case(rng, "both")
    empty = init_layer_cache(cfg, 1, 12, 4, 2, 8)
    one, one_cache = run_windows(cfg, params, inputs, [9], empty)
    chunked, chunked_cache = run_windows(cfg, params, inputs, [4, 5], empty)
    np.testing.assert_allclose(one, expected, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(chunked, one, atol=ATOL, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(chunked_cache), jax.tree.leaves(one_cache), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-5)
    assert int(chunked_cache.length) == 9 and chunked_cache.post_rows.shape == (1, 4, 1, 12)


def test_cache_memory_is_linear_in_max_len():
    """The cache holds k, v, segment ids and c_q - 1 rows per conv; a step's temporaries are O(S_max)."""
    cfg = FULL  # pre (3, 5), post (2, 3)
    heads, kv_heads, dim = 4, 2, 8
    cache = init_layer_cache(cfg, 2, 100, heads, kv_heads, dim)
    expected = 2 * (2 * 100 * kv_heads * dim * 4) + 2 * 100 * 4 + 4
    expected += 2 * heads * (2 + 1) * 100 * 4 + 2 * (2 + 1) * 4
    assert cache_bytes(cache) == expected

    def step_temp_bytes(max_len):
        cache = init_layer_cache(cfg, 1, max_len, heads, kv_heads, dim)
        params = random_mta_params(cfg, heads, dim, np.random.default_rng(0))
        x = jnp.zeros((1, 1, heads, dim))
        kv = jnp.zeros((1, 1, kv_heads, dim))
        ids = jnp.zeros((1, 1), jnp.int32)
        compiled = _window.lower(x, kv, kv, cache, params, cfg, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = step_temp_bytes(256), step_temp_bytes(2048)
    assert large / small < 8 * 1.5, (small, large)  # 8x the cache: linear, not 64x


def test_continued_positions():
    segments = jnp.asarray([[3, 3, 4, 4], [5, 5, 5, 5], [0, 1, 1, 2]])
    last_segment, last_position = jnp.asarray([3, 7, 9]), jnp.asarray([10, 2, -1])
    positions = continued_positions(segments, last_segment, last_position)
    assert positions.tolist() == [[11, 12, 0, 1], [0, 1, 2, 3], [0, 0, 1, 0]]
    fresh = continued_positions(jnp.zeros((1, 5), jnp.int32), jnp.zeros((1,), jnp.int32), jnp.asarray([-1]))
    assert fresh.tolist() == [[0, 1, 2, 3, 4]]


def test_bad_input_raises(rng):
    model = random_model(rng, mta=MTAConfig(pre_conv=(2, 3), causal=False))
    with pytest.raises(ValueError, match=r"mta.causal=False is invalid for decoding"):
        model.init_cache(1, 8)
    with pytest.raises(ValueError, match=r"max_len=0 is invalid: must be a positive integer"):
        init_layer_cache(MTAConfig(), 1, 0, 2, 2, 4)

    model = random_model(rng, mta=None)
    cache = model.init_cache(1, 4)
    three = jnp.asarray(3, jnp.int32)
    cache = dataclasses.replace(
        cache, layers=tuple(dataclasses.replace(c, length=three) for c in cache.layers)
    )
    with pytest.raises(ValueError, match=r"n=2 new positions is invalid: the cache holds 3 of at most 4"):
        model.decode(jnp.zeros((1, 2), jnp.int32), cache)
    with pytest.raises(ValueError, match=r"segment_ids with shape \(1, 2\) .* must be integer \[B, n\]"):
        model.decode(jnp.zeros((1, 1), jnp.int32), cache, segment_ids=jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens with shape \(1,\) .* must be integer \[B, n\]"):
        model.decode(jnp.zeros((1,), jnp.int32), cache)
