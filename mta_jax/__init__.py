"""mta-jax: Multi-Token Attention (Golovneva et al., 2025) in JAX and Flax.

Functional core: multi_token_attention(q, k, v, params, cfg, ...) with MTAParams / init_mta_params.
Flax NNX: layers.MultiTokenAttention, model.MTATransformer; Linen: linen.MultiTokenAttention.
"""

from mta_jax.attention import multi_token_attention
from mta_jax.config import ModelConfig, MTAConfig, load_model_config
from mta_jax.layers import MultiTokenAttention, SwiGLU
from mta_jax.masks import positions_from_segment_ids, visibility_mask
from mta_jax.model import MTATransformer, count_params
from mta_jax.params import MTAParams, init_mta_params

__all__ = [
    "MTAConfig",
    "MTAParams",
    "MTATransformer",
    "ModelConfig",
    "MultiTokenAttention",
    "SwiGLU",
    "count_params",
    "init_mta_params",
    "load_model_config",
    "multi_token_attention",
    "positions_from_segment_ids",
    "visibility_mask",
]
