"""The fused MTA core op as Pallas TPU (Mosaic) kernels, forward and backward.

Computes exactly kernels/core_reference.py's `core_reference` (its `out`), flash-attention style:

- Forward, grid (B, H / G, T / block_q, S / block_k), kv tiles innermost ("arbitrary"). One program holds the
  score tiles of a whole head group of G heads (G = the larger mixing group size, 1 without mixes), so the
  pre-softmax head mix is G x G scalar multiply-adds on those tiles (weights in SMEM).
  Without post_mix: online softmax with running max / sum / accumulator in VMEM scratch.
  With post_mix: a first pass computes the lse, a second one the normalised P, mixes it and accumulates P V.
- Backward (custom_vjp): a dQ kernel (kv innermost; also dband and the mixes' per-program partials), a dK/dV
  kernel (q innermost) and, with post_mix, a delta kernel. dV comes out per query head and is summed over
  each kv head's query heads in XLA.
- Causal block skipping: tiles above the (bottom-right) diagonal are skipped with pl.when, and their index
  maps point at a block that is already loaded, so no DMA is spent on them.
- The band [B, H, T, W] is expanded in-kernel with W iota selects, only on tiles that intersect the band.

Layouts as in jax's ops/tpu/flash_attention.py: q segment ids [B, T, 128] (lane-broadcast), kv segment ids
[B, 8, S] (sublane-broadcast), lse and delta [B, H, T, 128].
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.core_reference import MASK_VALUE

LANES = 128
SUBLANES = 8
NT_DIMS = (((1,), (1,)), ((), ()))  # a [m, k] . b [n, k] -> [m, n]
TN_DIMS = (((0,), (0,)), ((), ()))  # a [k, m] . b [k, n] -> [m, n]


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static shapes and options shared by all kernels."""

    causal: bool
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    heads: int
    group: int  # G: heads per program
    pre_size: int  # pre_mix group size (0: no pre_mix)
    post_size: int  # post_mix group size (0: no post_mix)
    kv_rep: int  # query heads per kv head
    v_heads_per_block: int  # kv heads in one v block
    width: int  # band width W (0: no band)
    interpret: bool

    @property
    def num_q(self) -> int:
        return self.q_len // self.block_q

    @property
    def num_k(self) -> int:
        return self.kv_len // self.block_k

    @property
    def shift(self) -> int:
        """Bottom-right causal alignment: query i sees key j <= i + shift."""
        return self.kv_len - self.q_len

    def v_index(self, head: int) -> int:
        """Index into the v block of the kv head of head `head` of the group."""
        return head * self.v_heads_per_block // self.group


# ----------------------------------------------------------------------------------------------------------
# Tile helpers


