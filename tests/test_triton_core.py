"""The Triton core kernel against the dense core_reference: values and gradients.

Interpreted on CPU; compiled and run on a GPU with MTA_PALLAS_INTERPRET=0 (bench/gpu_check.sh).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.core_reference import core_reference
from kernels.triton_common import KernelTiles, TritonBlockSizes
from kernels.triton_core import mta_core_triton

DIFF_ARGS = (0, 1, 2, 3, 6, 7)  # qp, kp, v, band, pre_mix, post_mix
INTERPRET = os.environ.get("MTA_PALLAS_INTERPRET", "1") != "0"


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
        # With T > S the first T - S queries sit before every key; the rest line up with the keys, so
        # every key-visible query shares its key's document (unrelated ids could hide every key).
        if kv_len >= q_len:
            q_ids = kv_ids[:, kv_len - q_len :]
        else:
            q_ids = jnp.concatenate([jnp.repeat(kv_ids[:, :1], q_len - kv_len, axis=1), kv_ids], axis=1)
    else:
        q_ids = jnp.zeros((batch, q_len), jnp.int32)
        kv_ids = jnp.zeros((batch, kv_len), jnp.int32)
    pre_mix = None if pre is None else jax.random.normal(keys[6], (heads // pre, pre, pre)) / pre
    post_mix = None if post is None else jax.random.normal(keys[7], (heads // post, post, post)) / post
    return qp, kp, v, band, q_ids, kv_ids, pre_mix, post_mix


def reference_out(*args, **options):
    """core_reference's output only."""
    return core_reference(*args, **options)[0]


def dropout_options(seed: int, rate: float, batch: int, heads: int) -> dict:
    """Keyword arguments for attention dropout at `rate`: random seeds [B, H] and front-padding
    offsets, so that the positions hashed are not the rows' indices."""
    keys = jax.random.split(jax.random.key(seed + 7))
    seeds = jax.random.bits(keys[0], (batch, heads), jnp.uint32)
    q_offset, kv_offset = (int(x) for x in jax.random.randint(keys[1], (2,), 0, 9))
    return dict(dropout_seeds=seeds, dropout_rate=rate, q_offset=q_offset, kv_offset=kv_offset)


def check(args, *, causal, block_q=16, block_k=16, rtol=1e-4, seed=0, blocks=None, dropout=0.0):
    """Compare the values and the VJP of a random cotangent with core_reference (one compile for both)."""
    drop = dropout_options(seed, dropout, *args[0].shape[:2]) if dropout else {}
    diff = [i for i in DIFF_ARGS if args[i] is not None]

    def value_and_vjp(fn, dargs, cot):
        def partial_fn(*dargs):
            full = list(args)
            for i, a in zip(diff, dargs, strict=True):
                full[i] = a
            return fn(*full, causal=causal, **drop)

        out, vjp = jax.vjp(partial_fn, *dargs)
        return out, vjp(cot)

    def both(dargs, cot):
        if blocks is None:
            kernel = functools.partial(mta_core_triton, block_q=block_q, block_k=block_k, interpret=INTERPRET)
        else:
            kernel = functools.partial(mta_core_triton, block_sizes=blocks, interpret=INTERPRET)
        return value_and_vjp(kernel, dargs, cot), value_and_vjp(reference_out, dargs, cot)

    dargs = [args[i] for i in diff]
    cot = jax.random.normal(
        jax.random.key(seed + 1), args[0].shape[:2] + (args[0].shape[3], args[2].shape[3])
    )
    # The interpreted kernels are large XLA programs: compile them fast rather than well.
    options = {"xla_backend_optimization_level": 0} if INTERPRET else None
    compiled = jax.jit(both).lower(dargs, cot).compile(compiler_options=options)
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
    # T > S non-causal, one kv head, a band as wide as block_k, two batches.
    "noncausal-t>s-wide-band": dict(
        causal=False, kw=dict(batch=2, heads=2, kv_heads=1, q_len=64, kv_len=32, width=16)
    ),
    # Unequal blocks, pre-mix pairs inside post-mix groups of 4.
    "causal-pre2-post4": dict(
        causal=True, block_q=32, kw=dict(heads=4, kv_heads=2, q_len=64, kv_len=64, width=5, pre=2, post=4)
    ),
    # Groups of 3, T > S causal: the first rows see no key at all (output and gradients 0).
    "causal-t>s-group3": dict(
        causal=True, kw=dict(heads=3, kv_heads=1, slabs=1, q_len=64, kv_len=32, width=None, pre=3, post=3)
    ),
    # Pre-mix only; no band, no segments, C = 3 slabs, D != Dk.
    "noncausal-pre2-plain": dict(
        causal=False,
        block_k=32,
        kw=dict(heads=2, kv_heads=1, slabs=3, dk=32, d=16, width=None, pre=2, segments=False),
    ),
}


