"""The fused MTA core op as Pallas kernels for the GPU (Triton backend), forward and backward.

Computes exactly `kernels.core_reference.core_reference` (see its docstring) without materialising [T, S]:

    forward   grid (q tiles, B, H / G): each program owns a q tile of one head group of G heads and loops over
              kv tiles (up to the causal limit), recomputing the G score tiles (C dots of Dk each), the band
              correction (only on the kv tiles the band touches), the pre-softmax mix, the mask and an online
              softmax. With post_mix a first loop finds the per-row log-sum-exp and a second one mixes the
              normalised probabilities before PV.
    backward  a dQ kernel (grid over q tiles, loop over kv tiles; it also returns the band's gradient and
              per-program partial sums of the mixes' gradients, and with post_mix computes delta in a first
              loop) and a dK/dV kernel (grid over kv tiles, loop over q tiles; dV per query head, summed over
              each kv head's query heads in XLA).

G is the larger of the two mixes' group sizes (1 without mixes); a smaller mix is widened to a block-diagonal
[H / G, G, G] matrix in XLA, so that autodiff maps the gradient back. Probabilities use base 2 (log2(e) folded
into the scores); the saved residual is the base-2 log-sum-exp per row.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.core_reference import MASK_VALUE

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static shape and option data shared by the kernels."""

    causal: bool
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    width: int  # band width W, 0 without a band
    slabs: int  # C
    group: int  # G
    has_pre: bool
    has_post: bool
    rep: int  # H / Hkv
    num_warps: int
    num_stages: int
    interpret: bool

    @property
    def shift(self) -> int:
        """S - T: query row i sits at key position i + S - T."""
        return self.kv_len - self.q_len

    @property
    def params(self) -> pltriton.CompilerParams:
        return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


# ----------------------------------------------------------------------------------------------------------
# Validation and XLA glue
# ----------------------------------------------------------------------------------------------------------


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _mix_size(mix: jax.Array | None, heads: int, name: str) -> int:
    """Group size c of a [H / c, c, c] mix (1 when None)."""
    if mix is None:
        return 1
    if mix.ndim != 3 or mix.shape[1] != mix.shape[2] or mix.shape[0] * mix.shape[1] != heads:
        raise ValueError(f"{name} must have shape [H / c, c, c] with H = {heads}, got {mix.shape}")
    if mix.shape[1] not in (1, 2, 3, 4):
        raise ValueError(f"{name} group size must be 1, 2, 3 or 4, got {mix.shape[1]}")
    return mix.shape[1]


def _validate(qp, kp, v, band, pre_mix, post_mix, block_q, block_k) -> tuple[int, int]:
    """Raise ValueError for unsupported shapes and blocks; return (W, G)."""
    batch, heads, slabs, q_len, dk = qp.shape
    kv_len, d = kp.shape[3], v.shape[3]
    if kp.shape != (batch, heads, slabs, kv_len, dk):
        raise ValueError(f"kp must have shape {(batch, heads, slabs, '*', dk)}, got {kp.shape}")
    if v.ndim != 4 or v.shape[0] != batch or v.shape[2] != kv_len or heads % v.shape[1]:
        raise ValueError(f"v must have shape [B, Hkv, S, D] with H % Hkv == 0, got {v.shape}")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if not _is_pow2(block) or block < 16:
            raise ValueError(f"{name} must be a power of two >= 16, got {block}")
    if q_len % block_q:
        raise ValueError(f"block_q={block_q} must divide T={q_len}")
    if kv_len % block_k:
        raise ValueError(f"block_k={block_k} must divide S={kv_len}")
    if dk % 16:
        raise ValueError(f"Dk must be a multiple of 16, got Dk={dk}")
    if d % 16:
        raise ValueError(f"D must be a multiple of 16, got D={d}")
    width = 0
    if band is not None:
        width = band.shape[3]
        if band.shape != (batch, heads, q_len, width):
            raise ValueError(f"band must have shape [B, H, T, W], got {band.shape}")
        if width > block_k:
            raise ValueError(f"band width W={width} must be <= block_k={block_k}")
    c_pre, c_post = _mix_size(pre_mix, heads, "pre_mix"), _mix_size(post_mix, heads, "post_mix")
    group = max(c_pre, c_post)
    if group % min(c_pre, c_post):
        raise ValueError(f"mix group sizes must divide each other, got pre_mix {c_pre} and post_mix {c_post}")
    return width, group


