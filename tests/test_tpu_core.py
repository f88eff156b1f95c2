"""kernels/tpu_core.py: values and gradients against core_reference (Mosaic interpret mode on CPU), lowering
for TPU at the default block sizes, and the block-size errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.core_reference import core_reference
from kernels.tpu_core import mta_core_tpu
from kernels.tpu_tiles import TpuBlockSizes, TpuTiles

# (name, shape and options); blocks of 128 give several tiles where T or S is 256.
CASES = {
    "g1_causal_gqa_band": dict(heads=2, kv_heads=1, slabs=2, q_len=128, kv_len=128, width=4, causal=True),
    "g1_causal_tall_noband": dict(
        heads=1, kv_heads=1, slabs=1, q_len=256, kv_len=128, causal=True
    ),  # empty rows
    "pre_bottom_right": dict(
        heads=2, kv_heads=1, slabs=1, q_len=128, kv_len=256, width=3, causal=True, pre=2
    ),
    "pre2_post4_gqa": dict(
        heads=4, kv_heads=2, slabs=1, q_len=128, kv_len=256, width=2, causal=True, pre=2, post=4
    ),
}
# Attention dropout: with the online softmax (no post mix) and after the post mix.
CASES["dropout_online_gqa"] = dict(
    heads=2, kv_heads=1, slabs=2, q_len=128, kv_len=256, width=4, causal=True, dropout=0.4
)
CASES["dropout_pre2_post4"] = dict(
    heads=4, kv_heads=2, slabs=1, q_len=128, kv_len=128, width=2, causal=False, pre=2, post=4, dropout=0.25
)
# The paper's mixing: all 16 heads before and after the softmax (4 kv heads), with dropout.
CASES["mix16_dropout"] = dict(
    heads=16, kv_heads=4, slabs=1, q_len=128, kv_len=128, width=3, causal=True, pre=16, post=16, batch=1,
    dropout=0.1,
)  # fmt: skip
BF16_CASES = {
    "g1_noncausal_band": dict(heads=2, kv_heads=1, slabs=2, q_len=128, kv_len=128, width=5, causal=False),
    "pre_post_causal": dict(
        heads=2, kv_heads=1, slabs=1, q_len=128, kv_len=128, width=3, causal=True, pre=2, post=2
    ),
}


def _segments(rng: np.random.Generator, batch: int, length: int) -> jax.Array:
    """Random contiguous segment ids: a cumulative sum of random 0/1 segment starts."""
    return jnp.asarray(np.cumsum(rng.random((batch, length)) < 0.03, axis=1), jnp.int32)


def _inputs(
    rng, heads, kv_heads, slabs, q_len, kv_len, causal, width=0, pre=0, post=0, batch=2, dk=16, dim=8,
    blocks=None, dropout=0.0,
):  # fmt: skip
    def normal(*shape, scale=0.5):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    q_seg = _segments(rng, batch, q_len)
    kv_seg = q_seg if q_len == kv_len else _segments(rng, batch, kv_len)
    return dict(
        qp=normal(batch, heads, slabs, q_len, dk),
        kp=normal(batch, heads, slabs, kv_len, dk),
        v=normal(batch, kv_heads, kv_len, dim),
        band=normal(batch, heads, q_len, width) if width else None,
        pre_mix=normal(heads // pre, pre, pre) if pre else None,
        post_mix=normal(heads // post, post, post) if post else None,
        segs=(q_seg, kv_seg),
        causal=causal,
        blocks=blocks,
        dropout=dropout_options(rng, dropout, batch, heads),
    )


def dropout_options(rng, rate: float, batch: int, heads: int) -> dict:
    """Keyword arguments for attention dropout at `rate` (none when 0): random seeds [B, H] and
    front-padding offsets, so that the positions hashed are not the rows' indices."""
    if not rate:
        return {}
    seeds = jnp.asarray(rng.integers(0, 2**32, (batch, heads), dtype=np.uint32))
    offsets = rng.integers(0, 9, 2)
    return dict(dropout_seeds=seeds, dropout_rate=rate, q_offset=int(offsets[0]), kv_offset=int(offsets[1]))


# Each kernel its own tiles; dQ and dK/dV with query tiles under 128 rows.
MIXED_TILES = TpuBlockSizes(fwd=TpuTiles(128, 128), dq=TpuTiles(64, 128), dkv=TpuTiles(32, 256))
CASES["own_tiles_pre2_post4"] = dict(
    heads=4, kv_heads=2, slabs=2, q_len=128, kv_len=256, width=3, causal=True, pre=2, post=4,
    blocks=MIXED_TILES,
)  # fmt: skip