def _lanes(x: jax.Array, n: int) -> jax.Array:
    """[r, 128] lane-broadcast values -> [r, n]."""
    if n == LANES:
        return x
    if n % LANES == 0:
        return jnp.tile(x, (1, n // LANES))
    return x[:, :n]


def _lane_partial(x: jax.Array) -> jax.Array:
    """[r, n] -> [1, min(n, 128)] partial sums (the total is their sum)."""
    col = jnp.sum(x, axis=0, keepdims=True)
    if col.shape[1] <= LANES:
        return col
    out = col[:, :LANES]
    for k in range(1, col.shape[1] // LANES):
        out = out + col[:, k * LANES : (k + 1) * LANES]
    return out


def _last_k(cfg: _Config, qi):
    """Last kv tile a causal q tile sees (0 when it sees none)."""
    row = jnp.maximum(qi * cfg.block_q + cfg.block_q - 1 + cfg.shift, 0)
    return jnp.minimum(lax.div(row, jnp.int32(cfg.block_k)), cfg.num_k - 1)  # row >= 0: no sign fix-up


def _first_q(cfg: _Config, ki):
    """First q tile that sees causal kv tile ki."""
    col = jnp.maximum(ki * cfg.block_k - cfg.shift, 0)
    return jnp.minimum(lax.div(col, jnp.int32(cfg.block_q)), cfg.num_q - 1)


def _should_run(cfg: _Config, qi, ki):
    if not cfg.causal:
        return True
    return ki * cfg.block_k <= qi * cfg.block_q + cfg.block_q - 1 + cfg.shift


def _band_hits(cfg: _Config, qi, ki):
    """Whether tile (qi, ki) intersects the band 0 <= (i + shift) - j < W."""
    lo = qi * cfg.block_q + cfg.shift - ki * cfg.block_k - (cfg.block_k - 1)
    hi = qi * cfg.block_q + cfg.block_q - 1 + cfg.shift - ki * cfg.block_k
    return jnp.logical_and(lo < cfg.width, hi >= 0)


def _mix_weight(mix, cfg: _Config, src: int, dst: int):
    """Scalar weight (src -> dst) of this program's head group.

    mix = (flat [H / G * G * G] SMEM ref, offset of this program's group)."""
    ref, base = mix
    return ref[base + src * cfg.group + dst]


def _mix_tiles(tiles, ref, cfg: _Config, size: int, transpose: bool = False):
    """out[dst] = sum_src w[src, dst] tiles[src] (transpose: out[src] = sum_dst w[src, dst] tiles[dst]).

    Only pairs inside the same contiguous sub-group of `size` heads carry weight."""
    out = []
    for o in range(cfg.group):
        lo = (o // size) * size
        acc = None
        for t in range(lo, lo + size):
            w = _mix_weight(ref, cfg, o, t) if transpose else _mix_weight(ref, cfg, t, o)
            acc = w * tiles[t] if acc is None else acc + w * tiles[t]
        out.append(acc)
    return out


# ----------------------------------------------------------------------------------------------------------
# Kernel bodies


def _scores(r, cfg: _Config, qi, ki):
    """Score tiles of the head group. Returns (s [G x [bq, bk]] pre-mix scores with band, z [G x ...] masked
    logits, visible [bq, bk], offset [bq, bk] = (i + shift) - j)."""
    bq, bk = cfg.block_q, cfg.block_k
    shape = (bq, bk)
    rows = lax.broadcasted_iota(jnp.int32, shape, 0) + (qi * bq + cfg.shift)
    cols = lax.broadcasted_iota(jnp.int32, shape, 1) + ki * bk
    visible = _lanes(r["qseg"][...], bk) == r["kvseg"][0:1, :]
    if cfg.causal:
        visible = jnp.logical_and(visible, cols <= rows)
    offset = rows - cols
    n_slabs = r["qp"].shape[1]
    s = []
    for t in range(cfg.group):
        acc = None
        for c in range(n_slabs):
            part = lax.dot_general(r["qp"][t, c], r["kp"][t, c], NT_DIMS, preferred_element_type=jnp.float32)
            acc = part if acc is None else acc + part
        s.append(acc)
    if cfg.width:

        def sub_band(tiles):
            out = []
            for t in range(cfg.group):
                band = r["band"][t].astype(jnp.float32)  # [bq, W]
                bias = jnp.zeros(shape, jnp.float32)
                for w in range(cfg.width):
                    bias = jnp.where(offset == w, band[:, w : w + 1], bias)
                out.append(tiles[t] - bias)
            return tuple(out)

        s = list(lax.cond(_band_hits(cfg, qi, ki), sub_band, lambda tiles: tuple(tiles), tuple(s)))
    z = _mix_tiles(s, r["pre"], cfg, cfg.pre_size) if cfg.pre_size else s
    z = [jnp.where(visible, zt, MASK_VALUE) for zt in z]
    return s, z, visible, offset


def _probs(r, z, visible, cfg: _Config):
    """Normalised P [G x [bq, bk]] from the saved lse."""
    return [
        jnp.where(visible, jnp.exp(z[t] - _lanes(r["lse"][t], cfg.block_k)), 0.0) for t in range(cfg.group)
    ]


def _post(p, r, cfg: _Config):
    return _mix_tiles(p, r["post"], cfg, cfg.post_size) if cfg.post_size else p


def _dprobs(r, p, visible, cfg: _Config):
    """dPf_c = dout_c v_c^T and dP_b = sum_c post[b, c] dPf_c. Returns (dpf, dp)."""
    v_dtype = r["v"].dtype
    dpf = [
        lax.dot_general(
            r["dout"][t].astype(v_dtype), r["v"][cfg.v_index(t)], NT_DIMS, preferred_element_type=jnp.float32
        )
        for t in range(cfg.group)
    ]
    dp = _mix_tiles(dpf, r["post"], cfg, cfg.post_size, transpose=True) if cfg.post_size else dpf
    return dpf, dp


def _grads(r, s, z, visible, cfg: _Config):
    """Backward of one tile. Returns (p, pf, dpf, dz, ds) lists over the group."""
    p = _probs(r, z, visible, cfg)
    pf = _post(p, r, cfg)
    dpf, dp = _dprobs(r, p, visible, cfg)
    dz = [p[t] * (dp[t] - _lanes(r["delta"][t], cfg.block_k)) for t in range(cfg.group)]
    ds = _mix_tiles(dz, r["pre"], cfg, cfg.pre_size, transpose=True) if cfg.pre_size else dz
    return p, pf, dpf, dz, ds


def _pairs(cfg: _Config, size: int):
    """(src, dst) head pairs within the contiguous sub-groups of `size`."""
    return [(a, b) for a in range(cfg.group) for b in range((a // size) * size, (a // size + 1) * size)]


def _fwd_online(r, cfg: _Config, qi, ki):
    """Online softmax + P V (no post_mix), or the lse alone (`out` absent)."""

    @pl.when(ki == 0)
    def _init():
        r["m"][...] = jnp.full(r["m"].shape, MASK_VALUE, jnp.float32)
        r["l"][...] = jnp.zeros(r["l"].shape, jnp.float32)
        if "acc" in r:
            r["acc"][...] = jnp.zeros(r["acc"].shape, jnp.float32)

    @pl.when(_should_run(cfg, qi, ki))
    def _run():
        _, z, visible, _ = _scores(r, cfg, qi, ki)
        for t in range(cfg.group):
            m_prev, l_prev = r["m"][t], r["l"][t]  # [bq, 128]
            m_next = jnp.maximum(m_prev, jnp.max(z[t], axis=1, keepdims=True))
            # Guard: an all-invisible tile has z == m_next == MASK_VALUE; exp(0) = 1 must not count.
            p = jnp.where(visible, jnp.exp(z[t] - _lanes(m_next, cfg.block_k)), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            r["m"][t] = m_next
            r["l"][t] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            if "acc" in r:
                v = r["v"][cfg.v_index(t)]
                pv = lax.dot_general(
                    p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
                )
                d = r["acc"].shape[-1]
                r["acc"][t] = _lanes(alpha, d) * r["acc"][t] + pv

    @pl.when(ki == cfg.num_k - 1)
    def _store():
        for t in range(cfg.group):
            total, m = r["l"][t], r["m"][t]
            empty = total == 0.0
            safe_l = jnp.where(empty, 1.0, total)
            r["lse"][t] = jnp.where(empty, 0.0, m + jnp.log(safe_l))
            if "out" in r:
                d = r["out"].shape[-1]
                r["out"][t] = r["acc"][t] * _lanes(1.0 / safe_l, d)


def _fwd_post(r, cfg: _Config, qi, ki):
    """Second forward pass with post_mix: normalised P, mixed, times V."""

    @pl.when(ki == 0)
    def _init():
        r["out"][...] = jnp.zeros(r["out"].shape, jnp.float32)

    @pl.when(_should_run(cfg, qi, ki))
    def _run():
        _, z, visible, _ = _scores(r, cfg, qi, ki)
        pf = _post(_probs(r, z, visible, cfg), r, cfg)
        for t in range(cfg.group):
            v = r["v"][cfg.v_index(t)]
            r["out"][t] += lax.dot_general(
                pf[t].astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )


def _delta_post(r, cfg: _Config, qi, ki):
    """delta_b[i] = sum_j P_b[i, j] dP_b[i, j] (post_mix only)."""

    @pl.when(ki == 0)
    def _init():
        r["delta_out"][...] = jnp.zeros(r["delta_out"].shape, jnp.float32)

    @pl.when(_should_run(cfg, qi, ki))
    def _run():
        _, z, visible, _ = _scores(r, cfg, qi, ki)
        p = _probs(r, z, visible, cfg)
        _, dp = _dprobs(r, p, visible, cfg)
        for t in range(cfg.group):
            r["delta_out"][t] += jnp.sum(p[t] * dp[t], axis=1, keepdims=True)


def _dq(r, cfg: _Config, qi, ki):
    """dqp, dband and the mixes' partial gradients, accumulated over kv tiles."""

    @pl.when(ki == 0)
    def _init():
        for name in ("dq_acc", "dband", "dpre", "dpost"):
            if name in r:
                r[name][...] = jnp.zeros(r[name].shape, r[name].dtype)

    @pl.when(_should_run(cfg, qi, ki))
    def _run():
        s, z, visible, offset = _scores(r, cfg, qi, ki)
        p, _, dpf, dz, ds = _grads(r, s, z, visible, cfg)
        n_slabs = r["qp"].shape[1]
        for t in range(cfg.group):
            ds_t = ds[t].astype(r["kp"].dtype)
            for c in range(n_slabs):
                r["dq_acc"][t, c] += lax.dot_general(
                    ds_t, r["kp"][t, c], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
                )
        if cfg.pre_size:
            for k, (a, b) in enumerate(_pairs(cfg, cfg.pre_size)):
                r["dpre"][k] += _lane_partial(s[a] * dz[b])
        if cfg.post_size:
            for k, (b, c) in enumerate(_pairs(cfg, cfg.post_size)):
                r["dpost"][k] += _lane_partial(p[b] * dpf[c])
        if cfg.width:

            @pl.when(_band_hits(cfg, qi, ki))
            def _band():
                lane = lax.broadcasted_iota(jnp.int32, (cfg.block_q, cfg.width), 1)
                for t in range(cfg.group):
                    acc = jnp.zeros((cfg.block_q, cfg.width), jnp.float32)
                    for w in range(cfg.width):
                        col = jnp.sum(jnp.where(offset == w, ds[t], 0.0), axis=1, keepdims=True)
                        acc = jnp.where(lane == w, col, acc)
                    r["dband"][t] -= acc

    @pl.when(ki == cfg.num_k - 1)
    def _store():
        r["dq"][...] = r["dq_acc"][...].astype(r["dq"].dtype)


def _dkv(r, cfg: _Config, ki, qi):
    """dkp and per-query-head dv, accumulated over q tiles."""

    @pl.when(qi == 0)
    def _init():
        r["dk_acc"][...] = jnp.zeros(r["dk_acc"].shape, jnp.float32)
        r["dv_acc"][...] = jnp.zeros(r["dv_acc"].shape, jnp.float32)

    @pl.when(_should_run(cfg, qi, ki))
    def _run():
        s, z, visible, _ = _scores(r, cfg, qi, ki)
        _, pf, _, _, ds = _grads(r, s, z, visible, cfg)
        n_slabs = r["qp"].shape[1]
        v_dtype = r["v"].dtype
        for t in range(cfg.group):
            ds_t = ds[t].astype(r["qp"].dtype)
            for c in range(n_slabs):
                r["dk_acc"][t, c] += lax.dot_general(
                    ds_t, r["qp"][t, c], TN_DIMS, preferred_element_type=jnp.float32
                )
            r["dv_acc"][t] += lax.dot_general(
                pf[t].astype(v_dtype),
                r["dout"][t].astype(v_dtype),
                TN_DIMS,
                preferred_element_type=jnp.float32,
            )

    @pl.when(qi == cfg.num_q - 1)
    def _store():
        r["dk"][...] = r["dk_acc"][...].astype(r["dk"].dtype)
        r["dv"][...] = r["dv_acc"][...]


_BODIES = {"fwd": _fwd_online, "lse": _fwd_online, "fwd_post": _fwd_post, "delta": _delta_post, "dq": _dq}


def _kernel(*refs, mode: str, cfg: _Config, names: tuple[str, ...]):
    r = dict(zip(names, refs, strict=True))
    for name in ("pre", "post"):  # program ids are read here, outside any pl.when (interpret mode needs it)
        if name in r:
            r[name] = (r[name], pl.program_id(1) * (cfg.group * cfg.group))
    if mode == "dkv":
        _dkv(r, cfg, pl.program_id(2), pl.program_id(3))
    else:
        _BODIES[mode](r, cfg, pl.program_id(2), pl.program_id(3))


# ----------------------------------------------------------------------------------------------------------
# pallas_call plumbing


def _specs(cfg: _Config, kv_major: bool):
    """Block specs by operand name; grid (B, H / G, outer, inner)."""
    G, bq, bk = cfg.group, cfg.block_q, cfg.block_k

    def tiles(qi_or_ki, inner):
        if kv_major:
            ki, qi = qi_or_ki, inner
            if cfg.causal:
                qi = jnp.maximum(qi, _first_q(cfg, ki))
        else:
            qi, ki = qi_or_ki, inner
            if cfg.causal:
                ki = jnp.minimum(ki, _last_k(cfg, qi))
        return qi, ki

    def qmap(nd):
        def index_map(b, g, o, i):
            qi = tiles(o, i)[0]
            return (b, g) + (0,) * (nd - 4) + (qi, 0)

        return index_map

    def kmap(nd):
        def index_map(b, g, o, i):
            ki = tiles(o, i)[1]
            return (b, g) + (0,) * (nd - 4) + (ki, 0)

        return index_map

    def vmap(b, g, o, i):
        return (b, lax.div(g * G, jnp.int32(cfg.kv_rep * cfg.v_heads_per_block)), tiles(o, i)[1], 0)

    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    nv = cfg.v_heads_per_block
    return {
        "qp": lambda shape: pl.BlockSpec((None, G, shape[2], bq, shape[4]), qmap(5)),
        "kp": lambda shape: pl.BlockSpec((None, G, shape[2], bk, shape[4]), kmap(5)),
        "v": lambda shape: pl.BlockSpec((None, nv, bk, shape[3]), vmap),
        "band": lambda shape: pl.BlockSpec((None, G, bq, shape[3]), qmap(4)),
        "qseg": lambda shape: pl.BlockSpec((None, bq, LANES), lambda b, g, o, i: (b, tiles(o, i)[0], 0)),
        "kvseg": lambda shape: pl.BlockSpec((None, SUBLANES, bk), lambda b, g, o, i: (b, 0, tiles(o, i)[1])),
        "pre": lambda shape: smem,
        "post": lambda shape: smem,
        "q_rows": lambda shape: pl.BlockSpec((None, G, bq, shape[3]), qmap(4)),  # lse, delta, dout, out
        "k_rows": lambda shape: pl.BlockSpec((None, G, bk, shape[3]), kmap(4)),  # dv per query head
        "k_slabs": lambda shape: pl.BlockSpec((None, G, shape[2], bk, shape[4]), kmap(5)),
        "partial": lambda shape: pl.BlockSpec(
            (None, None, None) + tuple(shape[3:]),
            (lambda b, g, o, i: (b, g, i, 0, 0, 0)) if kv_major else (lambda b, g, o, i: (b, g, o, 0, 0, 0)),
        ),
    }


# Matrix-unit FLOP per score and head in units of (C * Dk, D): QK^T recomputations, products with v / dout.
_MXU_TERMS = {"fwd": (1, 1), "lse": (1, 0), "fwd_post": (1, 1), "delta": (1, 1), "dq": (2, 1), "dkv": (2, 2)}
VMEM_LIMIT_CAP = 64 * 2**20  # below the physical VMEM of v5e / v6e (128 MiB) and v5p (95 MiB)


def _tiles_run(cfg: _Config) -> int:
    """Number of (q tile, kv tile) pairs the kernels compute (causal skipping included)."""
    if not cfg.causal:
        return cfg.num_q * cfg.num_k
    total = 0
    for qi in range(cfg.num_q):
        row = qi * cfg.block_q + cfg.block_q - 1 + cfg.shift
        total += 0 if row < 0 else min(row // cfg.block_k, cfg.num_k - 1) + 1
    return total


def _cost(mode: str, cfg: _Config, batch: int, qp_shape, dim: int, arrays) -> pl.CostEstimate:
    """FLOP / transcendental / byte estimate of one kernel for XLA's scheduler."""
    scores = batch * cfg.heads * _tiles_run(cfg) * cfg.block_q * cfg.block_k
    qk_terms, v_terms = _MXU_TERMS[mode]
    flops = 2 * scores * (qk_terms * qp_shape[2] * qp_shape[4] + v_terms * dim)
    flops += 2 * scores * (cfg.pre_size + cfg.post_size)  # head mixing on the vector unit
    nbytes = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)
    return pl.CostEstimate(flops=int(flops), transcendentals=int(scores), bytes_accessed=int(nbytes))


def _padded_bytes(shape, dtype) -> int:
    """VMEM bytes of a block: last dim padded to 128 lanes, second-last to 8 sublanes."""
    dims = [d for d in shape if d is not None] or [1]
    dims[-1] = -(-dims[-1] // LANES) * LANES
    if len(dims) > 1:
        dims[-2] = -(-dims[-2] // SUBLANES) * SUBLANES
    return math.prod(dims) * jnp.dtype(dtype).itemsize


def _vmem_limit(cfg: _Config, blocks, scratch) -> int:
    """Scoped VMEM to ask for: double-buffered blocks, scratch and ~8 live f32 score tiles per head."""
    need = sum(2 * _padded_bytes(shape, dtype) for shape, dtype in blocks)
    need += sum(_padded_bytes(shape, dtype) for shape, dtype in scratch)
    need += 8 * cfg.group * cfg.block_q * cfg.block_k * 4
    return int(min(max(need * 5 // 4, 32 * 2**20), VMEM_LIMIT_CAP))


_SPEC_KIND = {
    "lse": "q_rows",
    "delta": "q_rows",
    "dout": "q_rows",
    "out": "q_rows",
    "delta_out": "q_rows",
    "dband": "band",
    "dq": "qp",
    "dk": "k_slabs",
    "dv": "k_rows",
    "dpre": "partial",
    "dpost": "partial",
}


def _call(mode: str, cfg: _Config, inputs: dict, outputs: dict, scratch: dict):
    """Runs one kernel. inputs: name -> array (None entries dropped); outputs: name -> ShapeDtypeStruct;
    scratch: name -> (shape, dtype). Returns the outputs as a dict."""
    kv_major = mode == "dkv"
    specs = _specs(cfg, kv_major)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    in_specs = [specs[_SPEC_KIND.get(k, k)](v.shape) for k, v in inputs.items()]
    out_specs = [specs[_SPEC_KIND.get(k, k)](v.shape) for k, v in outputs.items()]
    outer, inner = (cfg.num_k, cfg.num_q) if kv_major else (cfg.num_q, cfg.num_k)
    batch = next(iter(inputs.values())).shape[0]
    grid = (batch, cfg.heads // cfg.group, outer, inner)
    names = tuple(inputs) + tuple(outputs) + tuple(scratch)
    kernel = functools.partial(_kernel, mode=mode, cfg=cfg, names=names)
    arrays = [*inputs.values(), *outputs.values()]
    blocks = [
        (spec.block_shape, a.dtype)
        for spec, a in zip(in_specs + out_specs, arrays, strict=True)
        if spec.block_shape
    ]
    dim = inputs["v"].shape[-1] if "v" in inputs else 0
    results = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM(shape, dtype) for shape, dtype in scratch.values()],
        ),
        out_shape=list(outputs.values()),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=_vmem_limit(cfg, blocks, scratch.values()),
        ),
        cost_estimate=_cost(mode, cfg, batch, inputs["qp"].shape, dim, arrays),
        interpret=cfg.interpret,
        name=f"mta_core_{mode}",
    )(*inputs.values())
    return dict(zip(outputs, results, strict=True))


# ----------------------------------------------------------------------------------------------------------
# Forward / backward


def _lane_rows(x: jax.Array) -> jax.Array:
    """[B, H, T] -> [B, H, T, 128] lane-broadcast."""
    return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _base_inputs(qp, kp, v, band, qseg, kvseg, pre, post) -> dict:
    return {"qp": qp, "kp": kp, "v": v, "band": band, "qseg": qseg, "kvseg": kvseg, "pre": pre, "post": post}


def _forward(cfg: _Config, qp, kp, v, band, qseg, kvseg, pre, post):
    """Returns out [B, H, T, D] float32 and lse [B, H, T, 128]."""
    batch, heads, _, q_len, _ = qp.shape
    dim = v.shape[-1]
    rows = (cfg.group, cfg.block_q)
    f32 = jnp.float32
    inputs = _base_inputs(qp, kp, v, band, qseg, kvseg, pre, post)
    out_sds = jax.ShapeDtypeStruct((batch, heads, q_len, dim), f32)
    lse_sds = jax.ShapeDtypeStruct((batch, heads, q_len, LANES), f32)
    stats = {"m": ((*rows, LANES), f32), "l": ((*rows, LANES), f32)}
    if not cfg.post_size:
        res = _call(
            "fwd", cfg, inputs, {"out": out_sds, "lse": lse_sds}, {**stats, "acc": ((*rows, dim), f32)}
        )
        return res["out"], res["lse"]
    lse = _call("lse", cfg, {**inputs, "v": None}, {"lse": lse_sds}, stats)["lse"]
    out = _call("fwd_post", cfg, {**inputs, "lse": lse}, {"out": out_sds}, {})["out"]
    return out, lse


def _backward(cfg: _Config, res, dout):
    """Cotangents of (qp, kp, v, band, qseg, kvseg, pre, post) given dout [B, H, T, D]."""
    qp, kp, v, band, qseg, kvseg, pre, post, out, lse = res
    batch, heads, n_slabs, _, dk = qp.shape
    kv_len, dim = kp.shape[3], v.shape[-1]
    G, f32 = cfg.group, jnp.float32
    inputs = _base_inputs(qp, kp, v, band, qseg, kvseg, pre, post)
    if cfg.post_size:
        delta_sds = jax.ShapeDtypeStruct(lse.shape, f32)
        delta = _call("delta", cfg, {**inputs, "lse": lse, "dout": dout}, {"delta_out": delta_sds}, {})
        delta = delta["delta_out"]
    else:
        delta = _lane_rows(jnp.sum(dout * out, axis=-1))
    inputs = {**inputs, "lse": lse, "delta": delta, "dout": dout}

    lanes = min(cfg.block_k, LANES)
    pair_lists = {"dpre": _pairs(cfg, cfg.pre_size or 1), "dpost": _pairs(cfg, cfg.post_size or 1)}
    outs = {"dq": jax.ShapeDtypeStruct(qp.shape, qp.dtype)}
    if band is not None:
        outs["dband"] = jax.ShapeDtypeStruct(band.shape, f32)
    for name, size in (("dpre", cfg.pre_size), ("dpost", cfg.post_size)):
        if size:
            shape = (batch, heads // G, cfg.num_q, len(pair_lists[name]), 1, lanes)
            outs[name] = jax.ShapeDtypeStruct(shape, f32)
    dq_res = _call("dq", cfg, inputs, outs, {"dq_acc": ((G, n_slabs, cfg.block_q, dk), f32)})

    dkv_outs = {
        "dk": jax.ShapeDtypeStruct(kp.shape, kp.dtype),
        "dv": jax.ShapeDtypeStruct((batch, heads, kv_len, dim), f32),
    }
    scratch = {"dk_acc": ((G, n_slabs, cfg.block_k, dk), f32), "dv_acc": ((G, cfg.block_k, dim), f32)}
    dkv_res = _call("dkv", cfg, inputs, dkv_outs, scratch)
    dv = dkv_res["dv"].reshape(batch, v.shape[1], heads // v.shape[1], kv_len, dim).sum(axis=2)

    def mix_grad(name, mix):
        if mix is None:
            return None
        sums = jnp.sum(dq_res[name], axis=(0, 2, 4, 5))  # [H / G, pairs]
        flat = jnp.array([a * G + b for a, b in pair_lists[name]])
        return jnp.zeros((heads // G, G * G), f32).at[:, flat].set(sums).reshape(mix.shape)

    dband = dq_res.get("dband")
    return (
        dq_res["dq"],
        dkv_res["dk"],
        dv.astype(v.dtype),
        dband,
        None,
        None,
        mix_grad("dpre", pre),
        mix_grad("dpost", post),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: _Config, qp, kp, v, band, qseg, kvseg, pre, post):
    return _forward(cfg, qp, kp, v, band, qseg, kvseg, pre, post)[0]


def _core_fwd(cfg: _Config, qp, kp, v, band, qseg, kvseg, pre, post):
    out, lse = _forward(cfg, qp, kp, v, band, qseg, kvseg, pre, post)
    return out, (qp, kp, v, band, qseg, kvseg, pre, post, out, lse)


_core.defvjp(_core_fwd, _backward)


# ----------------------------------------------------------------------------------------------------------
# Public API


def _check_block(name: str, block: int, length_name: str, length: int) -> None:
    if block <= 0 or length % block != 0:
        raise ValueError(f"{name}={block} must divide {length_name}={length} (pad the sequence)")
    if block % LANES != 0 and block != length:
        raise ValueError(f"{name}={block} must be a multiple of {LANES} or equal to {length_name}={length}")
    if block % SUBLANES != 0:
        raise ValueError(f"{name}={block} must be a multiple of {SUBLANES}")


def _block_diagonal(mix: jax.Array, group: int) -> jax.Array:
    """mix [H / c, c, c] -> flat [H / G * G * G] block-diagonal G x G matrices (c divides G)."""
    size = mix.shape[-1]
    n = group // size
    grouped = mix.astype(jnp.float32).reshape(-1, n, size, size)
    full = jnp.einsum("gkxy,kl->gkxly", grouped, jnp.eye(n, dtype=jnp.float32))
    return full.reshape(-1)


def mta_core_tpu(
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
    block_q: int = 256,
    block_k: int = 256,
    interpret: bool = False,
) -> jax.Array:
    """The MTA core op (kernels/core_reference.py) as Pallas TPU kernels. Returns out [B, H, T, D] float32.

    qp [B, H, C, T, Dk], kp [B, H, C, S, Dk], v [B, Hkv, S, D], band [B, H, T, W] or None, segment ids
    [B, T] / [B, S] int32, pre_mix / post_mix [H / c, c, c] (in, out) or None. Differentiable in qp, kp, v,
    band, pre_mix and post_mix. Blocks are clipped to T / S; they must divide them (the caller pads).

    Default blocks 256 x 256 (not 512): a program keeps the f32 score tiles of a whole head group live
    (G up to 4; s, z, P, dP, dz, ds in the backward: ~8 MiB at 256) next to double-buffered C-slab qp / kp
    blocks and the dq / dk accumulators. At G = 4, C = 6, D = 128 the backward kernels need ~26 MiB of VMEM
    (vmem_limit_bytes is raised to fit); 512 x 512 would need ~60 MiB, with no slack under v5p's 95 MiB.
    256 still fills the 128 x 128 (v5e) and 256 x 256 (v6e) matrix units, and the kv stream per q tile has
    ~block_q = 256 FLOP/byte, about v5e's 240 FLOP/byte ridge point.
    """
    batch, heads, n_slabs, q_len, _ = qp.shape
    kv_len = kp.shape[3]
    kv_heads = v.shape[1]
    block_q, block_k = min(block_q, q_len), min(block_k, kv_len)
    _check_block("block_q", block_q, "T", q_len)
    _check_block("block_k", block_k, "S", kv_len)
    if heads % kv_heads != 0:
        raise ValueError(f"kv heads={kv_heads} must divide heads={heads}")
    width = 0
    if band is not None:
        width = band.shape[-1]
        if width > block_k:
            raise ValueError(f"band width W={width} must be <= block_k={block_k}")
        band = band.astype(jnp.float32)
    sizes = [m.shape[-1] for m in (pre_mix, post_mix) if m is not None]
    group = max(sizes, default=1)
    if any(group % s for s in sizes):
        raise ValueError(f"mixing group sizes {sizes}: the larger must be a multiple of the smaller")
    if heads % group != 0:
        raise ValueError(f"mixing group size {group} must divide heads={heads}")
    rep = heads // kv_heads
    if rep % group == 0:
        v_block = 1
    elif group % rep == 0:
        v_block = group // rep
    else:  # a group straddles kv heads unevenly: give every query head its own copy of v
        v, rep, v_block = jnp.repeat(v, rep, axis=1), 1, group
    cfg = _Config(
        causal=causal,
        block_q=block_q,
        block_k=block_k,
        q_len=q_len,
        kv_len=kv_len,
        heads=heads,
        group=group,
        pre_size=0 if pre_mix is None else pre_mix.shape[-1],
        post_size=0 if post_mix is None else post_mix.shape[-1],
        kv_rep=rep,
        v_heads_per_block=v_block,
        width=width,
        interpret=interpret,
    )
    qseg = jnp.broadcast_to(q_segment_ids.astype(jnp.int32)[:, :, None], (batch, q_len, LANES))
    kvseg = jnp.broadcast_to(kv_segment_ids.astype(jnp.int32)[:, None, :], (batch, SUBLANES, kv_len))
    pre = None if pre_mix is None else _block_diagonal(pre_mix, group)
    post = None if post_mix is None else _block_diagonal(post_mix, group)
    return _core(cfg, qp, kp, v, band, qseg, kvseg, pre, post)
