"""implementation="pallas" end to end (glue + kernels, interpreted on CPU) against the reference path."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ops import pallas_attention_core, unsupported_option
from mta_jax import attention
from mta_jax.config import MTAConfig
from tests.helpers import random_mta_params, random_qkv, random_segment_ids

# Pre-softmax conv with mixing in groups of 2 before and 4 after the softmax.
MIXED = MTAConfig(pre_conv=(3, 5), pre_head_mix=2, post_head_mix=4)


def _compare(rng, cfg, kernel, q_len, kv_len, num_kv_heads, packed, blocks):
    q, k, v = random_qkv(rng, 1, q_len, 4, num_kv_heads, 16, kv_len=kv_len)
    params = random_mta_params(cfg, 4, 16, rng)
    ids = random_segment_ids(rng, 1, q_len) if packed else None

    def run(core, **options):
        def f(q, k, v, params):
            return core(
                q, k, v, params, cfg, q_segment_ids=ids, kv_segment_ids=ids, dropout_rng=None, **options
            )

        return jax.vjp(jax.jit(f), q, k, v, params)

    want, want_vjp = run(attention.reference_attention_core)
    got, got_vjp = run(pallas_attention_core, kernel=kernel, block_q=blocks, block_k=blocks)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    cotangent = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    for g, w in zip(jax.tree.leaves(got_vjp(cotangent)), jax.tree.leaves(want_vjp(cotangent)), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-4 * float(jnp.abs(w).max()))


def test_triton_kernel_packed_gqa(rng):
    """Lengths that are not whole tiles (the glue pads at the front) and packed documents."""
    _compare(rng, MIXED, "triton", 40, 40, 2, packed=True, blocks=16)


def test_triton_kernel_kv_longer_left_padding(rng):
    cfg = MTAConfig(pre_conv=(2, 4), pad_key="left", post_head_mix=2)
    _compare(rng, cfg, "triton", 20, 36, 4, packed=False, blocks=16)


def test_tpu_kernel_packed_gqa(rng):
    _compare(rng, MIXED, "tpu", 40, 40, 2, packed=True, blocks=None)


def test_through_multi_token_attention(rng):
    """The public function: per-head output stage on top, same signature as every path."""
    cfg = MTAConfig(pre_conv=(2, 3), group_norm=True, gate="scalar")
    q, k, v = random_qkv(rng, 2, 24, 2, 2, 16)
    params = random_mta_params(cfg, 2, 16, rng)
    outs = {
        impl: attention.multi_token_attention(
            q, k, v, params, cfg, implementation=impl, block_q=16, block_k=16
        )
        for impl in ("reference", "pallas")
    }
    np.testing.assert_allclose(outs["pallas"], outs["reference"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cfg, option",
    [
        (MTAConfig(pre_conv=(3, 5), post_conv=(3, 5)), "post_conv=(3, 5)"),
        (MTAConfig(pre_head_mix=8), "pre_head_mix=8"),
        (MTAConfig(post_head_mix=8), "post_head_mix=8"),
        (MTAConfig(pre_head_mix=2, post_head_mix=3), "pre_head_mix=2 with post_head_mix=3"),
        (MTAConfig(pre_conv=(2, 3), dropout_rate=0.1), "dropout_rate=0.1"),
    ],
)
def test_unsupported_option_is_named(rng, cfg, option):
    num_heads = 24
    q, k, v = random_qkv(rng, 1, 16, num_heads, num_heads, 16)
    params = random_mta_params(cfg, num_heads, 16, rng)
    with pytest.raises(ValueError, match='"pallas" does not support ' + re.escape(option)):
        attention.multi_token_attention(
            q, k, v, params, cfg, implementation="pallas", deterministic=False, dropout_rng=jax.random.key(0)
        )


def test_auto_on_accelerators(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_announced", set())
    paper_full = MTAConfig(pre_conv=(6, 11), post_conv=(6, 11), pre_head_mix=16, post_head_mix=16)
    with caplog.at_level(logging.INFO, logger="mta_jax"):
        assert attention.choose_implementation(MIXED, 512, 512, backend="gpu") == "pallas"
        assert attention.choose_implementation(MIXED, 512, 512, backend="tpu") == "pallas"
        assert attention.choose_implementation(paper_full, 512, 512, backend="gpu") == "blockwise"
        assert (
            attention.choose_implementation(MIXED, 512, 512, backend="gpu", training_dropout=True)
            == "blockwise"
        )
    assert "lack post_conv=(6, 11)" in caplog.records[2].getMessage()
    assert unsupported_option(MIXED) is None


def _export(kernel, platform, head_dim):
    """jax.export of forward + backward at the default tiles: the paper's kq-conv layer, mixing in 4s."""
    cfg = MTAConfig(pre_conv=(6, 11), pre_head_mix=4, post_head_mix=4)
    shape = jax.ShapeDtypeStruct((1, 1024, 16, head_dim), jnp.bfloat16)
    params = jax.eval_shape(lambda: random_mta_params(cfg, 16, head_dim, np.random.default_rng(0)))
    ids = jax.ShapeDtypeStruct((1, 1024), jnp.int32)

    def loss(q, k, v, params, ids):
        out = pallas_attention_core(
            q, k, v, params, cfg, q_segment_ids=ids, kv_segment_ids=ids, dropout_rng=None,
            kernel=kernel, interpret=False,
        )  # fmt: skip
        return jnp.sum(out)

    checks = (
        [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if kernel == "triton" else []
    )
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return jax.export.export(grad, platforms=[platform], disabled_checks=checks)(
        shape, shape, shape, params, ids
    )


@pytest.mark.parametrize(
    "kernel, platform, call", [("triton", "cuda", "triton"), ("tpu", "tpu", "tpu_custom_call")]
)
def test_full_path_lowers_for_accelerators(kernel, platform, call):
    exported = _export(kernel, platform, 128)
    assert call in exported.mlir_module()
