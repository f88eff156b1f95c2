"""The blockwise path against the float64 loops and the reference path: values, gradients, dropout, memory."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax import attention
from mta_jax.config import MTAConfig
from tests import loops
from tests.helpers import FULL, mta, params_as_numpy, random_mta_params, random_qkv, random_segment_ids
from tests.test_attention import CONFIGS


def _blocks(rng, length):
    """Random tile sizes, often not dividing the length (the last tile is padded)."""
    return int(rng.integers(1, length + 3)), int(rng.integers(1, length + 3))


@pytest.mark.parametrize("name", CONFIGS)
def test_equals_float64_loops(rng, name):
    cfg = CONFIGS[name]
    q_len = int(rng.integers(5, 20))
    block_q, block_k = _blocks(rng, q_len)
    with jax.enable_x64(True):
        q, k, v = random_qkv(rng, 2, q_len, 4, 2, 6, dtype=jnp.float64)
        params = random_mta_params(cfg, 4, 6, rng, dtype=jnp.float64)
        got = np.asarray(
            mta(
                q,
                k,
                v,
                params,
                cfg,
                layer_index=2,
                implementation="blockwise",
                block_q=block_q,
                block_k=block_k,
            )
        )
    numpy_params = params_as_numpy(params)
    for b in range(2):
        want = loops.attention_loop(q[b], k[b], v[b], numpy_params, cfg, layer_index=2)
        np.testing.assert_allclose(
            got[b], want, rtol=1e-10, atol=1e-12, err_msg=f"blocks {block_q}x{block_k}"
        )


CASES = {
    "full_packed": (FULL, 33, 33, True),
    "pre_left_kv_longer": (MTAConfig(pre_conv=(3, 5), pad_key="left", pre_head_mix=2), 12, 29, False),
    "post_right_non_causal_packed": (
        MTAConfig(pre_conv=(2, 4), post_conv=(3, 2), pad_key="right", causal=False),
        21,
        21,
        True,
    ),
    "paper_full": (
        MTAConfig(pre_conv=(6, 11), post_conv=(6, 11), pre_head_mix=4, post_head_mix=4, group_norm=True),
        40,
        40,
        True,
    ),
    "head_mix_only": (MTAConfig(post_head_mix=2), 26, 26, False),
}


@pytest.mark.parametrize("name", CASES)
def test_values_and_gradients_equal_reference(rng, name):
    """float64, packed documents, T != S, GQA: every input's gradient, with a random cotangent."""
    cfg, q_len, kv_len, packed = CASES[name]
    block_q, block_k = _blocks(rng, min(q_len, kv_len))
    with jax.enable_x64(True):
        q, k, v = random_qkv(rng, 2, q_len, 4, 2, 8, kv_len=kv_len, dtype=jnp.float64)
        params = random_mta_params(cfg, 4, 8, rng, dtype=jnp.float64)
        segments = random_segment_ids(rng, 2, q_len) if packed else None

        def run(implementation):
            def f(q, k, v, params):
                return mta(
                    q, k, v, params, cfg, segment_ids=segments, implementation=implementation, layer_index=1,
                    block_q=block_q, block_k=block_k,
                )  # fmt: skip

            return jax.vjp(f, q, k, v, params)

        want, want_vjp = run("reference")
        got, got_vjp = run("blockwise")
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        cotangent = jnp.asarray(rng.standard_normal(want.shape))
        for g, w in zip(
            jax.tree.leaves(got_vjp(cotangent)), jax.tree.leaves(want_vjp(cotangent)), strict=True
        ):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-10, err_msg=f"blocks {block_q}x{block_k}")


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_low_precision_matches_reference(rng, dtype, tol):
    cfg = dataclasses.replace(FULL, depth_scaling=False)
    q, k, v = random_qkv(rng, 2, 48, 4, 4, 16, dtype=dtype)
    params = random_mta_params(cfg, 4, 16, rng)
    want = mta(q, k, v, params, cfg, implementation="reference")
    got = mta(q, k, v, params, cfg, implementation="blockwise", block_q=16, block_k=32)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("cfg", [MTAConfig(pre_conv=(3, 5)), dataclasses.replace(FULL, depth_scaling=False)])