def _check(inputs: dict, dtype, rtol: float) -> None:
    """Values and all gradients (vjp with a random cotangent) of the kernel against core_reference."""
    q_seg, kv_seg = inputs["segs"]
    causal = inputs["causal"]
    tiles = dict(block_sizes=inputs["blocks"]) if inputs.get("blocks") else dict(block_q=128, block_k=128)
    names = ("qp", "kp", "v", "band", "pre_mix", "post_mix")
    args = [inputs[n] for n in names]
    args[:3] = [a.astype(dtype) for a in args[:3]]

    def kernel(qp, kp, v, band, pre_mix, post_mix):
        return mta_core_tpu(
            qp,
            kp,
            v,
            band,
            q_seg,
            kv_seg,
            pre_mix,
            post_mix,
            causal=causal,
            interpret=True,
            **tiles,
            **inputs["dropout"],
        )

    def reference(qp, kp, v, band, pre_mix, post_mix):
        return core_reference(
            qp, kp, v, band, q_seg, kv_seg, pre_mix, post_mix, causal=causal, **inputs["dropout"]
        )[0]

    batch, heads, _, q_len, _ = args[0].shape
    cotangent = jnp.asarray(
        np.random.default_rng(0).standard_normal((batch, heads, q_len, args[2].shape[-1]))
    )

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_vjp(fn, args, cotangent):  # one compilation each: eager mode would compile every glue op
        out, fn_vjp = jax.vjp(fn, *args)
        return out, fn_vjp(cotangent.astype(jnp.float32))

    out, grads = value_and_vjp(kernel, args, cotangent)
    want, want_grads = value_and_vjp(reference, args, cotangent)
    assert_values_and_gradients_close(names, (out, grads), (want, want_grads), rtol)


def assert_values_and_gradients_close(names, got, want, rtol: float) -> None:
    """got / want: (out, gradients by name) of the kernels and of core_reference; float32 out, tolerances
    relative to each array's largest entry; a None gradient on one side must be None on the other."""
    out, grads = got
    want, want_grads = want
    assert out.dtype == jnp.float32 and out.shape == want.shape
    np.testing.assert_allclose(out, want, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(want))))
    for name, got, exp in zip(names, grads, want_grads, strict=True):
        if exp is None:
            assert got is None, name
            continue
        got, exp = np.asarray(got, np.float32), np.asarray(exp, np.float32)
        scale = float(np.max(np.abs(exp))) or 1.0
        np.testing.assert_allclose(got, exp, rtol=rtol, atol=rtol * scale, err_msg=name)


# 16-head mixing interpreted costs about a minute: run with --runslow (its v5e compile stays in the fast run).
SLOW_CASES = {"mix16_dropout"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES]
)
def test_matches_reference_f32(case, rng):
    _check(_inputs(rng, **CASES[case]), jnp.float32, 1e-4)


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_matches_reference_bf16(case, rng):
    _check(_inputs(rng, **BF16_CASES[case]), jnp.bfloat16, 2e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_q=96), "block_q=96"),
        (dict(block_k=96), "block_k=96"),
        (dict(block_k=64), "block_k=64"),  # divides S = 256 but is neither a multiple of 128 nor S
        (dict(block_k=200), "block_k=200"),
    ],
)
def test_bad_blocks(kwargs, match):
    batch, heads, q_len = 1, 2, 256
    qp = jnp.zeros((batch, heads, 1, q_len, 8))
    v = jnp.zeros((batch, heads, q_len, 8))
    seg = jnp.zeros((batch, q_len), jnp.int32)
    with pytest.raises(ValueError, match=match):
        mta_core_tpu(qp, qp, v, None, seg, seg, None, None, causal=True, interpret=True, **kwargs)


def test_band_wider_than_block():
    batch, heads, q_len = 1, 1, 128
    qp = jnp.zeros((batch, heads, 1, q_len, 8))
    seg = jnp.zeros((batch, q_len), jnp.int32)
    band = jnp.zeros((batch, heads, q_len, 129))
    with pytest.raises(ValueError, match="W=129"):
        mta_core_tpu(qp, qp, qp[:, :, 0], band, seg, seg, None, None, causal=True, interpret=True)


def test_uneven_mix_groups():
    batch, heads, q_len = 1, 6, 128
    qp = jnp.zeros((batch, heads, 1, q_len, 8))
    seg = jnp.zeros((batch, q_len), jnp.int32)
    pre, post = jnp.zeros((3, 2, 2)), jnp.zeros((2, 3, 3))
    with pytest.raises(ValueError, match="multiple"):
        mta_core_tpu(qp, qp, qp[:, :, 0], None, seg, seg, pre, post, causal=True, interpret=True)
