"""Flax NNX layers: MultiTokenAttention, SwiGLU and the RMSNorm the model uses."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec

from mta_jax.attention import multi_token_attention
from mta_jax.config import IMPLEMENTATIONS, ROPE_STYLES, MTAConfig, check_choice, resolve_head_dim
from mta_jax.decode import LayerCache, attend_window, init_layer_cache
from mta_jax.masks import default_positions
from mta_jax.params import MTAParams, init_mta_params
from mta_jax.rope import RopeScaling, apply_rope

MTA_PARAM_NAMES = tuple(f.name for f in dataclasses.fields(MTAParams))


def truncated_normal(std: float, *axes: str) -> nnx.Initializer:
    """Normal(0, std) truncated at +-3 std: torch's trunc_normal_(std=s, a=-3s, b=3s).

    axes: logical axis names of the parameter (see LOGICAL_AXES), kept as metadata for sharding.
    """
    init = jax.nn.initializers.truncated_normal(std, lower=-3.0, upper=3.0)
    return partitioned(init, *axes) if axes else init


# Logical axes of the model's matrices. They are inert metadata here (no mesh needed); the training
# code maps them to mesh axes with its rules (train/mesh.py). Unnamed parameters are replicated.
LOGICAL_AXES = ("embed", "q_heads", "kv_heads", "mlp", "vocab")
# Logical axes of activations, used by `constrain`: hidden states are [batch, length, act_embed].
ACTIVATION_AXES = ("batch", "length", "act_embed")


def constrain(x: jax.Array, *axes: str) -> jax.Array:
    """x with a sharding constraint from its logical axes, when a mesh (jax.set_mesh) and logical axis
    rules (flax.core.spmd.logical_axis_rules) are both active; x unchanged otherwise."""
    rules = spmd.get_logical_axis_rules()
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spmd.from_sharding_rules(axes, rules)))


def partitioned(init: nnx.Initializer, *axes: str) -> nnx.Initializer:
    """init with logical axis names for each dimension, applied only when asked (not eagerly)."""
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def RMSNorm(
    dim: int, *, eps: float = 1e-5, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> nnx.RMSNorm:
    """Flax's RMSNorm with the reference's settings: eps 1e-5, float32 statistics, weight of ones."""
    return nnx.RMSNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class SwiGLU(nnx.Module):
    """w2(silu(w1 x) * w3 x); w1, w3 init std dim^-0.5 and w2 std hidden^-0.5 (the reference's)."""

    def __init__(self, dim: int, hidden_dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        linear = functools.partial(
            nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.w1 = linear(dim, hidden_dim, kernel_init=truncated_normal(dim**-0.5, "embed", "mlp"))
        self.w3 = linear(dim, hidden_dim, kernel_init=truncated_normal(dim**-0.5, "embed", "mlp"))
        self.w2 = linear(hidden_dim, dim, kernel_init=truncated_normal(hidden_dim**-0.5, "mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


def _check_layer_inputs(x, dim: int, positions, segment_ids) -> None:
    """x [B, T, dim]; positions and segment_ids [B, T] (positions may be [T]): named errors."""
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [batch, seq_len, dim={dim}]")
    batch, seq_len, _ = x.shape
    if segment_ids is not None and tuple(segment_ids.shape) != (batch, seq_len):
        raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}: expected [batch, seq_len] = "
                         f"{[batch, seq_len]}")  # fmt: skip
    if positions is not None and tuple(positions.shape) not in ((batch, seq_len), (seq_len,)):
        raise ValueError(f"positions has shape {tuple(positions.shape)}: expected [batch, seq_len] = "
                         f"{[batch, seq_len]} or [seq_len]")  # fmt: skip


class MultiTokenAttention(nnx.Module):
    """Attention with the MTA parts of `mta` (None: standard attention), RoPE and GQA.

    x: [B, T, dim] -> [B, T, dim]. MTA parameters start at the identity (see params.py), so a fresh
    layer with only kq-conv and head mixing is exactly standard causal attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        mta: MTAConfig | None = None,
        rope_theta: float = 100_000.0,
        rope_style: str = "interleaved",
        rope_scaling: RopeScaling | None = None,
        layer_index: int = 0,
        implementation: str = "auto",
        block_q: int | None = None,
        block_k: int | None = None,
        init_std: float | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = resolve_head_dim(dim, num_heads, self.num_kv_heads, head_dim)
        check_choice("rope_style", rope_style, ROPE_STYLES)
        check_choice("implementation", implementation, IMPLEMENTATIONS)
        self.mta = mta if mta is not None else MTAConfig()
        self.mta.check_heads(self.num_heads, self.num_kv_heads)
        self.rope_theta = rope_theta
        self.rope_style = rope_style
        self.rope_scaling = rope_scaling
        self.layer_index = layer_index
        self.implementation = implementation
        self.block_q, self.block_k = block_q, block_k
        self.dtype = dtype
        self.deterministic = False  # dropout on, as nnx.Dropout; model.eval() turns it off

        std = dim**-0.5 if init_std is None else init_std
        linear = functools.partial(
            nnx.Linear,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.wq = linear(dim, q_size, kernel_init=truncated_normal(std, "embed", "q_heads"))
        self.wk = linear(dim, kv_size, kernel_init=truncated_normal(std, "embed", "kv_heads"))
        self.wv = linear(dim, kv_size, kernel_init=truncated_normal(std, "embed", "kv_heads"))
        self.wo = linear(q_size, dim, kernel_init=truncated_normal(std, "q_heads", "embed"))

        params = init_mta_params(
            self.mta, self.num_heads, self.head_dim, rngs.params(), gate_std=std, dtype=param_dtype
        )
        for name in MTA_PARAM_NAMES:
            value = getattr(params, name)
            setattr(self, name, None if value is None else nnx.Param(value))
        # Dropout keys, as nnx.Dropout: the "dropout" stream (or "default"); None when the Rngs has
        # neither (Linen init through nnx.bridge), and then a non-deterministic call raises.
        has_stream = "dropout" in rngs or "default" in rngs
        self.rngs = rngs["dropout"].fork() if self.mta.dropout_rate > 0 and has_stream else None

    def mta_params(self) -> MTAParams:
        """The MTA parameters as the functional core takes them."""
        values = {}
        for name in MTA_PARAM_NAMES:
            param = getattr(self, name)
            values[name] = None if param is None else param[...]
        return MTAParams(**values)

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool | None = None,
    ) -> jax.Array:
        """x: [B, T, dim]; positions: [B, T] RoPE positions (default: restart per segment, else
        0..T-1); segment_ids: [B, T] packed-document ids."""
        _check_layer_inputs(x, self.dim, positions, segment_ids)
        batch, seq_len, _ = x.shape
        if positions is None:
            positions = default_positions(seq_len, segment_ids)
        q = self.wq(x).reshape(batch, seq_len, self.num_heads, self.head_dim)
        k = self.wk(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.wv(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, positions, self.rope_theta, self.rope_style, self.rope_scaling)
        k = apply_rope(k, positions, self.rope_theta, self.rope_style, self.rope_scaling)

        deterministic = self.deterministic if deterministic is None else deterministic
        dropout_rng = self.rngs() if self.rngs is not None and not deterministic else None
        out = multi_token_attention(
            q,
            k,
            v,
            self.mta_params(),
            self.mta,
            segment_ids=segment_ids,
            implementation=self.implementation,
            dropout_rng=dropout_rng,
            deterministic=deterministic,
            layer_index=self.layer_index,
            block_q=self.block_q,
            block_k=self.block_k,
        )
        return self.wo(out.reshape(batch, seq_len, self.num_heads * self.head_dim))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> LayerCache:
        """An empty decoding cache for max_len positions (k, v in `dtype`, default the layer's dtype)."""
        dtype = dtype or self.dtype or self.wk.kernel.dtype
        return init_layer_cache(
            self.mta, batch, max_len, self.num_heads, self.num_kv_heads, self.head_dim, jnp.dtype(dtype)
        )

    def decode(
        self, x: jax.Array, cache: LayerCache, *, positions: jax.Array, segment_ids: jax.Array
    ) -> tuple[jax.Array, LayerCache]:
        """n new tokens after the cached ones (mta_jax/decode.py): x [B, n, dim]; positions,
        segment_ids: [B, n]. Returns ([B, n, dim], the cache with them appended); never dropout."""
        batch, seq_len, _ = x.shape
        q = self.wq(x).reshape(batch, seq_len, self.num_heads, self.head_dim)
        k = self.wk(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.wv(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, positions, self.rope_theta, self.rope_style, self.rope_scaling)
        k = apply_rope(k, positions, self.rope_theta, self.rope_style, self.rope_scaling)
        out, cache = attend_window(
            q, k, v, cache, self.mta_params(), self.mta, segment_ids=segment_ids, layer_index=self.layer_index
        )
        return self.wo(out.reshape(batch, seq_len, self.num_heads * self.head_dim)), cache
