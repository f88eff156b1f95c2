"""The parameters of the MTA parts of one attention layer, and their identity initialisation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mta_jax.config import MTAConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MTAParams:
    """Arrays of one layer's MTA parts; a part that is off is None.

    pre_conv, post_conv: [H, c_q, c_k] key-query kernels (torch layout [H, 1, c_q, c_k] squeezed).
    pre_head_mix:  [H / g, g, g] pre-softmax head mixing, layout (in, out): s'[o] = sum_h s[h] M[h, o].
        The reference's wpsm.weight (out, in) is the transpose of pre_head_mix[0].
    post_head_mix: [H / c_h, c_h, c_h] post-softmax head convolution, layout (in, out).
    norm_scale: [D] group-norm weight shared by all heads.
    gate_kernel: [D, 1] (scalar gate) or [D, D] (elementwise); gate_bias: [1] or [D].
    """

    pre_conv: jax.Array | None = None
    post_conv: jax.Array | None = None
    pre_head_mix: jax.Array | None = None
    post_head_mix: jax.Array | None = None
    norm_scale: jax.Array | None = None
    gate_kernel: jax.Array | None = None
    gate_bias: jax.Array | None = None


def key_padding(c_k: int, pad_key: str) -> tuple[int, int]:
    """Zeros added (left, right) of the key axis before the key-query convolution."""
    if pad_key == "both":
        return (c_k - 1) // 2, (c_k - 1) // 2
    if pad_key == "left":
        return c_k - 1, 0
    return 0, c_k - 1


def identity_conv_kernel(num_heads: int, c_q: int, c_k: int, pad_key: str, dtype=jnp.float32):
    """[H, c_q, c_k] kernel that leaves the scores unchanged: 1 at (current query, current key).

    The current query is row c_q - 1; the current key is the column after the left padding, i.e.
    (c_k - 1) / 2 for "both" (the reference's identity), c_k - 1 for "left" and 0 for "right".
    """
    kernel = jnp.zeros((num_heads, c_q, c_k), dtype)
    return kernel.at[:, c_q - 1, key_padding(c_k, pad_key)[0]].set(1)


def identity_head_mix(num_heads: int, group_size: int, dtype=jnp.float32):
    """[H / g, g, g] identity head mixing."""
    return jnp.tile(jnp.eye(group_size, dtype=dtype), (num_heads // group_size, 1, 1))


def gate_kernel_init(key: jax.Array, head_dim: int, gate: str, std: float, dtype=jnp.float32):
    """Truncated normal (+-3 std, as torch's trunc_normal_ with a, b = -+3 std) [D, 1] or [D, D]."""
    width = 1 if gate == "scalar" else head_dim
    return std * jax.random.truncated_normal(key, -3.0, 3.0, (head_dim, width), dtype)


def init_mta_params(
    cfg: MTAConfig,
    num_heads: int,
    head_dim: int,
    key: jax.Array,
    *,
    gate_std: float | None = None,
    dtype=jnp.float32,
) -> MTAParams:
    """Identity initialisation: with fresh parameters the kq conv and head mixing change nothing.

    gate_std: std of the gate kernel, the reference's model_dim ** -0.5 (defaults to head_dim ** -0.5).
    """
    cfg.check_heads(num_heads, num_heads)
    parts = {}
    if cfg.pre_conv is not None:
        parts["pre_conv"] = identity_conv_kernel(num_heads, *cfg.pre_conv, cfg.pad_key, dtype)
    if cfg.post_conv is not None:
        parts["post_conv"] = identity_conv_kernel(num_heads, *cfg.post_conv, cfg.pad_key, dtype)
    if cfg.pre_head_mix is not None:
        parts["pre_head_mix"] = identity_head_mix(num_heads, cfg.pre_head_mix, dtype)
    if cfg.post_head_mix is not None:
        parts["post_head_mix"] = identity_head_mix(num_heads, cfg.post_head_mix, dtype)
    if cfg.group_norm:
        parts["norm_scale"] = jnp.ones((head_dim,), dtype)
    if cfg.gate is not None:
        std = head_dim**-0.5 if gate_std is None else gate_std
        parts["gate_kernel"] = gate_kernel_init(key, head_dim, cfg.gate, std, dtype)
        parts["gate_bias"] = jnp.zeros((1 if cfg.gate == "scalar" else head_dim,), dtype)
    return MTAParams(**parts)
