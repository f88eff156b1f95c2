"""Attention maps of one input in a trained model: the plain causal softmax(q k^T / sqrt(D)) of each layer
and head ("before") and the MTA weights that multiply V ("after"). Used by train/pictures.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mta_jax.attention import MASK_VALUE, head_output
from mta_jax.conv import key_query_conv, mix_heads
from mta_jax.layers import MultiTokenAttention
from mta_jax.masks import default_positions, visibility_mask
from mta_jax.model import MTATransformer
from mta_jax.params import MTAParams
from mta_jax.rope import apply_rope


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMaps:
    """One layer's attention weights for one input. before, after: [B, H, T, S] float32.

    before: softmax(q k^T / sqrt(D)) with the causal mask, no MTA part; after: the weights that
    multiply V in the layer (pre conv -> pre head mix -> softmax -> post conv -> post head mix).
    """

    before: jax.Array
    after: jax.Array


def attention_inputs(model: MTATransformer, tokens: jax.Array) -> list[jax.Array]:
    """The input of every layer's attention, attention_norm(h): a list of [B, T, dim], one per layer.

    tokens: [B, T] ints, one document per row (RoPE positions 0..T-1). Dropout off.
    """
    positions = default_positions(tokens.shape[1], None)
    hidden = model.tok_embeddings(tokens)
    inputs = []
    for block in model.layers:
        inputs.append(block.attention_norm(hidden))
        hidden = block(hidden, positions=positions, segment_ids=None, deterministic=True)
    return inputs


def queries_keys_values(
    attention: MultiTokenAttention, x: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, H, D], k and v [B, T, Hkv, D] of one layer for its input x [B, T, dim], RoPE applied."""
    batch, seq_len, _ = x.shape
    positions = default_positions(seq_len, None)
    q = attention.wq(x).reshape(batch, seq_len, attention.num_heads, attention.head_dim)
    k = attention.wk(x).reshape(batch, seq_len, attention.num_kv_heads, attention.head_dim)
    v = attention.wv(x).reshape(batch, seq_len, attention.num_kv_heads, attention.head_dim)
    rope = (attention.rope_theta, attention.rope_style, attention.rope_scaling)
    return apply_rope(q, positions, *rope), apply_rope(k, positions, *rope), v


def raw_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q k^T / sqrt(D) in float32: [B, H, T, S]; query head h reads kv head h // (H / Hkv)."""
    group = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
    return scores * q.shape[-1] ** -0.5


def attention_maps(
    q: jax.Array, k: jax.Array, params: MTAParams, causal: bool, pad_key: str
) -> AttentionMaps:
    """Plain and MTA attention weights (spec sections 1-2) from q [B, T, H, D] and k [B, S, Hkv, D].

    params: the layer's MTAParams (parts that are None are skipped); causal, pad_key: its MTAConfig's.
    """
    scores = raw_scores(q, k)
    visible = visibility_mask(q.shape[1], k.shape[1], causal=causal)[:, None]  # [1, 1, T, S]

    def softmax(x):
        return jnp.where(visible, jax.nn.softmax(jnp.where(visible, x, MASK_VALUE), axis=-1), 0.0)

    before = softmax(scores)
    if params.pre_conv is not None:
        scores = key_query_conv(scores, params.pre_conv.astype(jnp.float32), visible[:, 0], pad_key)
    if params.pre_head_mix is not None:
        scores = mix_heads(scores, params.pre_head_mix)
    after = softmax(scores)
    if params.post_conv is not None:
        after = key_query_conv(after, params.post_conv.astype(jnp.float32), visible[:, 0], pad_key)
        after = jnp.where(visible, after, 0.0)
    if params.post_head_mix is not None:
        after = mix_heads(after, params.post_head_mix)
    return AttentionMaps(before=before, after=after)


def layer_attention_maps(attention: MultiTokenAttention, x: jax.Array) -> AttentionMaps:
    """AttentionMaps of one MultiTokenAttention layer for its input x [B, T, dim]."""
    q, k, _ = queries_keys_values(attention, x)
    return attention_maps(q, k, attention.mta_params(), attention.mta.causal, attention.mta.pad_key)


def output_from_weights(attention: MultiTokenAttention, x: jax.Array, weights: jax.Array) -> jax.Array:
    """What the layer returns for input x [B, T, dim] when its attention weights are weights [B, H, T, S]:
    weights @ V, then the per-head norm / scaling / gate and wo. [B, T, dim]."""
    _, _, v = queries_keys_values(attention, x)
    v = jnp.repeat(v, attention.num_heads // attention.num_kv_heads, axis=2).astype(jnp.float32)
    out = jnp.einsum("bhts,bshd->bthd", weights, v)
    out = head_output(out, attention.mta_params(), attention.mta, attention.layer_index)
    batch, seq_len = x.shape[:2]
    return attention.wo(out.astype(x.dtype).reshape(batch, seq_len, -1))


def model_attention_maps(model: MTATransformer, tokens: jax.Array, layers: Sequence[int]) -> dict:
    """{layer index: AttentionMaps} for tokens [B, T], computed by one compiled program."""
    return _model_attention_maps(model, tokens, tuple(layers))


@nnx.jit(static_argnums=2)
def _model_attention_maps(model: MTATransformer, tokens: jax.Array, layers: tuple[int, ...]) -> dict:
    inputs = attention_inputs(model, tokens)
    return {i: layer_attention_maps(model.layers[i].attention, inputs[i]) for i in layers}
