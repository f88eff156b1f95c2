"""XLA glue that turns the pre-softmax key-query conv into operands of the fused core op ("d-space").

Before the causal zeroing the conv is bilinear in q and k. With u = c_q - 1 - a the row shift and
Wt[u, c] = W[c_q - 1 - u, c]:

    Z[i, j] = sum_{u, c} Wt[u, c] S0[i - u, j - pl + c]
            = sum_u qp_u[i] . kp_u[j] - C[i, j]
    qp_u[i] = scale * q[i - u] * [doc(i - u) == doc(i)]                    (other documents' rows read 0)
    kp_u[j] = sum_c Wt[u, c] * [doc(j - pl + c) == doc(j)] * k[j - pl + c]  (a conv of k, per query head)

where C holds the terms whose source score lies in the causal future (j - pl + c > i - u + S - T).
They only exist for 0 <= (i + S - T) - j < pr + c_q - 1, a thin band under the diagonal, computed
here at O(T * band * c_q * c_k * D) and passed to the kernel as band[B, H, T, W]. Only the core op
(kernels/core_reference.py) needs a hand-written VJP; autodiff of this glue gives dq, dk and dW.
The document indicators make packed sequences exact: for a visible (i, j) both sit in one document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mta_jax.params import key_padding


def _shift_rows(x: jax.Array, shift: int, axis: int = 1) -> jax.Array:
    """y[t] = x[t - shift] along `axis` (zeros where t - shift is outside); shift may be negative."""
    length = x.shape[axis]
    if shift == 0:
        return x
    pad = [(0, 0)] * x.ndim
    if shift > 0:
        pad[axis] = (shift, 0)
        return jax.lax.slice_in_dim(jnp.pad(x, pad), 0, length, axis=axis)
    pad[axis] = (0, -shift)
    return jax.lax.slice_in_dim(jnp.pad(x, pad), -shift, -shift + length, axis=axis)


def _same_doc(segment_ids: jax.Array, shift: int) -> jax.Array:
    """[B, L] bool: does position t - shift exist and lie in t's document?"""
    shifted = _shift_rows(segment_ids + 1, shift) - 1  # -1 where t - shift is outside
    return shifted == segment_ids


def query_slabs(q: jax.Array, q_segment_ids: jax.Array, c_q: int, scale: float) -> jax.Array:
    """qp [B, H, c_q, T, D]: slab u holds scale * q[i - u] where row i - u is in row i's document."""
    slabs = []
    for u in range(c_q):
        same = _same_doc(q_segment_ids, u)[:, :, None, None]
        slabs.append(jnp.where(same, _shift_rows(q, u), 0) * scale)
    return jnp.stack(slabs, axis=2).transpose(0, 3, 2, 1, 4)


def key_taps(k: jax.Array, kv_segment_ids: jax.Array, c_k: int, pad_left: int) -> jax.Array:
    """[B, S, c_k, Hkv, D]: tap c of key j is k[j - pl + c] when it lies in j's document, else 0."""
    taps = []
    for c in range(c_k):
        shift = pad_left - c  # y[j] = k[j - shift]
        same = _same_doc(kv_segment_ids, shift)[:, :, None, None]
        taps.append(jnp.where(same, _shift_rows(k, shift), 0))
    return jnp.stack(taps, axis=2)


def key_slabs(taps: jax.Array, kernel: jax.Array) -> jax.Array:
    """kp [B, H, c_q, S, D] = sum_c Wt[h, u, c] * taps[:, :, c, kv head of h]; kernel [H, c_q, c_k]."""
    batch, kv_len, c_k, num_kv_heads, head_dim = taps.shape
    num_heads, c_q, _ = kernel.shape
    flipped = kernel[:, ::-1, :].reshape(num_kv_heads, num_heads // num_kv_heads, c_q, c_k)  # Wt
    kp = jnp.einsum("bsckd,kguc->bkgusd", taps, flipped.astype(taps.dtype))
    return kp.reshape(batch, num_heads, c_q, kv_len, head_dim)


def band_correction(qp: jax.Array, taps: jax.Array, kernel: jax.Array, pad_left: int, causal: bool):
    """band [B, H, T, W] (float32 or wider): C[i, (i + S - T) - delta] of the module docstring, or None.

    qp: [B, H, c_q, T, D] (from query_slabs); taps: [B, S, c_k, Hkv, D] (from key_taps).
    """
    num_heads, c_q, c_k = kernel.shape
    width = (c_k - 1 - pad_left) + c_q - 1  # pr + c_q - 1
    if not causal or width == 0:
        return None
    batch, _, _, q_len, head_dim = qp.shape
    kv_len, num_kv_heads = taps.shape[1], taps.shape[3]
    offset = kv_len - q_len
    acc = jnp.promote_types(qp.dtype, jnp.float32)
    flipped = kernel[:, ::-1, :].astype(acc)  # Wt[h, u, c]
    qp = qp.reshape(batch, num_kv_heads, num_heads // num_kv_heads, c_q, q_len, head_dim)
    columns = []
    for delta in range(width):
        # key row j = i + offset - delta for every query i (zero when outside [0, S)).
        rows = jnp.arange(q_len) + offset - delta
        inside = ((rows >= 0) & (rows < kv_len))[None, :, None, None, None]
        keys = jnp.where(inside, jnp.take(taps, jnp.clip(rows, 0, kv_len - 1), axis=1), 0)
        dots = jnp.einsum("bkguid,bickd->bkguic", qp, keys, preferred_element_type=acc)
        # Only taps in the causal future of the source row: c > delta + pl - u.
        u = jnp.arange(c_q)[:, None]
        c = jnp.arange(c_k)[None, :]
        future = (c > delta + pad_left - u).astype(acc)  # [c_q, c_k]
        weights = (flipped * future).reshape(num_kv_heads, num_heads // num_kv_heads, c_q, c_k)
        columns.append(jnp.einsum("bkguic,kguc->bkgi", dots, weights).reshape(batch, num_heads, q_len))
    return jnp.stack(columns, axis=-1)


def dspace_operands(q, k, kernel, q_segment_ids, kv_segment_ids, pad_key: str, causal: bool):
    """(qp [B, H, c_q, T, D], kp [B, H, c_q, S, D], band [B, H, T, W] or None) for the core op.

    q: [B, T, H, D]; k: [B, S, Hkv, D]; kernel: [H, c_q, c_k] (the layer's pre_conv);
    segment ids [B, T] / [B, S] (all zeros for one document per row).
    """
    num_heads, c_q, c_k = kernel.shape
    pad_left, _ = key_padding(c_k, pad_key)
    scale = q.shape[-1] ** -0.5
    qp = query_slabs(q, q_segment_ids, c_q, scale)
    taps = key_taps(k, kv_segment_ids, c_k, pad_left)
    kp = key_slabs(taps, kernel)
    band = band_correction(qp, taps, kernel, pad_left, causal)
    return qp, kp, band
