"""A Linen face for the attention layer, for models written in flax.linen.

It runs the NNX layer (mta_jax.layers.MultiTokenAttention) through flax's nnx.bridge, so both faces
share one implementation; the parameters sit under "attention":
{"attention": {"wq": {"kernel"}, "wk", "wv", "wo", "pre_conv", "post_conv", "pre_head_mix", ...}}.
The projection matrices come boxed with their logical axes ("embed", "q_heads", "kv_heads"), so
nn.get_partition_spec(variables) and nn.logical_to_mesh_sharding work; nn.unbox(variables) gives arrays.

    attn = MultiTokenAttention(dim=512, num_heads=8, mta=MTAConfig(pre_conv=(6, 11)))
    variables = attn.init(jax.random.key(0), x)           # x: [B, T, dim]
    y = attn.apply(variables, x, deterministic=False, rngs={"dropout": key})
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.nnx import bridge

from mta_jax import layers
from mta_jax.config import MTAConfig


class MultiTokenAttention(nn.Module):
    """Linen MTA attention: x [B, T, dim] -> [B, T, dim]; arguments as layers.MultiTokenAttention."""

    dim: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mta: MTAConfig | None = None
    rope_theta: float = 100_000.0
    rope_style: str = "interleaved"
    layer_index: int = 0
    implementation: str = "auto"
    block_q: int | None = None
    block_k: int | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool | None = None,
    ) -> jax.Array:
        """deterministic must be given when the config has dropout; dropout then draws from the
        "dropout" rng stream (apply(..., rngs={"dropout": key}))."""
        if self.mta is not None and self.mta.dropout_rate > 0:
            if deterministic is None:
                raise ValueError(
                    f"deterministic=None is invalid: dropout_rate={self.mta.dropout_rate} needs "
                    "deterministic=True (eval) or False (train)"
                )
            if not deterministic and not self.is_initializing() and not self.has_rng("dropout"):
                raise ValueError(
                    'deterministic=False needs a "dropout" rng: apply(..., rngs={"dropout": key})'
                )
        else:
            deterministic = True
        attention = bridge.ToLinen(
            layers.MultiTokenAttention,
            args=(self.dim, self.num_heads, self.num_kv_heads, self.head_dim),
            kwargs=dict(
                mta=self.mta,
                rope_theta=self.rope_theta,
                rope_style=self.rope_style,
                layer_index=self.layer_index,
                implementation=self.implementation,
                block_q=self.block_q,
                block_k=self.block_k,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            ),
            name="attention",
        )
        return attention(x, positions=positions, segment_ids=segment_ids, deterministic=deterministic)
