"""The fused MTA core op on the GPU (Triton backend): entry point and custom VJP.

Computes exactly `kernels.core_reference.core_reference` (see its docstring) without materialising [T, S].
The forward kernel is in triton_fwd.py, the dQ and dK/dV kernels in triton_bwd.py, what they share in
triton_common.py and the tile sizes that fit a GPU in triton_tiles.py.

G is the larger of the two mixes' group sizes (1 without mixes); a smaller mix is widened to a
block-diagonal [H / G, G, G] matrix in XLA, so that autodiff maps the gradient back. The saved residual
is the base-2 log-sum-exp per row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels import triton_common as tc
from kernels.triton_bwd import backward_dkv, backward_dq
from kernels.triton_common import KernelTiles, TritonBlockSizes
from kernels.triton_fwd import forward


@dataclasses.dataclass(frozen=True)
class _Launch:
    """The static configs of the three kernels of one call."""

    fwd: tc.Cfg
    dq: tc.Cfg
    dkv: tc.Cfg


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
    block_sizes: TritonBlockSizes | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    dropout_seeds: jax.Array | None = None,
    dropout_rate: float = 0.0,
    q_offset: int = 0,
    kv_offset: int = 0,
    interpret: bool = False,
) -> jax.Array:
    """The core op on the GPU: qp [B,H,C,T,Dk], kp [B,H,C,S,Dk], v [B,Hkv,S,D] -> out [B,H,T,D] float32.

    Differentiable in qp, kp, v, band, pre_mix and post_mix. block_sizes: tiles of each kernel (default
    64 x 64, 4 warps, 2 stages; kernels/triton_tiles.py chooses per GPU); block_q / block_k override
    them in every kernel. T, S must be multiples of the blocks, Dk and D multiples of 16 and W <= block_k;
    the caller pads. dropout_seeds [B, H] (mta_jax.dropout.head_seeds, int32 or uint32) with
    dropout_rate > 0: attention dropout with mta_jax/dropout.py's mask at query position row - q_offset,
    key position col - kv_offset.
    """
    blocks = (block_sizes or TritonBlockSizes()).with_blocks(block_q, block_k)
    width, group = tc.validate(qp, kp, v, band, pre_mix, post_mix, blocks)
    seeds = None
    if dropout_rate:
        if dropout_seeds is None or dropout_seeds.shape != qp.shape[:2]:
            shape = None if dropout_seeds is None else dropout_seeds.shape
            raise ValueError(
                f"dropout_rate={dropout_rate} needs dropout_seeds of shape {qp.shape[:2]}, got {shape}"
            )
        seeds = jax.lax.bitcast_convert_type(dropout_seeds, jnp.int32)

    def cfg(tiles: KernelTiles) -> tc.Cfg:
        return tc.Cfg(
            causal=bool(causal),
            tiles=tiles,
            q_len=qp.shape[3],
            kv_len=kp.shape[3],
            width=width,
            slabs=qp.shape[2],
            group=group,
            has_pre=pre_mix is not None,
            has_post=post_mix is not None,
            rep=qp.shape[1] // v.shape[1],
            interpret=interpret,
            dropout_rate=float(dropout_rate),
            q_offset=q_offset,
            kv_offset=kv_offset,
        )

    launch = _Launch(cfg(blocks.fwd), cfg(blocks.dq), cfg(blocks.dkv))
    band = None if band is None else band.astype(jnp.float32)
    q_ids = q_segment_ids.astype(jnp.int32)
    kv_ids = kv_segment_ids.astype(jnp.int32)
    pre, post = tc.widen_mix(pre_mix, group), tc.widen_mix(post_mix, group)
    return _core(launch, qp, kp, v, band, q_ids, kv_ids, pre, post, seeds)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(launch: _Launch, qp, kp, v, band, q_ids, kv_ids, pre, post, seeds):
    return forward(launch.fwd, qp, kp, v, band, q_ids, kv_ids, pre, post, seeds)[0]


def _core_fwd(launch: _Launch, qp, kp, v, band, q_ids, kv_ids, pre, post, seeds):
    out, lse2 = forward(launch.fwd, qp, kp, v, band, q_ids, kv_ids, pre, post, seeds)
    return out, (qp, kp, v, band, q_ids, kv_ids, pre, post, seeds, out, lse2)


def _core_bwd(launch: _Launch, res, dout):
    qp, kp, v, band, q_ids, kv_ids, pre, post, seeds, out, lse2 = res
    dout = dout.astype(jnp.float32)
    dqp, dband, dpre, dpost, delta = backward_dq(
        launch.dq, qp, kp, v, band, q_ids, kv_ids, pre, post, seeds, dout, lse2, out
    )
    dkp, dv = backward_dkv(launch.dkv, qp, kp, v, band, q_ids, kv_ids, pre, post, seeds, dout, lse2, delta)
    return dqp, dkp, dv, dband, None, None, dpre, dpost, None


_core.defvjp(_core_fwd, _core_bwd)
