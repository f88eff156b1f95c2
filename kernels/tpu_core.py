"""The fused MTA core op as Pallas TPU (Mosaic) kernels: entry point and custom VJP.

Computes exactly kernels/core_reference.py's `core_reference` (its `out`), flash-attention style. The
forward kernels are in tpu_fwd.py, the backward ones in tpu_bwd.py, what they share in tpu_common.py
and the tile sizes that fit each TPU generation's VMEM in tpu_tiles.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels.tpu_bwd import backward
from kernels.tpu_common import LANES, SUBLANES, Config
from kernels.tpu_fwd import forward
from kernels.tpu_post_conv import forward_post_conv
from kernels.tpu_post_conv_bwd import backward_post_conv
from kernels.tpu_tiles import TpuBlockSizes, TpuTiles
from mta_jax.params import key_padding


@dataclasses.dataclass(frozen=True)
class _Launch:
    """The static configs of the forward, dQ (and delta) and dK/dV kernels of one call."""

    fwd: Config
    dq: Config
    dkv: Config


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(launch: _Launch, qp, kp, v, band, qseg, kvseg, pre, post, seeds):
    return forward(launch.fwd, qp, kp, v, band, qseg, kvseg, pre, post, seeds)[0]


def _core_fwd(launch: _Launch, qp, kp, v, band, qseg, kvseg, pre, post, seeds):
    out, lse = forward(launch.fwd, qp, kp, v, band, qseg, kvseg, pre, post, seeds)
    return out, (qp, kp, v, band, qseg, kvseg, pre, post, seeds, out, lse)


def _core_bwd(launch: _Launch, res, dout):
    return backward(launch.dq, launch.dkv, res, dout)


_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core_post_conv(launch: _Launch, qp, kp, v, band, qseg, kvseg, pre, post, seeds, postw):
    return forward_post_conv(launch.fwd, qp, kp, v, band, qseg, kvseg, pre, post, seeds, postw)[0]


def _core_post_conv_fwd(launch: _Launch, qp, kp, v, band, qseg, kvseg, pre, post, seeds, postw):
    out, lse = forward_post_conv(launch.fwd, qp, kp, v, band, qseg, kvseg, pre, post, seeds, postw)
    return out, (qp, kp, v, band, qseg, kvseg, pre, post, seeds, postw, lse)


def _core_post_conv_bwd(launch: _Launch, res, dout):
    return backward_post_conv(launch.dq, launch.dkv, res, dout)


_core_post_conv.defvjp(_core_post_conv_fwd, _core_post_conv_bwd)


def _check_blocks(tiles: TpuTiles, q_len: int, kv_len: int) -> TpuTiles:
    """tiles clipped to T / S, checked: they must divide them, block_k a multiple of 128 unless S itself."""
    block_q, block_k = min(tiles.block_q, q_len), min(tiles.block_k, kv_len)
    for name, block, length_name, length in (
        ("block_q", block_q, "T", q_len),
        ("block_k", block_k, "S", kv_len),
    ):
        if block <= 0 or length % block != 0:
            raise ValueError(f"{name}={block} must divide {length_name}={length} (pad the sequence)")
        if block % SUBLANES != 0:
            raise ValueError(f"{name}={block} must be a multiple of {SUBLANES}")
    if block_k % LANES != 0 and block_k != kv_len:
        raise ValueError(f"block_k={block_k} must be a multiple of {LANES} or equal to S={kv_len}")
    return TpuTiles(block_q, block_k)


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
    block_sizes: TpuBlockSizes | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    vmem_bytes: int = 16 * 2**20,
    dropout_seeds: jax.Array | None = None,
    dropout_rate: float = 0.0,
    q_offset: int = 0,
    kv_offset: int = 0,
    post_conv: jax.Array | None = None,
    pad_key: str = "both",
    interpret: bool = False,
) -> jax.Array:
    """The MTA core op (kernels/core_reference.py) as Pallas TPU kernels. Returns out [B, H, T, D] float32.

    qp [B, H, C, T, Dk], kp [B, H, C, S, Dk], v [B, Hkv, S, D], band [B, H, T, W] or None, segment ids
    [B, T] / [B, S] int32, pre_mix / post_mix [H / c, c, c] (in, out) or None. Differentiable in qp, kp, v,
    band, pre_mix and post_mix. block_sizes: tiles of each kernel (default 256 x 256; tpu_tiles.py
    chooses per chip), block_q / block_k override them in every kernel; blocks are clipped to T / S and
    must divide them (the caller pads). vmem_bytes: the chip's VMEM, which caps vmem_limit_bytes.
    dropout_seeds [B, H] (mta_jax.dropout.head_seeds, int32 or uint32) with dropout_rate > 0: attention
    dropout with mta_jax/dropout.py's mask at query position row - q_offset, key position col - kv_offset.
    post_conv [H, c_q, c_k] (keys padded by pad_key): the post-softmax conv (tpu_post_conv.py,
    tpu_post_conv_bwd.py), differentiable too; block_q must then be a multiple of Config.halo.
    """
    batch, heads, n_slabs, q_len, _ = qp.shape
    kv_len = kp.shape[3]
    kv_heads = v.shape[1]
    blocks = (block_sizes or TpuBlockSizes()).with_blocks(block_q, block_k)
    if heads % kv_heads != 0:
        raise ValueError(f"kv heads={kv_heads} must divide heads={heads}")
    width = 0
    if band is not None:
        width = band.shape[-1]
        smallest = min(min(t.block_k, kv_len) for t in (blocks.fwd, blocks.dq, blocks.dkv))
        if width > smallest:
            raise ValueError(f"band width W={width} must be <= block_k={smallest}")
        band = band.astype(jnp.float32)
    sizes = [m.shape[-1] for m in (pre_mix, post_mix) if m is not None]
    group = max(sizes, default=1)
    if any(group % s for s in sizes):
        raise ValueError(f"mixing group sizes {sizes}: the larger must be a multiple of the smaller")
    if heads % group != 0:
        raise ValueError(f"mixing group size {group} must divide heads={heads}")
    if dropout_rate and (dropout_seeds is None or dropout_seeds.shape != (batch, heads)):
        shape = None if dropout_seeds is None else dropout_seeds.shape
        raise ValueError(
            f"dropout_rate={dropout_rate} needs dropout_seeds of shape {(batch, heads)}, got {shape}"
        )
    conv = {}
    if post_conv is not None:
        if post_conv.shape[0] != heads or post_conv.ndim != 3:
            raise ValueError(f"post_conv of shape {post_conv.shape} must be [H={heads}, c_q, c_k]")
        c_q, c_k = post_conv.shape[1:]
        conv = dict(conv_q=c_q, conv_k=c_k, conv_left=key_padding(c_k, pad_key)[0])
    rep = heads // kv_heads
    if rep % group == 0:
        v_block = 1
    elif group % rep == 0:
        v_block = group // rep
    else:  # a group straddles kv heads unevenly: give every query head its own copy of v
        v, rep, v_block = jnp.repeat(v, rep, axis=1), 1, group

    def config(tiles: TpuTiles) -> Config:
        tiles = _check_blocks(tiles, q_len, kv_len)
        return Config(
            causal=causal,
            block_q=tiles.block_q,
            block_k=tiles.block_k,
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
            vmem_bytes=vmem_bytes,
            dropout_rate=float(dropout_rate),
            q_offset=q_offset,
            kv_offset=kv_offset,
            **conv,
        )

    launch = _Launch(config(blocks.fwd), config(blocks.dq), config(blocks.dkv))
    qseg = jnp.broadcast_to(q_segment_ids.astype(jnp.int32)[:, :, None], (batch, q_len, LANES))
    kvseg = jnp.broadcast_to(kv_segment_ids.astype(jnp.int32)[:, None, :], (batch, SUBLANES, kv_len))
    pre = None if pre_mix is None else _block_diagonal(pre_mix, group)
    post = None if post_mix is None else _block_diagonal(post_mix, group)
    seeds = None
    if dropout_rate:
        seeds = jax.lax.bitcast_convert_type(dropout_seeds, jnp.int32).reshape(-1)  # SMEM, flat
    if post_conv is not None:
        for tiles in (launch.fwd, launch.dq, launch.dkv):
            if tiles.halo and (tiles.block_q % tiles.halo or tiles.halo > tiles.block_q):
                raise ValueError(
                    f"block_q={tiles.block_q} must be a multiple of {tiles.halo} (the post conv's rows above)"
                )
            if max(post_conv.shape[2] - 1, 1) > tiles.block_k:
                raise ValueError(
                    f"post_conv c_k={post_conv.shape[2]} needs block_k >= c_k - 1, got {tiles.block_k}"
                )
        postw = post_conv.astype(jnp.float32).reshape(-1)
        return _core_post_conv(launch, qp, kp, v, band, qseg, kvseg, pre, post, seeds, postw)
    return _core(launch, qp, kp, v, band, qseg, kvseg, pre, post, seeds)
