"""XLA glue that turns the pre-softmax key-query conv into operands of the fused core op ("d-space").

Before the causal zeroing the conv is bilinear in q and k. With u = c_q - 1 - a the row shift and
Wt[u, c] = W[c_q - 1 - u, c]:

    Z[i, j] = sum_{u, c} Wt[u, c] S0[i - u, j - pl + c]
            = sum_u qp_u[i] . kp_u[j] - C[i, j]
    qp_u[i] = scale * q[i - u] * [doc(i - u) == doc(i)]                    (other documents' rows read 0)
    kp_u[j] = sum_c Wt[u, c] * [doc(j - pl + c) == doc(j)] * k[j - pl + c]  (a conv of k, per query head)

where C holds the terms whose source score lies in the causal future (j - pl + c > i - u + S - T).
They only exist for 0 <= (i + S - T) - j < W = pr + c_q - 1, a thin band under the diagonal, passed to
the kernel as band[B, H, T, W]. Every such term is a score of the super-diagonals e = 1..W,
R[r, e] = scale * q[r] . k[r + S - T + e], so the band is computed from R [B, H, T, W] alone.

Only the core op (kernels/core_reference.py) needs a hand-written VJP for exactness; kp and R get
custom VJPs here too so that autodiff keeps no shifted copy of the keys (the shifts are recomputed
inside fused elementwise loops). The document indicators make packed sequences exact: for a visible
(i, j) both sit in one document.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mta_jax.params import key_padding


def _shift_rows(x: jax.Array, shift: int, axis: int = 1) -> jax.Array:
    """y[t] = x[t - shift] along `axis` (zeros where t - shift is outside); shift may be negative."""
    length = x.shape[axis]
    if shift == 0:
        return x
    if abs(shift) >= length:
        return jnp.zeros_like(x)
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


def _shift_dynamic(x: jax.Array, shift, bound: int) -> jax.Array:
    """y[t] = x[t - shift] along axis 1 for a traced shift with |shift| <= bound (zeros outside)."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (bound, bound)
    return jax.lax.dynamic_slice_in_dim(jnp.pad(x, pad), bound - shift, x.shape[1], axis=1)


def _same_doc_dynamic(segment_ids: jax.Array, shift, bound: int) -> jax.Array:
    """_same_doc for a traced shift with |shift| <= bound."""
    return _shift_dynamic(segment_ids + 1, shift, bound) - 1 == segment_ids


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def query_slabs(q: jax.Array, q_segment_ids: jax.Array, c_q: int, scale: float) -> jax.Array:
    """qp [B, H, c_q, T, D]: slab u holds scale * q[i - u] where row i - u is in row i's document.
    Its VJP keeps the segment ids alone (autodiff would keep every slab and its mask)."""
    slabs = []
    for u in range(c_q):
        same = _same_doc(q_segment_ids, u)[:, :, None, None]
        slabs.append(jnp.where(same, _shift_rows(q, u), 0) * scale)
    return jnp.stack(slabs, axis=2).transpose(0, 3, 2, 1, 4)


def _query_slabs_fwd(q, q_segment_ids, c_q, scale):
    return query_slabs(q, q_segment_ids, c_q, scale), q_segment_ids


def _query_slabs_bwd(c_q, scale, q_segment_ids, dqp):
    dq = 0
    for u in range(c_q):
        same = _same_doc(q_segment_ids, u)[:, :, None, None]
        slab = dqp[:, :, u].transpose(0, 2, 1, 3)  # [B, T, H, D]
        dq = dq + _shift_rows(jnp.where(same, slab, 0), -u)
    return (dq * scale).astype(dqp.dtype), None


query_slabs.defvjp(_query_slabs_fwd, _query_slabs_bwd)


