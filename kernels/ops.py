"""implementation="pallas": the fused kernels behind multi_token_attention's signature.

    q, k, v --(dspace.py: conv folded into operands, band correction)--> qp, kp, band
            --(triton_core.py on GPU / tpu_core.py on TPU)--> out

What the kernels support: the pre-softmax key-query conv (any c_q, c_k, pad_key), head mixing in
groups of at most 4 before and after the softmax, causal or not, packed documents (segment ids),
grouped-query attention, T != S. Anything else (post-softmax conv, wider head mixing, dropout) is a
ValueError naming the option; implementation="auto" then picks the blockwise path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.dspace import dspace_operands
from kernels.tpu_core import mta_core_tpu
from kernels.triton_core import mta_core_triton
from mta_jax.config import MTAConfig
from mta_jax.params import MTAParams

MAX_MIX_GROUP = 4
# Default tiles per kernel: Triton needs powers of two; TPU blocks are explained in tpu_core.py.
DEFAULT_BLOCKS = {"triton": (64, 64), "tpu": (256, 256)}
KERNELS = ("triton", "tpu")
_PAD_Q_SEGMENT = jnp.iinfo(jnp.int32).min  # padded query rows see nothing
_PAD_KV_SEGMENT = jnp.iinfo(jnp.int32).min + 1  # padded keys are seen by nobody


def unsupported_option(cfg: MTAConfig, *, training_dropout: bool = False) -> str | None:
    """Why the kernels cannot run this configuration (naming the option), or None if they can."""
    if cfg.post_conv is not None:
        return f"post_conv={cfg.post_conv} (the post-softmax key-query conv)"
    for name in ("pre_head_mix", "post_head_mix"):
        size = getattr(cfg, name)
        if size is not None and size > MAX_MIX_GROUP:
            return f"{name}={size} (head mixing in groups of more than {MAX_MIX_GROUP})"
    sizes = [s for s in (cfg.pre_head_mix, cfg.post_head_mix) if s is not None]
    if len(sizes) == 2 and max(sizes) % min(sizes):
        return f"pre_head_mix={sizes[0]} with post_head_mix={sizes[1]} (one group size must divide the other)"
    if training_dropout:
        return f"dropout_rate={cfg.dropout_rate} (attention dropout in training)"
    return None


def default_kernel(backend: str | None = None) -> str:
    """Triton on GPUs and (interpreted) on CPU; Mosaic on TPUs."""
    return "tpu" if (backend or jax.default_backend()) == "tpu" else "triton"


def _block(requested: int | None, default: int, length: int, kernel: str) -> int:
    """The tile size actually used: the requested (or default) one, shrunk for short sequences."""
    block = requested or default
    if length >= block:
        return block
    if kernel == "triton":  # powers of two, at least 16
        return max(16, 1 << (length - 1).bit_length())
    return -(-length // 8) * 8


def _pad_front(x: jax.Array, amount: int, value=0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (amount, 0)
    return jnp.pad(x, pad, constant_values=value)


def pallas_attention_core(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    params: MTAParams,
    cfg: MTAConfig,
    *,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    dropout_rng: jax.Array | None,
    block_q: int | None = None,
    block_k: int | None = None,
    kernel: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The attention core through the fused kernels: q [B, T, H, D], k/v [B, S, Hkv, D] -> [B, T, H, D]
    float32, like reference_attention_core.

    kernel: "triton" or "tpu" (default: the backend's); interpret: run the kernel in the Pallas
    interpreter (default: on CPU). Both sequences are padded at the front to whole tiles, which keeps
    the bottom-right causal alignment; padded keys belong to no document.
    """
    reason = unsupported_option(cfg, training_dropout=dropout_rng is not None)
    if reason:
        raise ValueError(f'implementation="pallas" does not support {reason}; use "blockwise" or "reference"')
    kernel = kernel or default_kernel()
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is invalid: must be one of {KERNELS}")
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    bq = _block(block_q, DEFAULT_BLOCKS[kernel][0], q_len, kernel)
    bk = _block(block_k, DEFAULT_BLOCKS[kernel][1], kv_len, kernel)
    q_pad, kv_pad = -q_len % bq, -kv_len % bk
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((batch, q_len), jnp.int32)
        kv_segment_ids = jnp.zeros((batch, kv_len), jnp.int32)
    q_ids = _pad_front(q_segment_ids.astype(jnp.int32), q_pad, _PAD_Q_SEGMENT)
    kv_ids = _pad_front(kv_segment_ids.astype(jnp.int32), kv_pad, _PAD_KV_SEGMENT)
    q, k, v = _pad_front(q, q_pad), _pad_front(k, kv_pad), _pad_front(v, kv_pad)

    if params.pre_conv is not None:
        qp, kp, band = dspace_operands(q, k, params.pre_conv, q_ids, kv_ids, cfg.pad_key, cfg.causal)
    else:
        qp = (q * head_dim**-0.5).astype(q.dtype).transpose(0, 2, 1, 3)[:, :, None]  # [B, H, 1, T, D]
        kp = jnp.repeat(k.transpose(0, 2, 1, 3), num_heads // num_kv_heads, axis=1)[:, :, None]
        band = None
    core = mta_core_triton if kernel == "triton" else mta_core_tpu
    out = core(
        qp, kp, v.transpose(0, 2, 1, 3), band, q_ids, kv_ids, params.pre_head_mix, params.post_head_mix,
        causal=cfg.causal, block_q=bq, block_k=bk, interpret=interpret,
    )  # fmt: skip
    return out.transpose(0, 2, 1, 3)[:, q_pad:]