# Each kernel its own tiles, and the backward's accumulators split into slab chunks (every chunk
# recomputes the score tiles): the chunks must add up to the whole gradient.
CHUNKED = TritonBlockSizes(
    fwd=KernelTiles(32, 16), dq=KernelTiles(16, 32, slab_chunk=1), dkv=KernelTiles(16, 16, slab_chunk=1)
)
CASES["chunked-tiles-pre2-post4"] = dict(
    causal=True,
    blocks=CHUNKED,
    kw=dict(heads=4, kv_heads=2, slabs=3, q_len=64, kv_len=64, width=7, pre=2, post=4),
)
CASES["chunked-tiles-t<s"] = dict(
    causal=True, blocks=CHUNKED, kw=dict(heads=2, kv_heads=1, slabs=2, q_len=32, kv_len=64, width=5)
)


# Attention dropout: with the online softmax (no post mix), after the post mix, with slab chunks.
CASES["dropout-online-gqa"] = dict(
    causal=True, dropout=0.4, kw=dict(heads=2, kv_heads=1, q_len=32, kv_len=64, width=5)
)
CASES["dropout-pre2-post4-chunked"] = dict(
    causal=False, dropout=0.25, blocks=CHUNKED,
    kw=dict(heads=4, kv_heads=2, slabs=2, q_len=64, kv_len=64, width=None, pre=2, post=4),
)  # fmt: skip
# The paper's mixing: all 16 heads before and after the softmax (4 kv heads), with dropout.
CASES["mix16-dropout"] = dict(
    causal=True, dropout=0.1,
    kw=dict(heads=16, kv_heads=4, slabs=2, q_len=32, kv_len=32, width=3, pre=16, post=16),
)  # fmt: skip


# Minutes interpreted (256 unrolled mixing products per tile); GPU "auto" does not fuse groups of 16.
SLOW_CASES = {"mix16-dropout"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n for n in CASES]
)
def test_matches_reference(seed, name):
    case = dict(CASES[name])
    check(make_inputs(seed, **case.pop("kw")), seed=seed, **case)


def test_bfloat16_matches_reference(seed):
    """bf16 qp, kp, v against core_reference on the same bf16 inputs."""
    args = make_inputs(seed, heads=2, kv_heads=1, width=3, post=2, dtype=jnp.bfloat16)
    check(args, causal=True, rtol=2e-2, seed=seed)


def abstract_inputs(heads=4, kv_heads=2, q_len=64, kv_len=64, dk=16, d=16, width=5, pre=None, post=None):
    """ShapeDtypeStruct arguments: enough for the checks, which run at trace time (jax.eval_shape)."""
    f32, i32 = jnp.float32, jnp.int32
    return [
        jax.ShapeDtypeStruct((1, heads, 2, q_len, dk), f32),
        jax.ShapeDtypeStruct((1, heads, 2, kv_len, dk), f32),
        jax.ShapeDtypeStruct((1, kv_heads, kv_len, d), f32),
        None if width is None else jax.ShapeDtypeStruct((1, heads, q_len, width), f32),
        jax.ShapeDtypeStruct((1, q_len), i32),
        jax.ShapeDtypeStruct((1, kv_len), i32),
        None if pre is None else jax.ShapeDtypeStruct((heads // pre, pre, pre), f32),
        None if post is None else jax.ShapeDtypeStruct((heads // post, post, post), f32),
    ]


def test_accepts_good_shapes():
    out = jax.eval_shape(functools.partial(mta_core_triton, causal=True), *abstract_inputs(pre=2, post=4))
    assert out.shape == (1, 4, 64, 16) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "inputs, options, match",
    [
        ({}, dict(block_q=24), "block_q"),
        ({}, dict(block_q=8), "block_q"),
        ({}, dict(block_sizes=TritonBlockSizes(dq=KernelTiles(slab_chunk=3))), "slab_chunk=3"),
        ({}, dict(block_k=48), "block_k"),
        ({}, dict(block_q=128), "block_q"),  # does not divide T = 64
        ({}, dict(block_k=128), "block_k"),
        (dict(width=17), dict(block_k=16), "W=17"),
        (dict(dk=8), {}, "Dk=8"),
        (dict(d=24), {}, "D=24"),
        (dict(kv_heads=3), {}, "Hkv"),
        (dict(pre=3), {}, "pre_mix"),
        (dict(heads=8, pre=4, post=3), {}, "post_mix"),
        (dict(heads=6, pre=2, post=3), {}, "divide"),
    ],
)
def test_rejects_bad_arguments(inputs, options, match):
    args = abstract_inputs(**inputs)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(functools.partial(mta_core_triton, causal=True, **options), *args)