def _tap_masks(kv_segment_ids: jax.Array, c_k: int, pad_left: int) -> list[jax.Array]:
    """[B, S] bool per tap c: key j - pl + c exists and lies in j's document."""
    return [_same_doc(kv_segment_ids, pad_left - c) for c in range(c_k)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def key_slabs(k: jax.Array, kernel: jax.Array, kv_segment_ids: jax.Array, pad_left: int) -> jax.Array:
    """kp [B, H, c_q, S, D] = sum_c Wt[h, u, c] * [same doc] * k[j - pl + c] (k: [B, S, Hkv, D];
    kernel [H, c_q, c_k], the layer's pre_conv). The sum over taps is elementwise, so XLA fuses it
    into one loop over k: no tap copies."""
    batch, kv_len, num_kv_heads, head_dim = k.shape
    num_heads, c_q, c_k = kernel.shape
    acc = jnp.promote_types(k.dtype, jnp.float32)
    weights = _tap_weights(kernel, num_kv_heads).astype(acc)  # [Hkv, rep, c_q, c_k]
    kp = 0
    for c, same in enumerate(_tap_masks(kv_segment_ids, c_k, pad_left)):
        tap = jnp.where(same[:, :, None, None], _shift_rows(k, pad_left - c), 0).astype(acc)  # [B, S, Hkv, D]
        kp = kp + tap[:, :, :, None, None, :] * weights[None, None, :, :, :, c, None]
    kp = kp.astype(k.dtype).reshape(batch, kv_len, num_heads, c_q, head_dim)  # [B, S, H, c_q, D]
    return kp.transpose(0, 2, 3, 1, 4)


def _tap_weights(kernel: jax.Array, num_kv_heads: int) -> jax.Array:
    """Wt [Hkv, H / Hkv, c_q, c_k]: the kernel with its query rows reversed (row u = shift u)."""
    num_heads, c_q, c_k = kernel.shape
    return kernel[:, ::-1, :].reshape(num_kv_heads, num_heads // num_kv_heads, c_q, c_k)


def _key_slabs_fwd(k, kernel, kv_segment_ids, pad_left):
    return key_slabs(k, kernel, kv_segment_ids, pad_left), (k, kernel, kv_segment_ids)


def _key_slabs_bwd(pad_left, res, dkp):
    """A loop over the taps (not unrolled: XLA would keep every tap's partial sums at once)."""
    k, kernel, kv_segment_ids = res
    batch, kv_len, num_kv_heads, head_dim = k.shape
    num_heads, c_q, c_k = kernel.shape
    acc = jnp.promote_types(k.dtype, jnp.float32)
    weights = _tap_weights(kernel, num_kv_heads).astype(acc)
    rep = num_heads // num_kv_heads
    dkp = dkp.transpose(0, 3, 1, 2, 4).reshape(batch, kv_len, num_kv_heads, rep, c_q, head_dim)
    bound = max(pad_left, c_k - 1 - pad_left)

    def tap_step(c, carry):
        dk, dweights = carry
        shift = pad_left - c  # tap c of key j is key j - shift
        mask = _same_doc_dynamic(kv_segment_ids, shift, bound)[:, :, None, None]
        w = jax.lax.dynamic_index_in_dim(weights, c, axis=3, keepdims=False)  # [Hkv, rep, c_q]
        dtap = jnp.sum(dkp.astype(acc) * w[None, None, :, :, :, None], axis=(3, 4))  # [B, S, Hkv, D]
        dk = dk + _shift_dynamic(jnp.where(mask, dtap, 0), -shift, bound)
        tap = jnp.where(mask, _shift_dynamic(k, shift, bound), 0).astype(acc)
        dw = jnp.sum(dkp.astype(acc) * tap[:, :, :, None, None, :], axis=(0, 1, 5))  # [Hkv, rep, c_q]
        return dk, dweights.at[..., c].set(dw)

    init = (jnp.zeros(k.shape, acc), jnp.zeros(weights.shape, acc))
    dk, dweights = jax.lax.fori_loop(0, c_k, tap_step, init)
    dkernel = dweights.reshape(num_heads, c_q, c_k)[:, ::-1, :]
    return dk.astype(k.dtype), dkernel.astype(kernel.dtype), None


key_slabs.defvjp(_key_slabs_fwd, _key_slabs_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def diagonal_scores(q: jax.Array, k: jax.Array, width: int, scale: float) -> jax.Array:
    """R [B, H, W, T]: R[e - 1, r] = scale * q[r] . k[r + S - T + e] for e = 1..W (0 where that key is
    outside [0, S)). q: [B, T, H, D]; k: [B, S, Hkv, D]. Float32 (or wider); T is the minor axis, so a
    TPU lays it out without padding W to 128 lanes."""
    qg, offset = _grouped(q, k)
    columns = [
        jnp.sum(qg * _keys_at(k, offset + e, q.shape[1])[:, :, :, None], -1) for e in range(1, width + 1)
    ]
    scores = jnp.stack(columns, axis=1) * scale  # [B, W, T, Hkv, rep]
    batch, q_len, num_heads = q.shape[:3]
    return scores.reshape(batch, width, q_len, num_heads).transpose(0, 3, 1, 2)


def _grouped(q, k):
    """q as [B, T, Hkv, H / Hkv, D] in float32 (or wider), and S - T."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    return q.astype(acc).reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim), (
        k.shape[1] - q.shape[1]
    )


def _rows_from(x: jax.Array, shift: int, length: int) -> jax.Array:
    """[B, length, ...]: row r holds x[r + shift] (0 outside x), in float32 or wider. Pad and slice,
    which XLA fuses into the consumer (a gather it would materialise)."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    have = x.shape[1]
    lo, hi = shift, shift + length  # rows of x wanted
    pad = [(0, 0)] * x.ndim
    pad[1] = (max(0, -lo), max(0, hi - have))
    x = jnp.pad(x, pad)
    start = lo + pad[1][0]
    return jax.lax.slice_in_dim(x, start, start + length, axis=1).astype(acc)


def _keys_at(k: jax.Array, shift: int, q_len: int) -> jax.Array:
    """[B, T, Hkv, D]: row r holds k[r + shift] (0 outside [0, S)), float32 or wider."""
    return _rows_from(k, shift, q_len)


def _diagonal_scores_fwd(q, k, width, scale):
    return diagonal_scores(q, k, width, scale), (q, k)


def _diagonal_scores_bwd(width, scale, res, dr):
    """A loop over the diagonals (not unrolled: XLA would keep every diagonal's products at once)."""
    q, k = res
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    qg, offset = _grouped(q, k)
    dr = (
        (dr * scale)
        .transpose(0, 2, 3, 1)
        .reshape(batch, width, q_len, num_kv_heads, num_heads // num_kv_heads)
    )
    acc = qg.dtype
    # Rows r + S - T + e of k for e = 1..W, and rows j - (S - T) - e of q, as windows of padded copies.
    k_pad = jnp.pad(
        k, ((0, 0), (max(0, -offset - 1), max(0, q_len + offset + width - kv_len)), (0, 0), (0, 0))
    )
    rows_pad = (max(0, offset + width), max(0, kv_len - offset - 1 - q_len))
    q_pad = jnp.pad(qg, ((0, 0), rows_pad, (0, 0), (0, 0), (0, 0)))
    dr_pad = jnp.pad(dr, ((0, 0), (0, 0), rows_pad, (0, 0), (0, 0)))

    def diagonal_step(i, carry):
        dq, dk = carry
        e = i + 1
        de = jax.lax.dynamic_index_in_dim(dr, i, axis=1, keepdims=False)[..., None]  # [B, T, Hkv, rep, 1]
        keys = jax.lax.dynamic_slice_in_dim(k_pad, offset + e + max(0, -offset - 1), q_len, axis=1)
        keys = jnp.where(_inside(offset + e, q_len, kv_len), keys, 0).astype(acc)
        dq = dq + de * keys[:, :, :, None]
        # Key j receives from query row j - (S - T) - e.
        start = -offset - e + rows_pad[0]
        rows = jax.lax.dynamic_slice_in_dim(q_pad, start, kv_len, axis=1)
        de_rows = jax.lax.dynamic_slice_in_dim(
            jax.lax.dynamic_index_in_dim(dr_pad, i, axis=1, keepdims=False), start, kv_len, axis=1
        )[..., None]
        valid = _inside(-offset - e, kv_len, q_len)
        dk = dk + jnp.where(valid, jnp.sum(de_rows * rows, axis=3), 0)
        return dq, dk

    init = (jnp.zeros(qg.shape, acc), jnp.zeros(k.shape, acc))
    dq, dk = jax.lax.fori_loop(0, width, diagonal_step, init)
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype)


def _inside(shift, length: int, source_len: int) -> jax.Array:
    """[1, length, 1, 1] bool: row r + shift lies in [0, source_len)."""
    rows = jnp.arange(length) + shift
    return ((rows >= 0) & (rows < source_len))[None, :, None, None]


diagonal_scores.defvjp(_diagonal_scores_fwd, _diagonal_scores_bwd)


def _band_masks(q_segment_ids, kv_segment_ids, c_q: int, c_k: int, pad_left: int, width: int):
    """(rows_ok [c_q, B, T], keys_ok [B, c_k, W, T]) booleans of the band's terms.

    rows_ok[u, b, i]: query i - u exists and lies in i's document. keys_ok[b, c, delta, i]: the key
    j = i + S - T - delta exists and so does its tap j - pl + c, in j's document.
    """
    q_len = q_segment_ids.shape[1]
    kv_len = kv_segment_ids.shape[1]
    keys = jnp.arange(q_len)[None, :] + (kv_len - q_len) - jnp.arange(width)[:, None]  # [W, T]
    taps = keys[None] - pad_left + jnp.arange(c_k)[:, None, None]  # [c_k, W, T]
    inside = ((keys >= 0) & (keys < kv_len))[None] & (taps >= 0) & (taps < kv_len)

    def ids_at(positions):
        flat = jnp.take(kv_segment_ids, jnp.clip(positions, 0, kv_len - 1).reshape(-1), axis=1)
        return flat.reshape(kv_segment_ids.shape[:1] + positions.shape)

    keys_ok = inside[None] & (ids_at(taps) == ids_at(keys)[:, None])
    rows_ok = jnp.stack([_same_doc(q_segment_ids, u) for u in range(c_q)])
    return rows_ok, keys_ok


def _shift_last(x: jax.Array, shift, bound: int) -> jax.Array:
    """y[..., t] = x[..., t - shift] for a traced shift with |shift| <= bound (zeros outside)."""
    pad = [(0, 0)] * (x.ndim - 1) + [(bound, bound)]
    return jax.lax.dynamic_slice_in_dim(jnp.pad(x, pad), bound - shift, x.shape[-1], axis=x.ndim - 1)


def _pair_terms(r_t, rows_ok, keys_ok, u, c, pad_left: int):
    """(terms, mask) of one (shift u, tap c) pair, both [B, H, W, T] (traced u and c):
    terms[delta, i] = R[e - 1, i - u] with e = c + u - pl - delta, 0 unless 1 <= e <= W."""
    width = r_t.shape[2]
    e = c + u - pad_left - jnp.arange(width)
    rows = jnp.take(_shift_last(r_t, u, rows_ok.shape[0]), jnp.clip(e - 1, 0, width - 1), axis=2)
    terms = jnp.where(((e >= 1) & (e <= width))[None, None, :, None], rows, 0)
    keys = jax.lax.dynamic_index_in_dim(keys_ok, c, axis=1, keepdims=False)  # [B, W, T]
    rows_here = jax.lax.dynamic_index_in_dim(rows_ok, u, axis=0, keepdims=False)  # [B, T]
    return terms, (keys & rows_here[:, None, :])[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _band_from_diagonals(r_t, kernel, q_segment_ids, kv_segment_ids, pad_left: int):
    """band_t [B, H, W, T] from R [B, H, W, T] (see band_correction): a loop over the c_q x c_k
    (shift, tap) pairs that keeps one [B, H, W, T] term live (vectorising over the taps kept
    c_k x W x T floats per head, several times over, and dominated the glue's memory), and a VJP
    that keeps R alone."""
    num_heads, c_q, c_k = kernel.shape
    flipped = kernel[:, ::-1, :].astype(r_t.dtype)  # Wt[h, u, c]
    rows_ok, keys_ok = _band_masks(q_segment_ids, kv_segment_ids, c_q, c_k, pad_left, r_t.shape[2])

    def pair_step(p, band):
        u, c = p // c_k, p % c_k
        terms, mask = _pair_terms(r_t, rows_ok, keys_ok, u, c, pad_left)
        weight = flipped[:, u, c][None, :, None, None]
        return band + jnp.where(mask, terms * weight, 0)

    return jax.lax.fori_loop(0, c_q * c_k, pair_step, jnp.zeros(r_t.shape, r_t.dtype))


def _band_fwd(r_t, kernel, q_segment_ids, kv_segment_ids, pad_left):
    out = _band_from_diagonals(r_t, kernel, q_segment_ids, kv_segment_ids, pad_left)
    return out, (r_t, kernel, q_segment_ids, kv_segment_ids)


def _band_bwd(pad_left, res, dband):
    r_t, kernel, q_segment_ids, kv_segment_ids = res
    num_heads, c_q, c_k = kernel.shape
    width = r_t.shape[2]
    flipped = kernel[:, ::-1, :].astype(r_t.dtype)
    rows_ok, keys_ok = _band_masks(q_segment_ids, kv_segment_ids, c_q, c_k, pad_left, width)

    def pair_step(p, carry):
        dr, dflipped = carry
        u, c = p // c_k, p % c_k
        terms, mask = _pair_terms(r_t, rows_ok, keys_ok, u, c, pad_left)
        g = jnp.where(mask, dband, 0)  # [B, H, W, T]
        dflipped = dflipped.at[:, u, c].set(jnp.einsum("bhdi,bhdi->h", g, terms))
        # row r of the shifted R fed diagonal delta = c + u - pl - 1 - r (one delta per row)
        delta = c + u - pad_left - 1 - jnp.arange(width)
        back = jnp.take(g, jnp.clip(delta, 0, width - 1), axis=2)
        back = jnp.where(((delta >= 0) & (delta < width))[None, None, :, None], back, 0)
        back = back * flipped[:, u, c][None, :, None, None]
        return dr + _shift_last(back, -u, c_q), dflipped

    init = (jnp.zeros(r_t.shape, r_t.dtype), jnp.zeros(flipped.shape, r_t.dtype))
    dr, dflipped = jax.lax.fori_loop(0, c_q * c_k, pair_step, init)
    return dr, dflipped[:, ::-1, :].astype(kernel.dtype), None, None


_band_from_diagonals.defvjp(_band_fwd, _band_bwd)


def band_correction(q, k, kernel, q_segment_ids, kv_segment_ids, pad_left: int, causal: bool):
    """band [B, H, T, W] (float32 or wider): C[i, (i + S - T) - delta] of the module docstring, or None.

    q: [B, T, H, D]; k: [B, S, Hkv, D]; kernel [H, c_q, c_k]; segment ids [B, T] / [B, S].
    C[i, delta] = sum over (u, c) with e = c + u - delta - pl >= 1 of
        Wt[u, c] * [doc(i - u) == doc(i)] * [doc(j - pl + c) == doc(j), 0 <= j < S] * R[e - 1, i - u],
    with j = i + S - T - delta.
    """
    num_heads, c_q, c_k = kernel.shape
    width = (c_k - 1 - pad_left) + c_q - 1  # pr + c_q - 1
    if not causal or width == 0:
        return None
    r_t = diagonal_scores(q, k, width, q.shape[-1] ** -0.5)
    band_t = _band_from_diagonals(r_t, kernel, q_segment_ids, kv_segment_ids, pad_left)
    return band_t.transpose(0, 1, 3, 2)


def dspace_operands(q, k, kernel, q_segment_ids, kv_segment_ids, pad_key: str, causal: bool):
    """(qp [B, H, c_q, T, D], kp [B, H, c_q, S, D], band [B, H, T, W] or None) for the core op.

    q: [B, T, H, D]; k: [B, S, Hkv, D]; kernel: [H, c_q, c_k] (the layer's pre_conv);
    segment ids [B, T] / [B, S] (all zeros for one document per row).
    """
    num_heads, c_q, c_k = kernel.shape
    pad_left, _ = key_padding(c_k, pad_key)
    scale = q.shape[-1] ** -0.5
    qp = query_slabs(q, q_segment_ids, c_q, scale)
    kp = key_slabs(k, kernel, kv_segment_ids, pad_left)
    band = band_correction(q, k, kernel, q_segment_ids, kv_segment_ids, pad_left, causal)
    return qp, kp, band