def _widen_mix(mix: jax.Array | None, group: int) -> jax.Array | None:
    """[H / c, c, c] -> block-diagonal [H / G, G, G] float32 (G a multiple of c)."""
    if mix is None:
        return None
    size = mix.shape[1]
    blocks = group // size
    grouped = mix.astype(jnp.float32).reshape(-1, blocks, size, size)
    wide = jnp.einsum("gpxy,pq->gpxqy", grouped, jnp.eye(blocks, dtype=jnp.float32))
    return wide.reshape(-1, group, group)


def mta_core_triton(
    qp: jax.Array,
    kp: jax.Array,
    v: jax.Array,
    band: jax.Array | None,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    pre_mix: jax.Array | None,
    post_mix: jax.Array | None,
    *,
    causal: bool,
    block_q: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """The core op on the GPU: qp [B,H,C,T,Dk], kp [B,H,C,S,Dk], v [B,Hkv,S,D] -> out [B,H,T,D] float32.

    Differentiable in qp, kp, v, band, pre_mix and post_mix. T, S must be multiples of the (power-of-two,
    >= 16) blocks, Dk and D multiples of 16 and W <= block_k; the caller pads.
    """
    width, group = _validate(qp, kp, v, band, pre_mix, post_mix, block_q, block_k)
    cfg = _Cfg(
        causal=bool(causal),
        block_q=block_q,
        block_k=block_k,
        q_len=qp.shape[3],
        kv_len=kp.shape[3],
        width=width,
        slabs=qp.shape[2],
        group=group,
        has_pre=pre_mix is not None,
        has_post=post_mix is not None,
        rep=qp.shape[1] // v.shape[1],
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
    )
    band_t = None if band is None else jnp.swapaxes(band.astype(jnp.float32), 2, 3)  # [B, H, W, T]
    q_ids = q_segment_ids.astype(jnp.int32)
    kv_ids = kv_segment_ids.astype(jnp.int32)
    pre, post = _widen_mix(pre_mix, group), _widen_mix(post_mix, group)
    return _core(cfg, qp, kp, v, band_t, q_ids, kv_ids, pre, post)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, qp, kp, v, band_t, q_ids, kv_ids, pre, post):
    return _forward(cfg, qp, kp, v, band_t, q_ids, kv_ids, pre, post)[0]


def _core_fwd(cfg, qp, kp, v, band_t, q_ids, kv_ids, pre, post):
    out, lse2 = _forward(cfg, qp, kp, v, band_t, q_ids, kv_ids, pre, post)
    return out, (qp, kp, v, band_t, q_ids, kv_ids, pre, post, out, lse2)


def _core_bwd(cfg, res, dout):
    qp, kp, v, band_t, q_ids, kv_ids, pre, post, out, lse2 = res
    dout = dout.astype(jnp.float32)
    dqp, dband_t, dpre, dpost, delta = _backward_dq(
        cfg, qp, kp, v, band_t, q_ids, kv_ids, pre, post, dout, lse2, out
    )
    dkp, dv = _backward_dkv(cfg, qp, kp, v, band_t, q_ids, kv_ids, pre, post, dout, lse2, delta)
    return dqp, dkp, dv, dband_t, None, None, dpre, dpost


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------------------
# Tile-level pieces shared by the kernels (traced inside the kernels)
# ----------------------------------------------------------------------------------------------------------


def _load_mix(ref) -> list[list[jax.Array]] | None:
    """[G, G] mix block -> nested list of scalars m[a][h] (a = source head, h = target head)."""
    if ref is None:
        return None
    group = ref.shape[0]
    return [[ref[a, h] for h in range(group)] for a in range(group)]


