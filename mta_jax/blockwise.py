"""The blockwise path: MTA over query and key tiles with the halos the convolutions need.

No [T, S] buffer exists anywhere, in the forward or the backward pass:

- Query tiles of block_q rows are processed one after another (lax.map); each is wrapped in
  jax.checkpoint, so the backward pass recomputes one tile at a time and memory grows linearly in T.
- Inside a query tile, key tiles of block_k columns are scanned. A tile's scores are computed with a
  halo: c_q - 1 extra query rows above and the key padding (pl, pr) extra columns, so the key-query
  conv of the tile is exact (conv.conv_valid). Key tiles that causality hides entirely are skipped.
- Without post-softmax parts (post_conv, post_head_mix) one pass with online softmax suffices.
  With them, a first pass computes each row's log-sum-exp, and a second pass rebuilds normalised
  probabilities on a tile with a second halo, so the post-softmax conv and mixing are exact too.
- Dropout uses the position hash of mta_jax/dropout.py: the same key gives the same mask as the
  reference path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mta_jax.config import MTAConfig
from mta_jax.conv import conv_valid, mix_heads, same_document_rows
from mta_jax.dropout import apply_dropout, dropout_keep_mask
from mta_jax.params import MTAParams, key_padding

# Finite stand-in for -inf (as in attention.py): a row with no visible key gives zeros, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512


@dataclasses.dataclass(frozen=True)
class _Halo:
    """Extra rows above (rows) and key columns left / right (left, right) that a conv reads."""

    rows: int = 0
    left: int = 0
    right: int = 0

    @staticmethod
    def of(kernel: jax.Array | None, pad_key: str) -> _Halo:
        if kernel is None:
            return _Halo()
        _, c_q, c_k = kernel.shape
        return _Halo(c_q - 1, *key_padding(c_k, pad_key))


def _slice_or_none(x, start, size):
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _log_sum_exp(m, total):
    """m + log(total) from the running max and sum; 0 for rows that saw no key (total = 0)."""
    empty = total == 0.0
    return jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, total)))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class _Tiles:
    """The padded inputs and the functions that compute one tile: shared by both passes."""

    def __init__(self, q, k, v, params: MTAParams, cfg: MTAConfig, q_segment_ids, kv_segment_ids, bq, bk):
        self.batch, self.q_len, self.num_heads, self.head_dim = q.shape
        self.kv_len, self.num_kv_heads = k.shape[1], k.shape[2]
        self.params, self.cfg, self.bq, self.bk = params, cfg, bq, bk
        self.acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
        self.pre = _Halo.of(params.pre_conv, cfg.pad_key)
        self.post = _Halo.of(params.post_conv, cfg.pad_key)
        self.num_q_tiles = -(-self.q_len // bq)
        self.num_k_tiles = -(-self.kv_len // bk)
        # Front padding: the halo rows/columns of both convs; back padding: the last tile and halo.
        self.row_front = self.pre.rows + self.post.rows
        self.col_front = self.pre.left + self.post.left
        row_back = self.num_q_tiles * bq - self.q_len
        col_back = self.num_k_tiles * bk - self.kv_len + self.pre.right + self.post.right
        self.q = jnp.pad(q, ((0, 0), (self.row_front, row_back), (0, 0), (0, 0)))
        self.k = jnp.pad(k, ((0, 0), (self.col_front, col_back), (0, 0), (0, 0)))
        self.v = jnp.pad(v, ((0, 0), (0, self.num_k_tiles * bk - self.kv_len), (0, 0), (0, 0)))
        self.q_segments = self.k_segments = None
        if q_segment_ids is not None:
            self.q_segments = jnp.pad(q_segment_ids, ((0, 0), (self.row_front, row_back)), constant_values=-1)
            self.k_segments = jnp.pad(
                kv_segment_ids, ((0, 0), (self.col_front, col_back)), constant_values=-1
            )

    def rows(self, start, size):
        """Positions, q [B, size, H, D] and segment ids [B, size] of query rows [start, start + size)."""
        index = start + self.row_front
        positions = start + jnp.arange(size)
        q = jax.lax.dynamic_slice_in_dim(self.q, index, size, axis=1)
        return positions, q, _slice_or_none(self.q_segments, index, size)

    def cols(self, start, size):
        """Positions, k [B, size, Hkv, D] and segment ids [B, size] of keys [start, start + size)."""
        index = start + self.col_front
        positions = start + jnp.arange(size)
        k = jax.lax.dynamic_slice_in_dim(self.k, index, size, axis=1)
        return positions, k, _slice_or_none(self.k_segments, index, size)

    def visible(self, rows, cols, row_seg, col_seg):
        """[B or 1, R, C] boolean for the given positions; anything outside [0, T) x [0, S) is hidden."""
        ok = ((rows >= 0) & (rows < self.q_len))[:, None] & ((cols >= 0) & (cols < self.kv_len))[None, :]
        if self.cfg.causal:
            ok &= cols[None, :] <= rows[:, None] + (self.kv_len - self.q_len)
        ok = ok[None]
        if row_seg is not None:
            ok = ok & (row_seg[:, :, None] == col_seg[:, None, :])
        return ok

    def logits(self, row_start, num_rows, col_start, num_cols):
        """Pre-softmax logits of rows [row_start, +num_rows) x keys [col_start, +num_cols).

        Returns z [B, H, num_rows, num_cols] (MASK_VALUE where hidden) and visible [B or 1, rows, cols].
        """
        pre = self.pre
        rows, q, row_seg = self.rows(row_start - pre.rows, num_rows + pre.rows)
        cols, k, col_seg = self.cols(col_start - pre.left, num_cols + pre.left + pre.right)
        grouped = q.reshape(q.shape[:2] + (self.num_kv_heads, -1, self.head_dim))
        scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=self.acc_dtype)
        scores = scores.reshape(self.batch, self.num_heads, *scores.shape[-2:]) * self.head_dim**-0.5
        visible = self.visible(rows, cols, row_seg, col_seg)
        if self.params.pre_conv is not None:
            scores = jnp.where(visible[:, None], scores, 0.0)
            masks = same_document_rows(row_seg, pre.rows + 1)
            scores = conv_valid(scores, self.params.pre_conv, masks)
            visible = visible[:, pre.rows :, pre.left : pre.left + num_cols]
        if self.params.pre_head_mix is not None:
            scores = mix_heads(scores, self.params.pre_head_mix)
        return jnp.where(visible[:, None], scores, MASK_VALUE), visible

    def hidden_by_causality(self, row_start, col_start):
        """True when every key of tile col_start.. is in the future of every row of row_start.."""
        if not self.cfg.causal:
            return jnp.asarray(False)
        return col_start > row_start + self.bq - 1 + (self.kv_len - self.q_len)

    def weighted_values(self, probs, col_start):
        """probs [B, H, bq, bk] @ v[col_start : col_start + bk] -> [B, H, bq, D] (grouped-query)."""
        v = jax.lax.dynamic_slice_in_dim(self.v, col_start, self.bk, axis=1)
        grouped = probs.astype(v.dtype).reshape(self.batch, self.num_kv_heads, -1, *probs.shape[-2:])
        out = jnp.einsum("bkgts,bskd->bkgtd", grouped, v, preferred_element_type=self.acc_dtype)
        return out.reshape(self.batch, self.num_heads, self.bq, self.head_dim)

    def dropout(self, probs, rng, row_start, col_start):
        if rng is None:
            return probs
        rows = row_start + jnp.arange(probs.shape[2])
        cols = col_start + jnp.arange(probs.shape[3])
        keep = dropout_keep_mask(rng, self.cfg.dropout_rate, self.batch, self.num_heads, rows, cols)
        return apply_dropout(probs, keep, self.cfg.dropout_rate)


def _one_pass_tile(t: _Tiles, rng, tile):
    """Online softmax over key tiles for query tile `tile`: out [B, H, bq, D] and lse [B, H, bq]."""
    row_start = tile * t.bq
    shape = (t.batch, t.num_heads, t.bq)

    def step(carry, col_tile):
        col_start = col_tile * t.bk

        def compute(carry):
            m, total, acc = carry
            z, visible = t.logits(row_start, t.bq, col_start, t.bk)
            m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(z, axis=-1)))
            e = jnp.where(visible[:, None], jnp.exp(z - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            total = alpha * total + jnp.sum(e, axis=-1)
            e = t.dropout(e, rng, row_start, col_start)
            return m_new, total, alpha[..., None] * acc + t.weighted_values(e, col_start)

        skip = t.hidden_by_causality(row_start, col_start)
        return jax.lax.cond(skip, lambda c: c, compute, carry), None

    init = (
        jnp.full(shape, MASK_VALUE, t.acc_dtype),
        jnp.zeros(shape, t.acc_dtype),
        jnp.zeros(shape + (t.head_dim,), t.acc_dtype),
    )
    (m, total, acc), _ = jax.lax.scan(step, init, jnp.arange(t.num_k_tiles))
    out = acc / jnp.where(total == 0.0, 1.0, total)[..., None]
    return out, _log_sum_exp(m, total)


def _lse_tile(t: _Tiles, tile):
    """Log-sum-exp [B, H, bq] of the logits of query tile `tile` (0 for rows that see no key)."""
    row_start = tile * t.bq
    shape = (t.batch, t.num_heads, t.bq)

    def step(carry, col_tile):
        col_start = col_tile * t.bk

        def compute(carry):
            m, total = carry
            z, visible = t.logits(row_start, t.bq, col_start, t.bk)
            m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(z, axis=-1)))
            e = jnp.where(visible[:, None], jnp.exp(z - m_new[..., None]), 0.0)
            return m_new, jnp.exp(m - m_new) * total + jnp.sum(e, axis=-1)

        skip = t.hidden_by_causality(row_start, col_start)
        return jax.lax.cond(skip, lambda c: c, compute, carry), None

    init = (jnp.full(shape, MASK_VALUE, t.acc_dtype), jnp.zeros(shape, t.acc_dtype))
    (m, total), _ = jax.lax.scan(step, init, jnp.arange(t.num_k_tiles))
    return _log_sum_exp(m, total)


def _two_pass_tile(t: _Tiles, lse, rng, tile):
    """Query tile `tile` with post-softmax parts, given every row's lse [B, H, row_front + Tp]."""
    post = t.post
    row_start = tile * t.bq
    num_rows, num_cols = t.bq + post.rows, t.bk + post.left + post.right
    rows_lse = jax.lax.dynamic_slice_in_dim(lse, row_start + t.row_front - post.rows, num_rows, axis=2)
    _, _, row_seg = t.rows(row_start - post.rows, num_rows)

    def step(acc, col_tile):
        col_start = col_tile * t.bk

        def compute(acc):
            z, visible = t.logits(row_start - post.rows, num_rows, col_start - post.left, num_cols)
            probs = jnp.where(visible[:, None], jnp.exp(z - rows_lse[..., None]), 0.0)
            if t.params.post_conv is not None:
                probs = conv_valid(probs, t.params.post_conv, same_document_rows(row_seg, post.rows + 1))
                inner = visible[:, post.rows :, post.left : post.left + t.bk]
                probs = jnp.where(inner[:, None], probs, 0.0)
            if t.params.post_head_mix is not None:
                probs = mix_heads(probs, t.params.post_head_mix)
            probs = t.dropout(probs, rng, row_start, col_start)
            return acc + t.weighted_values(probs, col_start)

        skip = t.hidden_by_causality(row_start, col_start)
        return jax.lax.cond(skip, lambda a: a, compute, acc), None

    init = jnp.zeros((t.batch, t.num_heads, t.bq, t.head_dim), t.acc_dtype)
    acc, _ = jax.lax.scan(step, init, jnp.arange(t.num_k_tiles))
    return acc


