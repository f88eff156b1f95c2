"""The d-space glue (kernels/dspace.py) + the dense core op equal the reference path, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.core_reference import core_reference, expand_band
from kernels.dspace import dspace_operands
from mta_jax.attention import reference_attention_core
from mta_jax.config import MTAConfig
from tests.helpers import random_mta_params, random_qkv, random_segment_ids

CASES = {
    "6x11_packed": (MTAConfig(pre_conv=(6, 11)), 23, 23, True),
    "3x5_kv_longer": (MTAConfig(pre_conv=(3, 5)), 9, 17, False),
    "2x4_left_packed_kv_longer": (MTAConfig(pre_conv=(2, 4), pad_key="left"), 11, 19, True),
    "3x4_right_q_longer": (MTAConfig(pre_conv=(3, 4), pad_key="right"), 17, 10, True),
    "non_causal_packed": (MTAConfig(pre_conv=(3, 5), causal=False), 14, 14, True),
    "with_head_mixing": (MTAConfig(pre_conv=(2, 3), pre_head_mix=2, post_head_mix=4), 13, 13, True),
}


def _segments(rng, batch, q_len, kv_len, packed):
    if not packed:
        return None, None
    q_ids = random_segment_ids(rng, batch, q_len)
    if kv_len == q_len:
        return q_ids, q_ids
    return q_ids, random_segment_ids(rng, batch, kv_len)


@pytest.mark.parametrize("name", CASES)
def test_glue_and_dense_core_equal_reference(rng, name):
    cfg, q_len, kv_len, packed = CASES[name]
    with jax.enable_x64(True):
        q, k, v = random_qkv(rng, 2, q_len, 4, 2, 8, kv_len=kv_len, dtype=jnp.float64)
        params = random_mta_params(cfg, 4, 8, rng, dtype=jnp.float64)
        q_ids, kv_ids = _segments(rng, 2, q_len, kv_len, packed)

        def reference(q, k, v, params):
            return reference_attention_core(
                q, k, v, params, cfg, q_segment_ids=q_ids, kv_segment_ids=kv_ids, dropout_rng=None
            )

        def through_glue(q, k, v, params):
            ids_q = jnp.zeros((2, q_len), jnp.int32) if q_ids is None else q_ids
            ids_kv = jnp.zeros((2, kv_len), jnp.int32) if kv_ids is None else kv_ids
            qp, kp, band = dspace_operands(q, k, params.pre_conv, ids_q, ids_kv, cfg.pad_key, cfg.causal)
            out, _ = core_reference(
                qp, kp, v.transpose(0, 2, 1, 3), band, ids_q, ids_kv, params.pre_head_mix,
                params.post_head_mix, causal=cfg.causal,
            )  # fmt: skip
            return out.transpose(0, 2, 1, 3)

        want, want_vjp = jax.vjp(jax.jit(reference), q, k, v, params)
        got, got_vjp = jax.vjp(jax.jit(through_glue), q, k, v, params)
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
        cotangent = jnp.asarray(rng.standard_normal(want.shape))
        for g, w in zip(
            jax.tree.leaves(got_vjp(cotangent)), jax.tree.leaves(want_vjp(cotangent)), strict=True
        ):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-11)


def test_band_is_thin_and_only_for_causal(rng):
    """The correction lives in pr + c_q - 1 diagonals (4 + 5 for 6x11 "both"); non-causal needs none."""
    q, k, _ = random_qkv(rng, 1, 16, 2, 2, 8)
    kernel = jnp.asarray(rng.standard_normal((2, 6, 11)), jnp.float32)
    ids = jnp.zeros((1, 16), jnp.int32)
    _, _, band = dspace_operands(q, k, kernel, ids, ids, "both", causal=True)
    assert band.shape == (1, 2, 16, 10)
    assert dspace_operands(q, k, kernel, ids, ids, "both", causal=False)[2] is None
    dense = expand_band(band, 16)
    assert float(jnp.abs(jnp.triu(dense[0, 0], 1)).max()) == 0.0  # nothing above the diagonal
    assert float(jnp.abs(jnp.tril(dense[0, 0], -10)).max()) == 0.0  # nor below the band


def test_glue_keeps_only_its_inputs_for_the_backward():
    """Autodiff of the glue keeps q, k, the kernel, the ids and the W super-diagonal scores R alone: no
    query slab, key tap or band term (those were C-, c_k- and W-fold copies of q and k)."""
    from jax._src.ad_checkpoint import saved_residuals

    batch, length, heads, kv_heads, dim = 1, 64, 4, 2, 16
    q = jnp.ones((batch, length, heads, dim))
    k = jnp.ones((batch, length, kv_heads, dim))
    kernel = jnp.ones((heads, 6, 11))
    ids = jnp.zeros((batch, length), jnp.int32)
    residuals = saved_residuals(
        lambda q, k, w: dspace_operands(q, k, w, ids, ids, "both", True), q, k, kernel
    )
    width = 10  # pr + c_q - 1
    allowed = q.nbytes + k.nbytes + kernel.nbytes + 2 * ids.nbytes + batch * heads * width * length * 4
    assert sum(aval.size * aval.dtype.itemsize for aval, _ in residuals) <= allowed
