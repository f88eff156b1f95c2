"""multi_token_attention (reference path) against independent computations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mta_jax.config import MTAConfig
from mta_jax.params import MTAParams, init_mta_params
from tests import loops
from tests.helpers import FULL, mta, params_as_numpy, random_mta_params, random_qkv, random_segment_ids

CONFIGS = {
    "pre": MTAConfig(pre_conv=(3, 5)),
    "post": MTAConfig(post_conv=(2, 3), pad_key="left"),
    "pre_post_right": MTAConfig(pre_conv=(2, 4), post_conv=(3, 2), pad_key="right"),
    "head_mix_only": MTAConfig(pre_head_mix=4, post_head_mix=2),
    "full": FULL,
    "elementwise_gate": dataclasses.replace(FULL, gate="elementwise", depth_scaling=False),
    "non_causal": MTAConfig(pre_conv=(3, 3), post_conv=(2, 3), causal=False),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_equals_float64_loops(rng, name, num_kv_heads):
    cfg = CONFIGS[name]
    with jax.enable_x64(True):
        q, k, v = random_qkv(rng, 2, 7, 4, num_kv_heads, 6, dtype=jnp.float64)
        params = random_mta_params(cfg, 4, 6, rng, dtype=jnp.float64)
        got = np.asarray(mta(q, k, v, params, cfg, layer_index=3))
    numpy_params = params_as_numpy(params)
    for b in range(2):
        want = loops.attention_loop(q[b], k[b], v[b], numpy_params, cfg, layer_index=3)
        np.testing.assert_allclose(got[b], want, rtol=1e-10, atol=1e-12)


def test_kv_longer_than_queries_is_bottom_right_causal(rng):
    """With S > T, query t sits at position t + S - T (the last queries of a longer sequence)."""
    cfg = MTAConfig(pre_conv=(2, 3), pre_head_mix=2)
    with jax.enable_x64(True):
        q, k, v = random_qkv(rng, 1, 4, 2, 2, 4, kv_len=9, dtype=jnp.float64)
        params = random_mta_params(cfg, 2, 4, rng, dtype=jnp.float64)
        got = np.asarray(mta(q, k, v, params, cfg))
    want = loops.attention_loop(q[0], k[0], v[0], params_as_numpy(params), cfg)
    np.testing.assert_allclose(got[0], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_identity_params_equal_dot_product_attention(rng, num_kv_heads):
    """Fresh (identity) kq-conv and head mixing: exactly causal softmax attention, values and grads."""
    cfg = MTAConfig(pre_conv=(6, 11), post_conv=(6, 11), pre_head_mix=4, post_head_mix=2)
    params = init_mta_params(cfg, 4, 8, jax.random.key(0))
    q, k, v = random_qkv(rng, 2, 13, 4, num_kv_heads, 8)

    def with_mta(q, k, v):
        return mta(q, k, v, params, cfg)

    def standard(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    np.testing.assert_allclose(with_mta(q, k, v), standard(q, k, v), rtol=1e-5, atol=1e-6)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    grads_mta = jax.grad(lambda *a: jnp.sum(with_mta(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    grads_std = jax.grad(lambda *a: jnp.sum(standard(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads_mta, grads_std, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cfg", [FULL, MTAConfig(pre_conv=(6, 11), post_conv=(6, 11))], ids=["full", "paper_kq"]
)
def test_causality_with_random_kernels(rng, cfg):
    """Changing tokens at positions >= t changes no output before t."""
    q, k, v = random_qkv(rng, 1, 16, 4, 2, 8)
    params = random_mta_params(cfg, 4, 8, rng)
    out = mta(q, k, v, params, cfg, layer_index=1)
    t = int(rng.integers(1, 15))

    def noise(x):
        return x.at[:, t:].add(jnp.asarray(rng.standard_normal(x[:, t:].shape), x.dtype))

    out2 = mta(noise(q), noise(k), noise(v), params, cfg, layer_index=1)
    np.testing.assert_array_equal(out[:, :t], out2[:, :t])
    assert not np.allclose(out[:, t:], out2[:, t:])


def test_packed_batch_equals_documents_run_separately(rng):
    cfg = FULL
    q, k, v = random_qkv(rng, 3, 20, 4, 2, 8)
    segment_ids = random_segment_ids(rng, 3, 20)
    params = random_mta_params(cfg, 4, 8, rng)
    packed = mta(q, k, v, params, cfg, segment_ids=segment_ids, layer_index=2)
    for b in range(3):
        ids = np.asarray(segment_ids[b])
        for doc in np.unique(ids):
            rows = np.nonzero(ids == doc)[0]
            alone = mta(
                q[b : b + 1, rows], k[b : b + 1, rows], v[b : b + 1, rows], params, cfg, layer_index=2
            )
            np.testing.assert_allclose(packed[b, rows], alone[0], rtol=2e-5, atol=2e-6)


def test_packed_batch_equals_float64_loops_per_document(rng):
    cfg = CONFIGS["pre_post_right"]
    with jax.enable_x64(True):
        q, k, v = random_qkv(rng, 2, 11, 2, 1, 4, dtype=jnp.float64)
        segment_ids = random_segment_ids(rng, 2, 11)
        params = random_mta_params(cfg, 2, 4, rng, dtype=jnp.float64)
        got = np.asarray(mta(q, k, v, params, cfg, segment_ids=segment_ids))
    for b in range(2):
        want = loops.packed_attention_loop(q[b], k[b], v[b], params_as_numpy(params), cfg, segment_ids[b])
        np.testing.assert_allclose(got[b], want, rtol=1e-10, atol=1e-12)


def test_gqa_equals_repeated_kv(rng):
    cfg = FULL
    q, k, v = random_qkv(rng, 2, 10, 8, 2, 8)
    params = random_mta_params(cfg, 8, 8, rng)
    grouped = mta(q, k, v, params, cfg, layer_index=0)
    repeated = mta(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2), params, cfg, layer_index=0)
    # Equal up to rounding: XLA may order the sums differently for the two layouts (GQA is not repeated).
    bound = _rounding_bound(cfg, head_dim=8, keys=10, dtype=jnp.float32, scale=float(jnp.abs(repeated).max()))
    np.testing.assert_allclose(grouped, repeated, rtol=0, atol=bound)


def _rounding_bound(cfg: MTAConfig, *, head_dim: int, keys: int, dtype, scale: float) -> float:
    """eps x the terms summed along the layer's chain (scores, pre conv and mix, softmax, post conv and mix)
    x the output's size: a bound on the rounding error, far below what a wrong head mapping gives."""
    pre, post = cfg.pre_conv or (1, 1), cfg.post_conv or (1, 1)
    terms = (
        head_dim
        + pre[0] * pre[1] * (cfg.pre_head_mix or 1)
        + keys
        + post[0] * post[1] * (cfg.post_head_mix or 1)
    )
    return float(jnp.finfo(dtype).eps) * terms * scale