def _apply_mix(tiles: list[jax.Array], mix) -> list[jax.Array]:
    """out[h] = sum_a mix[a][h] tiles[a]; identity when mix is None."""
    if mix is None:
        return tiles
    out = []
    for h in range(len(tiles)):
        acc = tiles[0] * mix[0][h]
        for a in range(1, len(tiles)):
            acc = acc + tiles[a] * mix[a][h]
        out.append(acc)
    return out


def _offsets(cfg: _Cfg, q_start, k_start) -> jax.Array:
    """[bq, bk] int32: (i + S - T) - j for the tile's rows i and columns j."""
    rows = q_start + cfg.shift + jnp.arange(cfg.block_q, dtype=jnp.int32)
    cols = k_start + jnp.arange(cfg.block_k, dtype=jnp.int32)
    return rows[:, None] - cols[None, :]


def _visible(cfg: _Cfg, q_ids, kv_ids, offsets) -> jax.Array:
    """[bq, bk] bool from the tile's segment ids [bq], [bk] and offsets."""
    vis = q_ids[:, None] == kv_ids[None, :]
    if cfg.causal:
        vis = jnp.logical_and(vis, offsets >= 0)
    return vis


def _band_bias(cfg: _Cfg, offsets, band_rows) -> jax.Array:
    """Expand band_rows (W vectors [bq], entry d for offset d) to the [bq, bk] tile (0 outside the band)."""
    bias = jnp.zeros((cfg.block_q, cfg.block_k), jnp.float32)
    for d, row in enumerate(band_rows):
        bias = jnp.where(offsets == d, row[:, None], bias)
    return bias


def _scores(cfg: _Cfg, load_q, load_k, band_row, offsets, in_band) -> list[jax.Array]:
    """The G raw score tiles s[a] [bq, bk] float32: QK over C slabs, minus the band where in_band.

    in_band: False (no band at all) or a traced bool, true on the tiles the band touches.
    """
    scores = []
    for a in range(cfg.group):
        s = None
        for c in range(cfg.slabs):
            part = pltriton.dot(load_q(a, c), load_k(a, c), trans_b=True)
            s = part if s is None else s + part
        scores.append(s)
    if in_band is False:
        return scores

    def biases():
        return tuple(
            _band_bias(cfg, offsets, [band_row(a, d) for d in range(cfg.width)]) for a in range(cfg.group)
        )

    def zeros():
        return tuple(jnp.zeros((cfg.block_q, cfg.block_k), jnp.float32) for _ in range(cfg.group))

    return [s - b for s, b in zip(scores, lax.cond(in_band, biases, zeros), strict=True)]


def _loop(cfg: _Cfg, start, band_lo, band_hi, end, body, carry):
    """Run body(t, carry, in_band) over tiles [start, end), in_band = band_lo <= t < band_hi (or False)."""
    if not cfg.width:
        return lax.fori_loop(start, end, lambda t, c: body(t, c, False), carry)
    return lax.fori_loop(
        start, end, lambda t, c: body(t, c, jnp.logical_and(t >= band_lo, t < band_hi)), carry
    )


def _div_tiles(x, block: int, above: int = 0):
    """floor(max(x, 0) / block), plus `above` unless x < 0 (then 0): a tile index, or with above=1 a count."""
    q = lax.div(jnp.maximum(x, 0), jnp.int32(block))
    if above:
        return jnp.where(x < 0, 0, q + above)
    return q


def _kv_tiles_for_q(cfg: _Cfg, q_start):
    """(end, band_lo, band_hi) kv-tile bounds for the q tile starting at q_start."""
    n_kv = cfg.kv_len // cfg.block_k
    last_col = q_start + cfg.block_q - 1 + cfg.shift  # rightmost causally visible column of the tile
    end = jnp.minimum(_div_tiles(last_col, cfg.block_k, 1), n_kv) if cfg.causal else jnp.int32(n_kv)
    band_lo = _div_tiles(q_start + cfg.shift - (cfg.width - 1), cfg.block_k)
    band_hi = _div_tiles(last_col, cfg.block_k, 1)
    return end, band_lo, band_hi


