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
    """core_reference's output only."""
    return core_reference(*args, causal=causal)[0]


def check(args, *, causal, block_q=16, block_k=16, rtol=1e-4, seed=0):
    """Compare the values and the VJP of a random cotangent with core_reference (one compile for both)."""
    diff = [i for i in DIFF_ARGS if args[i] is not None]

    def value_and_vjp(fn, dargs, cot):
        def partial_fn(*dargs):
            full = list(args)
            for i, a in zip(diff, dargs, strict=True):
                full[i] = a
            return fn(*full, causal=causal)

        out, vjp = jax.vjp(partial_fn, *dargs)
        return out, vjp(cot)

    def both(dargs, cot):
        kernel = functools.partial(mta_core_triton, block_q=block_q, block_k=block_k, interpret=True)
        return value_and_vjp(kernel, dargs, cot), value_and_vjp(reference_out, dargs, cot)

    dargs = [args[i] for i in diff]
    cot = jax.random.normal(
        jax.random.key(seed + 1), args[0].shape[:2] + (args[0].shape[3], args[2].shape[3])
    )
    # The interpreted kernels are large XLA programs: compile them fast rather than well.
    compiled = jax.jit(both).lower(dargs, cot).compile(compiler_options={"xla_backend_optimization_level": 0})
    (got, got_grads), (want, want_grads) = compiled(dargs, cot)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert_close(got, want, rtol, "out")
    for i, g, w in zip(diff, got_grads, want_grads, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (i, g.shape, w.shape, g.dtype, w.dtype)
        assert_close(g, w, rtol, f"grad of argument {i}")


def assert_close(got, want, rtol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(float(np.max(np.abs(want))), 1e-6)
    err = float(np.max(np.abs(got - want)))
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} vs max |ref| {scale:.3g}"


CASES = {
    # T < S (bottom-right causal), GQA, a band crossing kv tiles, no mixing.
    "causal-gqa-t<s": dict(causal=True, kw=dict(heads=4, kv_heads=2, q_len=32, kv_len=64, width=7)),
    # T > S non-causal, one kv head, band as wide as block_k, pre-mix in pairs, two batches.
    "noncausal-t>s-pre": dict(
        causal=False, kw=dict(batch=2, heads=4, kv_heads=1, q_len=64, kv_len=32, width=16, pre=2)
    ),
    # Unequal blocks, pre-mix pairs inside post-mix groups of 4.
    "causal-pre2-post4": dict(
        causal=True, block_q=32, kw=dict(heads=4, kv_heads=2, q_len=64, kv_len=64, width=5, pre=2, post=4)
    ),
    # Groups of 3, T > S causal: the first rows see no key at all (output and gradients 0).
    "causal-t>s-group3": dict(
        causal=True, kw=dict(heads=3, kv_heads=1, slabs=1, q_len=64, kv_len=32, width=None, pre=3, post=3)
    ),
    # Plain attention: no band, no segments, no mixing, C = 3 slabs, D != Dk.
    "noncausal-plain": dict(
        causal=False, block_k=32, kw=dict(slabs=3, dk=32, d=16, width=None, segments=False)
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(seed, name):
    case = dict(CASES[name])
    check(make_inputs(seed, **case.pop("kw")), seed=seed, **case)


def test_bfloat16_matches_reference(seed):
    """bf16 qp, kp, v against core_reference on the same bf16 inputs."""
    args = make_inputs(seed, heads=2, kv_heads=1, width=3, post=2, dtype=jnp.bfloat16)
    check(args, causal=True, rtol=2e-2, seed=seed)
