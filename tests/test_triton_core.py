"""The Triton core kernel (interpret mode on CPU) against the dense core_reference: values and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.core_reference import core_reference
from kernels.triton_core import mta_core_triton

DIFF_ARGS = (0, 1, 2, 3, 6, 7)  # qp, kp, v, band, pre_mix, post_mix


def segment_ids(key, batch: int, length: int, rate: float = 0.04) -> jax.Array:
    """[B, L] int32 contiguous runs: a new segment starts at each random 1."""
    starts = jax.random.bernoulli(key, rate, (batch, length)).astype(jnp.int32)
    return jnp.cumsum(starts, axis=1)


def make_inputs(
    seed: int,
    *,
    batch=1,
    heads=2,
    kv_heads=2,
    slabs=2,
    q_len=64,
    kv_len=64,
    dk=16,
    d=16,
    width=5,
    pre=None,
    post=None,
    dtype=jnp.float32,
    segments=True,
):
    """Random core-op arguments (qp, kp, v, band, q_ids, kv_ids, pre_mix, post_mix)."""
    keys = jax.random.split(jax.random.key(seed), 9)
    scale = (slabs * dk) ** -0.5
    qp = (scale * jax.random.normal(keys[0], (batch, heads, slabs, q_len, dk))).astype(dtype)
    kp = jax.random.normal(keys[1], (batch, heads, slabs, kv_len, dk)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, kv_heads, kv_len, d)).astype(dtype)
    band = None if width is None else 0.5 * jax.random.normal(keys[3], (batch, heads, q_len, width))
    if segments:
        # Run boundaries in key positions, shared with the (bottom-right aligned) queries.
        kv_ids = segment_ids(keys[4], batch, kv_len)
        q_ids = kv_ids[:, kv_len - q_len :] if kv_len >= q_len else segment_ids(keys[5], batch, q_len)
    else:
        q_ids = jnp.zeros((batch, q_len), jnp.int32)
        kv_ids = jnp.zeros((batch, kv_len), jnp.int32)
    pre_mix = None if pre is None else jax.random.normal(keys[6], (heads // pre, pre, pre)) / pre
    post_mix = None if post is None else jax.random.normal(keys[7], (heads // post, post, post)) / post
    return qp, kp, v, band, q_ids, kv_ids, pre_mix, post_mix


def reference_out(*args, causal):
    return core_reference(*args, causal=causal)[0]


def check(args, *, causal, block_q=32, block_k=32, rtol=1e-4, grad=True, seed=0):
    """Compare values and (with grad) the VJP of a random cotangent against core_reference."""
    kernel = functools.partial(
        mta_core_triton, causal=causal, block_q=block_q, block_k=block_k, interpret=True
    )
    reference = functools.partial(reference_out, causal=causal)
    diff = [i for i in DIFF_ARGS if args[i] is not None]

    def pick(fn):
        def wrapped(*dargs):
            full = list(args)
            for i, a in zip(diff, dargs, strict=True):
                full[i] = a
            return fn(*full)

        return wrapped

    dargs = [args[i] for i in diff]
    got, got_vjp = jax.vjp(pick(kernel), *dargs)
    want, want_vjp = jax.vjp(pick(reference), *dargs)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert_close(got, want, rtol, "out")
    if not grad:
        return
    cot = jax.random.normal(jax.random.key(seed + 1), want.shape)
    for i, g, w in zip(diff, got_vjp(cot), want_vjp(cot), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (i, g.shape, w.shape, g.dtype, w.dtype)
        assert_close(g, w, rtol, f"grad {i}")


def assert_close(got, want, rtol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(float(np.max(np.abs(want))), 1e-6)
    err = float(np.max(np.abs(got - want)))
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.parametrize("causal", [True, False])
def test_basic(seed, causal):
    check(make_inputs(seed), causal=causal, seed=seed)