def _q_tiles_for_kv(cfg: _Cfg, k_start):
    """(start, band_lo, band_hi) q-tile bounds for the kv tile starting at k_start."""
    first_row = k_start - cfg.shift  # first row that sees column k_start causally
    start = _div_tiles(first_row, cfg.block_q) if cfg.causal else jnp.int32(0)
    last_row = k_start + cfg.block_k - 1 + cfg.width - 1 - cfg.shift
    return start, _div_tiles(first_row, cfg.block_q), _div_tiles(last_row, cfg.block_q, 1)


def _softmax_tiles(cfg, scores, pre, vis) -> list[jax.Array]:
    """Mixed, base-2 scaled and masked logits zl[h] [bq, bk]."""
    return [jnp.where(vis, z * LOG2E, MASK_VALUE) for z in _apply_mix(scores, pre)]


def _probs(zl, lse2, vis):
    """Normalised probabilities P = 2^(zl - lse2), 0 where invisible."""
    return jnp.where(vis, jnp.exp2(zl - lse2[:, None]), 0.0)


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


def _unpack(cfg: _Cfg, refs, names: list[str]) -> dict:
    """Map the kernel's positional refs to names; names the configuration leaves out map to None."""
    present = {"band": cfg.width > 0, "pre": cfg.has_pre, "post": cfg.has_post}
    present.update({"dband": cfg.width > 0, "dpre": cfg.has_pre, "dpost": cfg.has_post})
    present.update({"delta_in": not cfg.has_post, "delta_out": cfg.has_post})
    out, it = {}, iter(refs)
    for name in names:
        out[name] = next(it) if present.get(name, True) else None
    assert next(it, None) is None, "unused refs"
    return out