def test_gradients_match_finite_differences_float64(rng):
    """Reverse-mode gradients through every part, checked by central differences in float64."""
    cfg = dataclasses.replace(FULL, gate="elementwise")
    with jax.enable_x64(True):
        q, k, v = random_qkv(rng, 1, 6, 4, 2, 4, dtype=jnp.float64)
        params = random_mta_params(cfg, 4, 4, rng, dtype=jnp.float64)

        def f(q, k, v, params):
            return mta(q, k, v, params, cfg, layer_index=1)

        check_grads(f, (q, k, v, params), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradients_reach_every_input_and_are_finite(rng):
    cfg = FULL
    q, k, v = random_qkv(rng, 2, 12, 4, 2, 8)
    params = random_mta_params(cfg, 4, 8, rng)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(q, k, v, params):
        return jnp.sum(mta(q, k, v, params, cfg, layer_index=1) * cotangent)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, params)
    named = {"q": grads[0], "k": grads[1], "v": grads[2]}
    named.update({f.name: getattr(grads[3], f.name) for f in dataclasses.fields(MTAParams)})
    for name, grad in named.items():
        assert grad is not None, name
        assert np.all(np.isfinite(grad)), name
        assert np.any(np.abs(grad) > 0), f"no gradient reaches {name}"


def test_bfloat16_close_to_float32(rng):
    cfg = FULL
    q, k, v = random_qkv(rng, 2, 24, 4, 2, 16)
    params = random_mta_params(cfg, 4, 16, rng)
    want = mta(q, k, v, params, cfg, layer_index=1)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = mta(*bf16, params, cfg, layer_index=1)
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want))
    assert err.max() < 0.1 and err.mean() < 0.015, (err.max(), err.mean())


def test_dropout(rng):
    cfg = MTAConfig(pre_conv=(2, 3), dropout_rate=0.4)
    q, k, v = random_qkv(rng, 2, 16, 2, 2, 8)
    params = random_mta_params(cfg, 2, 8, rng)
    clean = mta(q, k, v, params, cfg)
    np.testing.assert_array_equal(clean, mta(q, k, v, params, cfg, dropout_rng=jax.random.key(1)))

    def run(key):
        return mta(q, k, v, params, cfg, deterministic=False, dropout_rng=key)

    a, b = run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, run(jax.random.key(1)))
    assert not np.allclose(a, b) and not np.allclose(a, clean)
    # Inverted dropout keeps the expectation: the mean over many keys approaches the clean output.
    keys = jax.random.split(jax.random.key(3), 400)
    mean = jnp.mean(jax.vmap(run)(keys), axis=0)
    assert np.abs(mean - clean).mean() < 0.05 * np.abs(clean).mean()
    with pytest.raises(ValueError, match="dropout_rng=None"):
        mta(q, k, v, params, cfg, deterministic=False)


def test_fully_masked_rows_give_zero_not_nan(rng):
    """A query whose segment has no key in kv (possible with kv_segment_ids) attends to nothing."""
    cfg = MTAConfig(pre_conv=(2, 3))
    q, k, v = random_qkv(rng, 1, 4, 2, 2, 4)
    params = random_mta_params(cfg, 2, 4, rng)
    out = mta(
        q,
        k,
        v,
        params,
        cfg,
        segment_ids=jnp.asarray([[0, 0, 1, 1]]),
        kv_segment_ids=jnp.asarray([[0, 0, 2, 2]]),
    )
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, 2:], 0.0)
