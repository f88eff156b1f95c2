"""The key-query convolution and head mixing against the explicit float64 loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax.conv import key_query_conv, mix_heads
from mta_jax.masks import visibility_mask
from tests import loops


@pytest.mark.parametrize("pad_key", ["both", "left", "right"])
@pytest.mark.parametrize("c_q, c_k", [(1, 1), (3, 5), (6, 11), (2, 3), (4, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_conv_equals_loop_float64(rng, pad_key, c_q, c_k, causal):
    if pad_key != "both":
        c_k += 1  # even sizes are allowed when padding on one side
    q_len = kv_len = 9
    heads = 2
    scores = rng.standard_normal((1, heads, q_len, kv_len))
    kernel = rng.standard_normal((heads, c_q, c_k))
    with jax.enable_x64(True):
        visible = visibility_mask(q_len, kv_len, causal=causal)
        got = key_query_conv(jnp.asarray(scores), jnp.asarray(kernel), visible, pad_key)
        assert got.dtype == jnp.float64
        got = np.asarray(got)
    vis = np.asarray(visible[0])
    for h in range(heads):
        want = loops.conv_loop(np.where(vis, scores[0, h], 0.0), kernel[h], pad_key)
        np.testing.assert_allclose(got[0, h], want, rtol=1e-12, atol=1e-12)


def test_conv_with_segments_equals_documents_alone(rng):
    """Row i only reads rows of its own document: a packed row equals each document convolved alone."""
    length, heads, c_q, c_k = 12, 3, 4, 5
    segment_ids = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]])
    scores = rng.standard_normal((1, heads, length, length))
    kernel = rng.standard_normal((heads, c_q, c_k))
    with jax.enable_x64(True):
        visible = visibility_mask(
            length, length, causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids
        )
        got = np.asarray(
            key_query_conv(jnp.asarray(scores), jnp.asarray(kernel), visible, "both", segment_ids)
        )
    vis = np.asarray(visible[0])
    for doc in range(3):
        rows = np.nonzero(np.asarray(segment_ids[0]) == doc)[0]
        block = np.ix_(rows, rows)
        for h in range(heads):
            want = loops.conv_loop(np.where(vis[block], scores[0, h][block], 0.0), kernel[h], "both")
            np.testing.assert_allclose(got[0, h][block], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group", [1, 2, 6])
def test_mix_heads_equals_loop(rng, group):
    x = rng.standard_normal((2, 6, 5, 7))
    mix = rng.standard_normal((6 // group, group, group))
    with jax.enable_x64(True):
        got = np.asarray(mix_heads(jnp.asarray(x), jnp.asarray(mix)))
    for b in range(2):
        np.testing.assert_allclose(got[b], loops.mix_loop(x[b], mix), rtol=1e-12, atol=1e-12)