def _forward_kernel(*refs, cfg: _Cfg):
    r = _unpack(cfg, refs, ["q_ids", "kv_ids", "qp", "kp", "v", "band", "pre", "post", "out", "lse"])
    q_start = pl.program_id(0) * cfg.block_q
    head0 = pl.program_id(2) * cfg.group
    q_ids = r["q_ids"][pl.ds(q_start, cfg.block_q)]
    pre, post = _load_mix(r["pre"]), _load_mix(r["post"])
    kv_heads = [(head0 + h) // cfg.rep for h in range(cfg.group)]
    group = range(cfg.group)

    def logits(t, in_band):
        k_start = t * cfg.block_k
        offsets = _offsets(cfg, q_start, k_start)
        vis = _visible(cfg, q_ids, r["kv_ids"][pl.ds(k_start, cfg.block_k)], offsets)
        scores = _scores(
            cfg,
            lambda a, c: r["qp"][a, c],
            lambda a, c: r["kp"][a, c, pl.ds(k_start, cfg.block_k), :],
            lambda a, d: r["band"][a, d, :],
            offsets,
            in_band,
        )
        return _softmax_tiles(cfg, scores, pre, vis), vis

    def load_v(h, t):
        return r["v"][kv_heads[h], pl.ds(t * cfg.block_k, cfg.block_k), :]

    def stats_step(t, carry, in_band):
        """Online softmax over kv tile t: per head (running max, running sum[, unnormalised PV])."""
        zl, vis = logits(t, in_band)
        out = []
        for h in group:
            m, denom, *acc = carry[h]
            m_next = jnp.maximum(m, jnp.max(zl[h], axis=1))
            corr = jnp.exp2(m - m_next)
            p = jnp.where(vis, jnp.exp2(zl[h] - m_next[:, None]), 0.0)  # 0, not 2^0, on masked rows
            denom = corr * denom + jnp.sum(p, axis=1)
            if acc:  # without post_mix, PV is accumulated in the same pass
                vt = load_v(h, t)
                acc = [corr[:, None] * acc[0] + pltriton.dot(p.astype(vt.dtype), vt)]
            out.append((m_next, denom, *acc))
        return tuple(out)

    d = r["v"].shape[-1]
    row = jnp.zeros((cfg.block_q,), jnp.float32)
    zeros = jnp.zeros((cfg.block_q, d), jnp.float32)
    init = tuple((row + MASK_VALUE, row) + (() if cfg.has_post else (zeros,)) for _ in group)
    end, band_lo, band_hi = _kv_tiles_for_q(cfg, q_start)
    stats = _loop(cfg, 0, band_lo, band_hi, end, stats_step, init)
    lse2 = []
    for h in group:
        m, denom, *acc = stats[h]
        empty = denom == 0.0
        lse2.append(jnp.where(empty, 0.0, m + jnp.log2(jnp.where(empty, 1.0, denom))))
        if acc:
            r["out"][h] = acc[0] / jnp.where(empty, 1.0, denom)[:, None]
        r["lse"][h] = lse2[h]
    if not cfg.has_post:
        return

    def pv_step(t, accs, in_band):
        zl, vis = logits(t, in_band)
        probs = _apply_mix([_probs(zl[h], lse2[h], vis) for h in group], post)
        out = []
        for h in group:
            vt = load_v(h, t)
            out.append(accs[h] + pltriton.dot(probs[h].astype(vt.dtype), vt))
        return tuple(out)

    accs = _loop(cfg, 0, band_lo, band_hi, end, pv_step, tuple(zeros for _ in group))
    for h in group:
        r["out"][h] = accs[h]


def _common_specs(cfg: _Cfg, qp, kp, v, band_t, pre, post, q_tiled: bool):
    """In-specs and operands for (q_ids, kv_ids, qp, kp, v, band, pre, post); grid (tile, B, H / G).

    q_tiled: the grid's first axis tiles the queries (forward, dQ) rather than the keys (dK/dV).
    """
    g, bq, bk = cfg.group, cfg.block_q, cfg.block_k
    slabs, q_len, kv_len = cfg.slabs, cfg.q_len, cfg.kv_len
    dk, kv_heads, d = qp.shape[-1], v.shape[1], v.shape[-1]
    qb, kb = (bq, kv_len) if q_tiled else (q_len, bk)
    if q_tiled:
        qp_map, kp_map = (lambda i, b, h: (b, h, 0, i, 0)), (lambda i, b, h: (b, h, 0, 0, 0))
    else:
        qp_map, kp_map = (lambda i, b, h: (b, h, 0, 0, 0)), (lambda i, b, h: (b, h, 0, i, 0))
    specs = [
        pl.BlockSpec((None, q_len), lambda i, b, h: (b, 0)),
        pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
        pl.BlockSpec((None, g, slabs, qb, dk), qp_map),
        pl.BlockSpec((None, g, slabs, kb, dk), kp_map),
        pl.BlockSpec((None, kv_heads, kv_len, d), lambda i, b, h: (b, 0, 0, 0)),
    ]
    operands = [qp, kp, v]
    if band_t is not None:
        band_map = (lambda i, b, h: (b, h, 0, i)) if q_tiled else (lambda i, b, h: (b, h, 0, 0))
        specs.append(pl.BlockSpec((None, g, cfg.width, bq if q_tiled else q_len), band_map))
        operands.append(band_t)
    for mix in (pre, post):
        if mix is not None:
            specs.append(pl.BlockSpec((None, g, g), lambda i, b, h: (h, 0, 0)))
            operands.append(mix)
    return specs, operands


def _forward(cfg: _Cfg, qp, kp, v, band_t, q_ids, kv_ids, pre, post):
    """-> out [B, H, T, D] float32, lse2 [B, H, T] (base 2, 0 for rows without a visible key)."""
    batch, heads = qp.shape[:2]
    d = v.shape[-1]
    specs, operands = _common_specs(cfg, qp, kp, v, band_t, pre, post, q_tiled=True)
    grid = (cfg.q_len // cfg.block_q, batch, heads // cfg.group)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=grid,
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, cfg.group, cfg.block_q, d), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, cfg.group, cfg.block_q), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, cfg.q_len, d), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, cfg.q_len), jnp.float32),
        ],
        compiler_params=cfg.params,
        interpret=cfg.interpret,
        name="mta_core_fwd",
    )(q_ids, kv_ids, *operands)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


