"""The paper's language model: a Llama-style pre-norm decoder with per-layer MTA (spec section 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mta_jax.config import ModelConfig
from mta_jax.decode import LayerCache, ModelCache, continued_positions
from mta_jax.layers import ACTIVATION_AXES, MultiTokenAttention, RMSNorm, SwiGLU, constrain, truncated_normal
from mta_jax.masks import default_positions


class DecoderBlock(nnx.Module):
    """h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm_args = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention_norm = RMSNorm(cfg.dim, **norm_args)
        self.attention = MultiTokenAttention(
            cfg.dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            mta=cfg.layer_mta(layer_index),
            rope_theta=cfg.rope_theta,
            rope_style=cfg.rope_style,
            rope_scaling=cfg.rope_scaling,
            layer_index=layer_index,
            implementation=cfg.attention_implementation,
            block_q=cfg.attention_block_q,
            block_k=cfg.attention_block_k,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.ffn_norm = RMSNorm(cfg.dim, **norm_args)
        self.feed_forward = SwiGLU(
            cfg.dim, cfg.ffn_hidden_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x, *, positions, segment_ids, deterministic=None):
        h = x + self.attention(
            self.attention_norm(x),
            positions=positions,
            segment_ids=segment_ids,
            deterministic=deterministic,
        )
        return h + self.feed_forward(self.ffn_norm(h))

    def decode(self, x, cache: LayerCache, *, positions, segment_ids) -> tuple[jax.Array, LayerCache]:
        """__call__ for n new tokens after the cached ones: x [B, n, dim] -> ([B, n, dim], cache)."""
        attended, cache = self.attention.decode(
            self.attention_norm(x), cache, positions=positions, segment_ids=segment_ids
        )
        h = x + attended
        return h + self.feed_forward(self.ffn_norm(h)), cache


class MTATransformer(nnx.Module):
    """tokens [B, T] -> logits [B, T, vocab] in float32 (float64 for a float64 model). Embeddings tied to
    the output by default."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if "float64" in (cfg.dtype, cfg.param_dtype) and not jax.config.jax_enable_x64:
            raise ValueError(
                "a float64 model needs 64-bit jax: jax.config.update('jax_enable_x64', True), "
                "JAX_ENABLE_X64=1 or `with jax.enable_x64(True):` (without it the arrays would be float32)"
            )
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        std = cfg.dim**-0.5
        self.tok_embeddings = nnx.Embed(
            cfg.vocab_size,
            cfg.dim,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=truncated_normal(std, "vocab", "embed"),
            rngs=rngs,
        )
        self.layers = nnx.List([DecoderBlock(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.output = (
            None
            if cfg.tie_embeddings
            else nnx.Linear(
                cfg.dim,
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=truncated_normal(std, "embed", "vocab"),
                rngs=rngs,
            )
        )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool | None = None,
    ) -> jax.Array:
        """tokens: [B, T] ints; positions: [B, T] (default: restart at every new segment id);
        segment_ids: [B, T] ids of packed documents (None: one document per row)."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens with shape {tokens.shape} and dtype {tokens.dtype} is invalid: "
                "must be integer [B, T]"
            )
        if segment_ids is not None and tuple(segment_ids.shape) != tuple(tokens.shape):
            raise ValueError(
                f"segment_ids has shape {tuple(segment_ids.shape)}: "
                f"expected tokens' shape {tuple(tokens.shape)}"
            )
        if positions is not None and tuple(positions.shape) not in (tuple(tokens.shape), tokens.shape[1:]):
            raise ValueError(
                f"positions has shape {tuple(positions.shape)}: expected tokens' shape {tuple(tokens.shape)}"
            )
        if positions is None:
            positions = default_positions(tokens.shape[1], segment_ids)
        h = constrain(self.tok_embeddings(tokens), *ACTIVATION_AXES)
        for layer in self.layers:
            h = layer(h, positions=positions, segment_ids=segment_ids, deterministic=deterministic)
            h = constrain(h, *ACTIVATION_AXES)
        h = self.norm(h)
        logits = self.tok_embeddings.attend(h) if self.output is None else self.output(h)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> ModelCache:
        """An empty decoding cache for `batch` rows of up to max_len tokens (see mta_jax/decode.py).
        dtype: of the cached keys and values (default: the model's dtype). Raises ValueError when a
        layer is not causal."""
        return ModelCache(
            layers=tuple(layer.attention.init_cache(batch, max_len, dtype) for layer in self.layers),
            last_segment=jnp.zeros((batch,), jnp.int32),
            last_position=jnp.full((batch,), -1, jnp.int32),
        )

    def decode(
        self,
        tokens: jax.Array,
        cache: ModelCache,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, ModelCache]:
        """Logits of n new tokens [B, n] that follow the cached ones, and the cache with them appended.

        Prefill (n = prompt or chunk length) and generation steps (n = 1) alike give the logits that
        __call__ gives on the whole sequence at those positions. segment_ids: [B, n] document ids >= 0
        (default: the last cached token's, i.e. continue its document); positions: [B, n] RoPE positions
        (default: continue the last cached token's document, restart at 0 at a new segment id).
        Returns (logits [B, n, vocab] float32 or wider, cache). Keep cache.length + n <= cache.max_len.
        """
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens with shape {tokens.shape} and dtype {tokens.dtype} is invalid: "
                "must be integer [B, n]"
            )
        for name, value in (("segment_ids", segment_ids), ("positions", positions)):
            if value is not None and (
                value.shape != tokens.shape or not jnp.issubdtype(value.dtype, jnp.integer)
            ):
                raise ValueError(
                    f"{name} with shape {value.shape} and dtype {value.dtype} is invalid: "
                    f"must be integer [B, n] = {tokens.shape}, as tokens"
                )
        if segment_ids is None:
            segment_ids = jnp.broadcast_to(cache.last_segment[:, None], tokens.shape)
        segment_ids = segment_ids.astype(jnp.int32)
        if positions is None:
            positions = continued_positions(segment_ids, cache.last_segment, cache.last_position)
        h = self.tok_embeddings(tokens)
        layer_caches = []
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            h, layer_cache = layer.decode(h, layer_cache, positions=positions, segment_ids=segment_ids)
            layer_caches.append(layer_cache)
        h = self.norm(h)
        logits = self.tok_embeddings.attend(h) if self.output is None else self.output(h)
        cache = ModelCache(
            layers=tuple(layer_caches),
            last_segment=segment_ids[:, -1],
            last_position=positions[:, -1].astype(jnp.int32),
        )
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), cache


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters of the model, counted on abstract shapes (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: MTATransformer(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    return sum(leaf.size for leaf in leaves)