def blockwise_attention_core(
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
    """The attention core (up to @ V) over tiles. Same inputs and result as reference_attention_core:
    q [B, T, H, D], k/v [B, S, Hkv, D] -> [B, T, H, D] in float32 (float64 for float64 inputs).

    block_q / block_k: tile sizes (rounded down to T / S when larger); peak memory is about
    a few [B, H, block_q, S] buffers during the backward pass.
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name}={size!r} is invalid: must be a positive integer or None")
    bq = min(block_q or DEFAULT_BLOCK_Q, _round_up(q_len, 8))
    bk = min(block_k or DEFAULT_BLOCK_K, _round_up(kv_len, 8))
    t = _Tiles(q, k, v, params, cfg, q_segment_ids, kv_segment_ids, bq, bk)
    tiles = jnp.arange(t.num_q_tiles)
    if params.post_conv is None and params.post_head_mix is None:
        out, _ = jax.lax.map(jax.checkpoint(lambda i: _one_pass_tile(t, dropout_rng, i)), tiles)
    else:
        lse = jax.lax.map(jax.checkpoint(lambda i: _lse_tile(t, i)), tiles)  # [nq, B, H, bq]
        lse = jnp.moveaxis(lse, 0, 2).reshape(t.batch, t.num_heads, -1)
        lse = jnp.pad(lse, ((0, 0), (0, 0), (t.row_front, 0)))
        out = jax.lax.map(jax.checkpoint(lambda i: _two_pass_tile(t, lse, dropout_rng, i)), tiles)
    # [nq, B, H, bq, D] -> [B, T, H, D]
    out = jnp.moveaxis(out, 0, 1).transpose(0, 1, 3, 2, 4).reshape(t.batch, -1, t.num_heads, t.head_dim)
    return out[:, :q_len]
