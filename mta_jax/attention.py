"""multi_token_attention: the one function behind every attention path, and the reference path.

    S -> pre kq-conv -> pre head mix -> (mask) softmax in float32 -> post kq-conv (re-mask 0)
      -> post head mix -> dropout -> @ V -> per-head RMSNorm -> depth scaling -> gate

Every implementation computes the attention core (up to @ V) from the same inputs; the per-head
output stage (norm, depth scaling, gate) is shared and applied here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mta_jax.blockwise import blockwise_attention_core
from mta_jax.config import IMPLEMENTATIONS, MTAConfig, depth_scale
from mta_jax.conv import key_query_conv, mix_heads
from mta_jax.dropout import apply_dropout, dropout_keep_mask
from mta_jax.masks import visibility_mask
from mta_jax.params import MTAParams

logger = logging.getLogger("mta_jax")


def compute_dtype(dtype) -> jnp.dtype:
    """Scores, softmax and the per-head output stage run in at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


# Finite stand-in for -inf: a row with no visible key gives zeros instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def reference_attention_core(
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
) -> jax.Array:
    """Materialises the [B, H, T, S] scores; written for clarity. Returns [B, T, H, D] in float32
    (float64 for float64 inputs). block_q / block_k are accepted and unused (there are no tiles)."""
    batch, q_len, num_heads, head_dim = q.shape
    acc_dtype = compute_dtype(q.dtype)
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads  # query head h reads kv head h // group
    q_grouped = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_grouped, k, preferred_element_type=acc_dtype).reshape(
        batch, num_heads, q_len, kv_len
    )
    scores = scores * head_dim**-0.5

    visible = visibility_mask(
        q_len,
        kv_len,
        causal=cfg.causal,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    if params.pre_conv is not None:
        scores = key_query_conv(scores, params.pre_conv, visible, cfg.pad_key, q_segment_ids)
    if params.pre_head_mix is not None:
        scores = mix_heads(scores, params.pre_head_mix)
    scores = jnp.where(visible[:, None], scores, MASK_VALUE)
    probs = jnp.where(visible[:, None], jax.nn.softmax(scores, axis=-1), 0.0)
    if params.post_conv is not None:
        probs = key_query_conv(probs, params.post_conv, visible, cfg.pad_key, q_segment_ids)
        probs = jnp.where(visible[:, None], probs, 0.0)
    if params.post_head_mix is not None:
        probs = mix_heads(probs, params.post_head_mix)
    if dropout_rng is not None:
        keep = dropout_keep_mask(
            dropout_rng, cfg.dropout_rate, batch, num_heads, jnp.arange(q_len), jnp.arange(kv_len)
        )
        probs = apply_dropout(probs, keep, cfg.dropout_rate)

    probs = probs.astype(v.dtype).reshape(batch, num_kv_heads, group, q_len, kv_len)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=acc_dtype)
    return out.reshape(batch, q_len, num_heads, head_dim)


AttentionCore = Callable[..., jax.Array]


def pallas_attention_core(*args, **kwargs) -> jax.Array:
    """The fused Pallas kernels (kernels/ops.py), imported on first use."""
    from kernels.ops import pallas_attention_core as core

    return core(*args, **kwargs)


_CORES: dict[str, AttentionCore] = {
    "reference": reference_attention_core,
    "blockwise": blockwise_attention_core,
    "pallas": pallas_attention_core,
}


def head_output(x: jax.Array, params: MTAParams, cfg: MTAConfig, layer_index: int | None) -> jax.Array:
    """Per-head RMSNorm over D (float32 statistics), depth scaling and gating. x: [B, T, H, D]."""
    dtype = compute_dtype(x.dtype)
    x = x.astype(dtype)
    if params.norm_scale is not None:
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
        x = x * params.norm_scale.astype(dtype)
    if cfg.depth_scaling:
        x = x * depth_scale(layer_index)
    if params.gate_kernel is not None:
        gate = x @ params.gate_kernel.astype(dtype) + params.gate_bias.astype(dtype)
        x = x * jax.nn.sigmoid(gate)
    return x