def test_dropout_mask_equals_reference(rng, cfg):
    """Both paths hash positions into the mask, so one key gives one mask whatever the tiling."""
    cfg = dataclasses.replace(cfg, dropout_rate=0.3)
    q, k, v = random_qkv(rng, 2, 37, 4, 2, 8)
    params = random_mta_params(cfg, 4, 8, rng)
    key = jax.random.key(int(rng.integers(2**31)))
    outs = {
        impl: mta(
            q,
            k,
            v,
            params,
            cfg,
            implementation=impl,
            deterministic=False,
            dropout_rng=key,
            block_q=8,
            block_k=16,
        )
        for impl in ("reference", "blockwise")
    }
    np.testing.assert_allclose(outs["blockwise"], outs["reference"], rtol=2e-5, atol=2e-5)
    clean = mta(q, k, v, params, cfg, implementation="blockwise")
    assert np.abs(np.asarray(outs["blockwise"] - clean)).max() > 1e-2  # dropout did something


def _arrays_in(jaxpr):
    """Every intermediate array shape of a jaxpr, nested jaxprs (scan, cond, remat, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield getattr(var.aval, "shape", ())
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _arrays_in(inner)


def test_no_sequence_by_sequence_buffer_in_forward_or_backward(rng):
    """The gradient's jaxpr holds no array with both a T-sized and an S-sized axis."""
    cfg = MTAConfig(pre_conv=(6, 11), post_conv=(6, 11), pre_head_mix=2, post_head_mix=2)
    q_len, kv_len = 160, 176
    q, k, v = random_qkv(rng, 1, q_len, 2, 2, 8, kv_len=kv_len)
    params = random_mta_params(cfg, 2, 8, rng)

    def loss(q, k, v, params, implementation):
        out = attention.multi_token_attention(
            q, k, v, params, cfg, implementation=implementation, block_q=32, block_k=32
        )
        return jnp.sum(out**2)

    def big(shape):
        return any(d >= q_len for d in shape[-2:]) and sum(d >= q_len for d in shape) >= 2

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    blockwise = jax.make_jaxpr(lambda *a: grad(*a, "blockwise"))(q, k, v, params).jaxpr
    reference = jax.make_jaxpr(lambda *a: grad(*a, "reference"))(q, k, v, params).jaxpr
    assert any(big(s) for s in _arrays_in(reference))  # the check can fail
    assert not [s for s in _arrays_in(blockwise) if big(s)]


def _temp_bytes(implementation, length, cfg):
    q = k = v = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
    params = jax.eval_shape(lambda: random_mta_params(cfg, 4, 32, np.random.default_rng(0)))

    def loss(q, k, v, params):
        out = attention.multi_token_attention(q, k, v, params, cfg, implementation=implementation, block_q=64)
        return jnp.sum(out)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, k, v, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_backward_memory_grows_linearly():
    """Compiled temporary memory of forward + backward (deterministic: XLA's buffer assignment)."""
    cfg = MTAConfig(pre_conv=(6, 11), post_head_mix=2)
    blockwise = [_temp_bytes("blockwise", n, cfg) for n in (512, 1024, 2048)]
    reference = _temp_bytes("reference", 2048, cfg)
    assert blockwise[2] / blockwise[1] < 2.5 and blockwise[1] / blockwise[0] < 2.5, blockwise
    assert blockwise[2] * 8 < reference, (blockwise, reference)


def test_auto_picks_blockwise_for_long_sequences_and_says_so(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_announced", set())
    cfg = MTAConfig(pre_conv=(2, 3))
    with caplog.at_level(logging.INFO, logger="mta_jax"):
        assert attention.choose_implementation(cfg, 64, 64, backend="cpu") == "reference"
        assert attention.choose_implementation(cfg, 4096, 4096, backend="cpu") == "blockwise"
        assert attention.choose_implementation(cfg, 4096, 4096, backend="cpu") == "blockwise"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # once per distinct choice
    assert '"blockwise"' in messages[1] and "4096" in messages[1]


@pytest.mark.parametrize("block", [0, -4, 2.5, True])
def test_bad_block_size_is_named(rng, block):
    cfg = MTAConfig(pre_conv=(2, 3))
    q, k, v = random_qkv(rng, 1, 8, 2, 2, 4)
    params = random_mta_params(cfg, 2, 4, rng)
    with pytest.raises(ValueError, match=r"block_q=.* is invalid"):
        attention.multi_token_attention(q, k, v, params, cfg, implementation="blockwise", block_q=block)
