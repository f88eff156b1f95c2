"""Rotary position embeddings in the two common conventions, with Llama 3's and linear frequency scaling.

"interleaved": rotates pairs (2i, 2i+1), as the MTA reference (lingua) and Meta's Llama code.
"half": rotates pairs (i, i + D/2), as Hugging Face's Llama (rotate_half).
Both use frequency theta ** (-2i / D) for pair i, optionally rescaled by a RopeScaling; angles are
computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

ROPE_SCALING_KINDS = ("llama3", "linear")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling for long contexts, as Hugging Face's rope_scaling ("rope_type").

    linear: every frequency divided by factor. llama3: wavelengths above
    original_max_position / low_freq_factor are divided by factor, those below
    original_max_position / high_freq_factor kept, and those in between interpolated smoothly.
    """

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_SCALING_KINDS:
            raise ValueError(
                f"rope_scaling.kind={self.kind!r} is invalid: must be one of {ROPE_SCALING_KINDS}"
            )
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor={self.factor!r} is invalid: must be > 0")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                f"rope_scaling.high_freq_factor={self.high_freq_factor!r} is invalid: must exceed "
                f"low_freq_factor={self.low_freq_factor!r} > 0"
            )

    def apply(self, inv_freq: jax.Array) -> jax.Array:
        """Scaled inverse frequencies [D/2] from the plain ones."""
        if self.kind == "linear":
            return inv_freq / self.factor
        low_wavelen = self.original_max_position / self.low_freq_factor
        high_wavelen = self.original_max_position / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)


def rope_angles(
    positions: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None, dtype=jnp.float32
) -> jax.Array:
    """[..., T, D/2] rotation angles for integer positions [..., T], in dtype (float32 or wider)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    return positions.astype(dtype)[..., None] * inv_freq


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    theta: float,
    style: str = "interleaved",
    scaling: RopeScaling | None = None,
):
    """Rotates x [B, T, H, D] by the angles of positions [B, T] (or [T]); keeps x's dtype, computes
    in promote_types(x.dtype, float32) (so a float64 model stays float64-exact)."""
    compute = jnp.promote_types(x.dtype, jnp.float32)
    angles = rope_angles(positions, x.shape[-1], theta, scaling, compute)[..., None, :]  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(compute)
    if style == "interleaved":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rotated = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
        return rotated.reshape(x.shape).astype(x.dtype)
    if style == "half":
        x1, x2 = jnp.split(xf, 2, axis=-1)
        return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)
    raise ValueError(f"style={style!r} is invalid: must be 'interleaved' or 'half'")