def _dq_kernel(*refs, cfg: _Cfg):
    names = ["q_ids", "kv_ids", "qp", "kp", "v", "band", "pre", "post", "dout", "lse", "delta_in"]
    names += ["dqp", "dband", "dpre", "dpost", "delta_out"]
    r = _unpack(cfg, refs, names)
    q_start = pl.program_id(0) * cfg.block_q
    head0 = pl.program_id(2) * cfg.group
    q_ids = r["q_ids"][pl.ds(q_start, cfg.block_q)]
    pre, post = _load_mix(r["pre"]), _load_mix(r["post"])
    kv_heads = [(head0 + h) // cfg.rep for h in range(cfg.group)]
    group = range(cfg.group)
    lse2 = [r["lse"][h] for h in group]
    dout = [r["dout"][h] for h in group]
    row = jnp.zeros((cfg.block_q,), jnp.float32)

    def recompute(t, in_band):
        """Scores, probabilities, offsets, visibility and dP (before the post-mix transpose) of kv tile t."""
        k_start = t * cfg.block_k
        offsets = _offsets(cfg, q_start, k_start)
        vis = _visible(cfg, q_ids, r["kv_ids"][pl.ds(k_start, cfg.block_k)], offsets)
        scores = _scores(
            cfg,
            lambda a, c: r["qp"][a, c],
            lambda a, c: r["kp"][a, c, pl.ds(k_start, cfg.block_k), :],
            lambda a, d: r["band"][a, d, :],
            offsets,
            in_band,
        )
        zl = _softmax_tiles(cfg, scores, pre, vis)
        probs = [_probs(zl[h], lse2[h], vis) for h in group]
        dpf = []
        for h in group:
            vt = r["v"][kv_heads[h], pl.ds(k_start, cfg.block_k), :]
            dpf.append(pltriton.dot(dout[h].astype(vt.dtype), vt, trans_b=True))
        return scores, probs, offsets, dpf

    end, band_lo, band_hi = _kv_tiles_for_q(cfg, q_start)
    if cfg.has_post:

        def delta_step(t, carry, in_band):
            delta, dpost = carry
            _, probs, _, dpf = recompute(t, in_band)
            dp = _apply_mix_t(dpf, post)
            delta = tuple(delta[a] + jnp.sum(probs[a] * dp[a], axis=1) for a in group)
            dpost = tuple(
                tuple(dpost[a][h] + jnp.sum(probs[a] * dpf[h], axis=1) for h in group) for a in group
            )
            return delta, dpost

        init = (tuple(row for _ in group), tuple(tuple(row for _ in group) for _ in group))
        delta, dpost = _loop(cfg, 0, band_lo, band_hi, end, delta_step, init)
        for a in group:
            r["delta_out"][a] = delta[a]
            for h in group:
                r["dpost"][a, h, :] = dpost[a][h]
    else:
        delta = [r["delta_in"][h] for h in group]

    def dq_step(t, carry, in_band):
        dq, dband, dpre = carry
        scores, probs, offsets, dpf = recompute(t, in_band)
        dp = _apply_mix_t(dpf, post)
        dz = [probs[a] * (dp[a] - delta[a][:, None]) for a in group]
        ds = _apply_mix_t(dz, pre)
        if cfg.has_pre:
            dpre = tuple(tuple(dpre[a][h] + jnp.sum(scores[a] * dz[h], axis=1) for h in group) for a in group)
        k_start = t * cfg.block_k
        new_dq = []
        for a in group:
            for c in range(cfg.slabs):
                kt = r["kp"][a, c, pl.ds(k_start, cfg.block_k), :]
                new_dq.append(dq[a * cfg.slabs + c] + pltriton.dot(ds[a].astype(kt.dtype), kt))
        if in_band is not False:

            def band_grads():
                return tuple(
                    tuple(
                        dband[a][d] - jnp.sum(jnp.where(offsets == d, ds[a], 0.0), axis=1)
                        for d in range(cfg.width)
                    )
                    for a in group
                )

            dband = lax.cond(in_band, band_grads, lambda: dband)
        return tuple(new_dq), dband, dpre

    dk = r["qp"].shape[-1]
    init = (
        tuple(jnp.zeros((cfg.block_q, dk), jnp.float32) for _ in range(cfg.group * cfg.slabs)),
        tuple(tuple(row for _ in range(cfg.width)) for _ in group),
        tuple(tuple(row for _ in group) for _ in group) if cfg.has_pre else (),
    )
    dq, dband, dpre = _loop(cfg, 0, band_lo, band_hi, end, dq_step, init)
    for a in group:
        for c in range(cfg.slabs):
            r["dqp"][a, c] = dq[a * cfg.slabs + c].astype(r["dqp"].dtype)
        for d in range(cfg.width):
            r["dband"][a, d, :] = dband[a][d]
        if cfg.has_pre:
            for h in group:
                r["dpre"][a, h, :] = dpre[a][h]


def _apply_mix_t(tiles: list[jax.Array], mix) -> list[jax.Array]:
    """out[a] = sum_h mix[a][h] tiles[h] (the transpose of _apply_mix); identity when mix is None."""
    if mix is None:
        return tiles
    out = []
    for a in range(len(tiles)):
        acc = tiles[0] * mix[a][0]
        for h in range(1, len(tiles)):
            acc = acc + tiles[h] * mix[a][h]
        out.append(acc)
    return out


def _backward_dq(cfg: _Cfg, qp, kp, v, band_t, q_ids, kv_ids, pre, post, dout, lse2, out):
    """-> dqp, dband_t [B,H,W,T] or None, dpre [H/G,G,G] or None, dpost or None, delta [B,H,T]."""
    batch, heads = qp.shape[:2]
    g, bq, d = cfg.group, cfg.block_q, v.shape[-1]
    n_q = cfg.q_len // bq
    specs, operands = _common_specs(cfg, qp, kp, v, band_t, pre, post, q_tiled=True)
    row_spec = pl.BlockSpec((None, g, bq), lambda i, b, h: (b, h, i))
    specs += [pl.BlockSpec((None, g, bq, d), lambda i, b, h: (b, h, i, 0)), row_spec]
    operands += [dout, lse2]
    if not cfg.has_post:
        specs.append(row_spec)
        operands.append(jnp.sum(dout * out, axis=-1))
    out_specs = [pl.BlockSpec((None, g, cfg.slabs, bq, qp.shape[-1]), lambda i, b, h: (b, h, 0, i, 0))]
    out_shape = [jax.ShapeDtypeStruct(qp.shape, qp.dtype)]
    if cfg.width:
        out_specs.append(pl.BlockSpec((None, g, cfg.width, bq), lambda i, b, h: (b, h, 0, i)))
        out_shape.append(jax.ShapeDtypeStruct(band_t.shape, jnp.float32))
    partial_shape = jax.ShapeDtypeStruct((n_q, batch, heads // g, g, g, bq), jnp.float32)
    partial_spec = pl.BlockSpec((None, None, None, g, g, bq), lambda i, b, h: (i, b, h, 0, 0, 0))
    for present in (cfg.has_pre, cfg.has_post):
        if present:
            out_specs.append(partial_spec)
            out_shape.append(partial_shape)
    if cfg.has_post:
        out_specs.append(row_spec)
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, cfg.q_len), jnp.float32))
    results = list(
        pl.pallas_call(
            functools.partial(_dq_kernel, cfg=cfg),
            grid=(n_q, batch, heads // g),
            in_specs=specs,
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=cfg.params,
            interpret=cfg.interpret,
            name="mta_core_bwd_dq",
        )(q_ids, kv_ids, *operands)
    )
    dqp = results.pop(0)
    dband_t = results.pop(0) if cfg.width else None
    dpre = results.pop(0).sum(axis=(0, 1, 5)) if cfg.has_pre else None
    dpost = results.pop(0).sum(axis=(0, 1, 5)) if cfg.has_post else None
    delta = results.pop(0) if cfg.has_post else operands[-1]
    return dqp, dband_t, dpre, dpost, delta


def _dkv_kernel(*refs, cfg: _Cfg):
    names = ["q_ids", "kv_ids", "qp", "kp", "v", "band", "pre", "post", "dout", "lse", "delta", "dkp", "dv"]
    r = _unpack(cfg, refs, names)
    k_start = pl.program_id(0) * cfg.block_k
    head0 = pl.program_id(2) * cfg.group
    kv_ids = r["kv_ids"][pl.ds(k_start, cfg.block_k)]
    pre, post = _load_mix(r["pre"]), _load_mix(r["post"])
    group = range(cfg.group)
    vts = [r["v"][(head0 + h) // cfg.rep, pl.ds(k_start, cfg.block_k), :] for h in group]

    def step(t, carry, in_band):
        dk, dv = carry
        q_start = t * cfg.block_q
        rows = pl.ds(q_start, cfg.block_q)
        offsets = _offsets(cfg, q_start, k_start)
        vis = _visible(cfg, r["q_ids"][rows], kv_ids, offsets)
        scores = _scores(
            cfg,
            lambda a, c: r["qp"][a, c, rows, :],
            lambda a, c: r["kp"][a, c],
            lambda a, d: r["band"][a, d, rows],
            offsets,
            in_band,
        )
        zl = _softmax_tiles(cfg, scores, pre, vis)
        probs = [_probs(zl[h], r["lse"][h, rows], vis) for h in group]
        pf = _apply_mix(probs, post)
        douts = [r["dout"][h, rows, :] for h in group]
        dpf = [pltriton.dot(douts[h].astype(vts[h].dtype), vts[h], trans_b=True) for h in group]
        dv = tuple(
            dv[h] + pltriton.dot(pf[h].astype(vts[h].dtype), douts[h].astype(vts[h].dtype), trans_a=True)
            for h in group
        )
        dp = _apply_mix_t(dpf, post)
        dz = [probs[a] * (dp[a] - r["delta"][a, rows][:, None]) for a in group]
        ds = _apply_mix_t(dz, pre)
        new_dk = []
        for a in group:
            for c in range(cfg.slabs):
                qt = r["qp"][a, c, rows, :]
                new_dk.append(dk[a * cfg.slabs + c] + pltriton.dot(ds[a].astype(qt.dtype), qt, trans_a=True))
        return tuple(new_dk), dv

    dk_dim, d = r["qp"].shape[-1], r["v"].shape[-1]
    init = (
        tuple(jnp.zeros((cfg.block_k, dk_dim), jnp.float32) for _ in range(cfg.group * cfg.slabs)),
        tuple(jnp.zeros((cfg.block_k, d), jnp.float32) for _ in group),
    )
    start, band_lo, band_hi = _q_tiles_for_kv(cfg, k_start)
    dk, dv = _loop(cfg, start, band_lo, band_hi, jnp.int32(cfg.q_len // cfg.block_q), step, init)
    for a in group:
        for c in range(cfg.slabs):
            r["dkp"][a, c] = dk[a * cfg.slabs + c].astype(r["dkp"].dtype)
        r["dv"][a] = dv[a]


def _backward_dkv(cfg: _Cfg, qp, kp, v, band_t, q_ids, kv_ids, pre, post, dout, lse2, delta):
    """-> dkp [B,H,C,S,Dk], dv [B,Hkv,S,D]."""
    batch, heads = qp.shape[:2]
    g, bk, d = cfg.group, cfg.block_k, v.shape[-1]
    specs, operands = _common_specs(cfg, qp, kp, v, band_t, pre, post, q_tiled=False)
    row_spec = pl.BlockSpec((None, g, cfg.q_len), lambda i, b, h: (b, h, 0))
    specs += [pl.BlockSpec((None, g, cfg.q_len, d), lambda i, b, h: (b, h, 0, 0)), row_spec, row_spec]
    operands += [dout, lse2, delta]
    dkp, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(cfg.kv_len // bk, batch, heads // g),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, g, cfg.slabs, bk, kp.shape[-1]), lambda i, b, h: (b, h, 0, i, 0)),
            pl.BlockSpec((None, g, bk, d), lambda i, b, h: (b, h, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(kp.shape, kp.dtype),
            jax.ShapeDtypeStruct((batch, heads, cfg.kv_len, d), jnp.float32),
        ],
        compiler_params=cfg.params,
        interpret=cfg.interpret,
        name="mta_core_bwd_dkv",
    )(q_ids, kv_ids, *operands)
    dv = dv.reshape(batch, v.shape[1], cfg.rep, cfg.kv_len, d).sum(axis=2).astype(v.dtype)
    return dkp, dv