def multi_token_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    params: MTAParams,
    cfg: MTAConfig,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    implementation: str = "reference",
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
    layer_index: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Multi-Token Attention (spec sections 1-3). Returns [B, T, H, D] in q's dtype, before wo.

    q: [B, T, H, D]; k, v: [B, S, Hkv, D] with H a multiple of Hkv (grouped-query attention).
    params: the layer's MTAParams, matching cfg. segment_ids: [B, T] ids of packed documents;
    kv_segment_ids: [B, S], defaults to segment_ids when S == T.
    implementation: "reference" (materialises the [B, H, T, S] scores), "blockwise" (query and key
    tiles, memory linear in T), "pallas" (fused kernels, kernels/ops.py: Triton on GPU, Mosaic on TPU,
    interpreted on CPU) or "auto" (the fastest path for this configuration and backend).
    dropout_rng: key for attention dropout, used when cfg.dropout_rate > 0 and not deterministic.
    layer_index: 0-based layer index, needed by depth scaling.
    block_q, block_k: tile sizes of the tiled paths (None: the path's default for the backend).
    """
    _check_inputs(q, k, v, params, cfg, segment_ids, kv_segment_ids)
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is invalid: must be one of {IMPLEMENTATIONS}")
    if cfg.dropout_rate == 0.0 or deterministic:
        dropout_rng = None
    elif dropout_rng is None:
        raise ValueError(
            f"dropout_rng=None is invalid: dropout_rate={cfg.dropout_rate} with "
            "deterministic=False needs a PRNG key"
        )
    if cfg.depth_scaling and layer_index is None:
        raise ValueError("layer_index=None is invalid: depth_scaling=True needs the layer index")
    options = dict(
        q_segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        dropout_rng=dropout_rng,
        block_q=block_q,
        block_k=block_k,
    )
    if implementation == "auto":
        out = _auto_attention_core(q, k, v, params, cfg, **options)
    else:
        out = _CORES[implementation](q, k, v, params, cfg, **options)
    return head_output(out, params, cfg, layer_index).astype(q.dtype)


# On CPU the blockwise path wins from about this many scores per head (bench/attention.py).
AUTO_BLOCKWISE_MIN_SCORES = 2048 * 2048
_announced: set[str] = set()


def choose_implementation(
    cfg: MTAConfig,
    q_len: int,
    kv_len: int,
    backend: str | None = None,
    *,
    dtype=None,
    head_dim: int | None = None,
    chip=None,
) -> str:
    """What implementation="auto" runs on `backend` ("tpu", "cuda" or "gpu", "cpu"; default: the
    host's), logged once per distinct choice: the fused kernels on GPU and TPU when they support the
    configuration (on `chip`, a kernels.chips.Chip, when known: its VMEM), else blockwise for long
    sequences (always on GPU and TPU), else the reference."""
    from kernels.ops import unsupported_option

    backend = backend or jax.default_backend()
    accelerator = backend in ("gpu", "cuda", "tpu")
    missing = unsupported_option(cfg, dtype=dtype, head_dim=head_dim, platform=backend, chip=chip)
    if accelerator and missing is None:
        name, why = "pallas", "the fused kernels support this configuration"
    elif q_len * kv_len >= AUTO_BLOCKWISE_MIN_SCORES or accelerator:
        kernels = f"the fused kernels lack {missing}" if accelerator else "no fused kernels on CPU"
        name, why = "blockwise", f"{kernels}; T x S = {q_len} x {kv_len} scores per head"
    else:
        name, why = "reference", f"T x S = {q_len} x {kv_len} is small enough to materialise"
    message = f'implementation="auto" chose "{name}" on {backend}: {why}'
    if message not in _announced:
        _announced.add(message)
        logger.info(message)
    return name


def _auto_attention_core(q, k, v, params, cfg, *, dropout_rng, **options) -> jax.Array:
    """implementation="auto" for the platform being compiled for (kernels/platform.py): decided at
    trace time when the mesh or q's sharding names the device, else staged per platform."""
    from kernels.platform import known_chip, per_platform

    def branch(platform: str):
        def run(q, k, v, params, target):
            chip = known_chip(platform, target.device_kind)
            name = choose_implementation(
                cfg, q.shape[1], k.shape[1], platform, dtype=q.dtype, head_dim=q.shape[-1], chip=chip
            )
            extra = {"target": target} if name == "pallas" else {}
            return _CORES[name](q, k, v, params, cfg, dropout_rng=dropout_rng, **options, **extra)

        return run

    return per_platform((q, k, v, params), q, tpu=branch("tpu"), cuda=branch("cuda"), cpu=branch("cpu"))


def _check_inputs(q, k, v, params, cfg, segment_ids, kv_segment_ids) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name}.shape={x.shape} is invalid: must be 4-D [B, T, heads, D]")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}.dtype={x.dtype} is invalid: must be a floating dtype")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes ({q.dtype}, {k.dtype}, {v.dtype}) are invalid: must be equal")
    if v.shape != k.shape:
        raise ValueError(f"v.shape={v.shape} is invalid: must equal k.shape={k.shape}")
    batch, q_len, num_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k.shape={k.shape} is invalid: batch and head dim must match q.shape={q.shape}")
    num_kv_heads, kv_len = k.shape[2], k.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(
            f"k.shape[2]={num_kv_heads} (kv heads) is invalid: must divide q's {num_heads} heads"
        )
    cfg.check_heads(num_heads, num_kv_heads)
    _check_params(params, cfg, num_heads, head_dim)
    for name, ids, length in (
        ("segment_ids", segment_ids, q_len),
        ("kv_segment_ids", kv_segment_ids, kv_len),
    ):
        if ids is not None and (ids.shape != (batch, length) or not _is_int(ids)):
            raise ValueError(
                f"{name} with shape {ids.shape} and dtype {ids.dtype} is invalid: "
                f"must be integer [B, {'T' if name == 'segment_ids' else 'S'}] = {(batch, length)}"
            )
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("segment_ids=None is invalid: kv_segment_ids needs segment_ids")
    if segment_ids is not None and kv_segment_ids is None and kv_len != q_len:
        raise ValueError(f"kv_segment_ids=None is invalid: with S={kv_len} != T={q_len} pass kv_segment_ids")


def _is_int(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.integer)


def _check_params(params: MTAParams, cfg: MTAConfig, num_heads: int, head_dim: int) -> None:
    gate_width = {None: None, "scalar": 1, "elementwise": head_dim}[cfg.gate]
    expected = {
        "pre_conv": cfg.pre_conv and (num_heads, *cfg.pre_conv),
        "post_conv": cfg.post_conv and (num_heads, *cfg.post_conv),
        "pre_head_mix": cfg.pre_head_mix
        and (num_heads // cfg.pre_head_mix, cfg.pre_head_mix, cfg.pre_head_mix),
        "post_head_mix": cfg.post_head_mix
        and (num_heads // cfg.post_head_mix, cfg.post_head_mix, cfg.post_head_mix),
        "norm_scale": (head_dim,) if cfg.group_norm else None,
        "gate_kernel": gate_width and (head_dim, gate_width),
        "gate_bias": gate_width and (gate_width,),
    }
    for name, shape in expected.items():
        value = getattr(params, name)
        actual = None if value is None else tuple(value.shape)
        if actual != (tuple(shape) if shape else None):
            raise ValueError(
                f"params.{name} with shape {actual} is invalid: the config asks for "
                f"{tuple(shape) if shape else None}"
            )
