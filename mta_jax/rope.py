"""Rotary position embeddings in the two common conventions.

"interleaved": rotates pairs (2i, 2i+1), as the MTA reference (lingua) and Meta's Llama code.
"half": rotates pairs (i, i + D/2), as Hugging Face's Llama (rotate_half).
Both use frequency theta ** (-2i / D) for pair i; angles are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """[..., T, D/2] rotation angles for integer positions [..., T]."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, style: str = "interleaved"):
    """Rotates x [B, T, H, D] by the angles of positions [B, T] (or [T]); keeps x's dtype."""
    angles = rope_angles(positions, x.shape[-1], theta)[..., None, :]  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    if style == "interleaved":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rotated = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
        return rotated.reshape(x.shape).astype(x.dtype)
    if style == "half":
        x1, x2 = jnp.split(xf, 2, axis=-1)
        return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)
    raise ValueError(f"style={style!r} is invalid: must be 'interleaved' or 'half'")
