"""Random inputs and parameters for the tests."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mta_jax.attention import multi_token_attention
from mta_jax.config import MTAConfig
from mta_jax.params import MTAParams, init_mta_params

# Every MTA part on, with uneven sizes (c_q != c_k, groups of 2 before and 4 after the softmax).
FULL = MTAConfig(
    pre_conv=(3, 5),
    post_conv=(2, 3),
    pre_head_mix=2,
    post_head_mix=4,
    group_norm=True,
    depth_scaling=True,
    gate="scalar",
)


def random_mta_params(
    cfg: MTAConfig, num_heads: int, head_dim: int, rng: np.random.Generator, dtype=jnp.float32
) -> MTAParams:
    """MTAParams of the right shapes filled with random values (not the identity)."""
    shapes = init_mta_params(cfg, num_heads, head_dim, jnp.zeros((2,), jnp.uint32))
    values = {}
    for field in dataclasses.fields(MTAParams):
        template = getattr(shapes, field.name)
        if template is not None:
            scale = 1.0 if field.name == "norm_scale" else 0.5
            values[field.name] = jnp.asarray(
                (field.name == "norm_scale") + scale * rng.standard_normal(template.shape), dtype
            )
    return MTAParams(**values)


def params_as_numpy(params: MTAParams) -> dict:
    return {
        f.name: None if getattr(params, f.name) is None else np.asarray(getattr(params, f.name), np.float64)
        for f in dataclasses.fields(MTAParams)
    }


def random_qkv(
    rng: np.random.Generator, batch, q_len, num_heads, num_kv_heads, head_dim, kv_len=None, dtype=jnp.float32
):
    kv_len = q_len if kv_len is None else kv_len
    q = rng.standard_normal((batch, q_len, num_heads, head_dim))
    k = rng.standard_normal((batch, kv_len, num_kv_heads, head_dim))
    v = rng.standard_normal((batch, kv_len, num_kv_heads, head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def random_segment_ids(rng: np.random.Generator, batch: int, length: int, max_docs: int = 4):
    """[B, T] contiguous runs of increasing ids (packed documents of random lengths)."""
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=rng.integers(0, max_docs), replace=False))
        ids = np.zeros(length, np.int32)
        for cut in cuts:
            ids[cut:] += 1
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


# The attention function compiled (eager op-by-op dispatch of the conv loops is slow on CPU).
mta = jax.jit(
    multi_token_attention,
    static_argnames=("cfg", "implementation", "deterministic", "layer_index", "block_q", "block_k"),
)
