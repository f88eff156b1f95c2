"""The TPU kernels' cost estimates: the HBM bytes their pipelines DMA, against a plain loop over the grid."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import tpu_common as tc
from kernels import tpu_cost


def _config(causal: bool, q_len: int, kv_len: int, block_q: int, block_k: int) -> tc.Config:
    return tc.Config(
        causal=causal, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len, heads=4, group=2,
        pre_size=2, post_size=0, kv_rep=1, v_heads_per_block=2, width=0, interpret=True,
    )  # fmt: skip


def _loop_bytes(grid, specs, arrays) -> int:
    """One grid step at a time, Python ints: a block is fetched when its index differs from the last."""
    total = 0
    for spec, a in zip(specs, arrays, strict=True):
        itemsize = jnp.dtype(a.dtype).itemsize
        if spec.block_shape is None:
            total += math.prod(a.shape) * itemsize
            continue
        block = math.prod(d for d in spec.block_shape if d is not None) * itemsize
        last = None
        for step in itertools.product(*map(range, grid)):
            index = tuple(int(x) for x in spec.index_map(*step))
            total += block if index != last else 0
            last = index
    return total


@pytest.mark.parametrize("kv_major", [False, True])
@pytest.mark.parametrize(
    "causal, q_len, kv_len, block_q, block_k",
    [(True, 64, 64, 16, 16), (True, 32, 64, 8, 16), (False, 48, 32, 16, 8)],
)
def test_pipeline_bytes_match_a_loop_over_the_grid(kv_major, causal, q_len, kv_len, block_q, block_k):
    cfg = _config(causal, q_len, kv_len, block_q, block_k)
    batch, slabs, dk, dv = 2, 3, 16, 8
    shapes = {
        "qp": ((batch, cfg.heads, slabs, q_len, dk), jnp.bfloat16),
        "kp": ((batch, cfg.heads, slabs, kv_len, dk), jnp.bfloat16),
        "v": ((batch, cfg.heads, kv_len, dv), jnp.bfloat16),
        "qseg": ((batch, q_len, tc.LANES), jnp.int32),
        "kvseg": ((batch, tc.SUBLANES, kv_len), jnp.int32),
        "pre": ((cfg.heads * cfg.group,), jnp.float32),
        "q_rows": ((batch, cfg.heads, q_len, dv), jnp.float32),
    }
    arrays = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes.values()]
    table = tc.block_specs(cfg, kv_major)
    specs = [table[name](a.shape) for name, a in zip(shapes, arrays, strict=True)]
    outer, inner = (cfg.num_k, cfg.num_q) if kv_major else (cfg.num_q, cfg.num_k)
    grid = (batch, cfg.heads // cfg.group, outer, inner)

    counted = tpu_cost.pipeline_bytes(grid, specs, arrays)

    assert counted == _loop_bytes(grid, specs, arrays)
    once = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)
    assert counted >= once  # every block at least once
    if causal and not kv_major:  # skipped tiles above the diagonal fetch nothing: fewer than every step
        every_step = once + (math.prod(grid) - 1) * sum(
            math.prod(d for d in s.block_shape if d is not None) * jnp.dtype(a.dtype).itemsize
            for s, a in zip(specs, arrays, strict=True)
            if s.block_shape is not None
        )
        assert counted < every_step


def test_pipeline_bytes_inside_jit_are_static():
    """The count runs while a kernel is traced under jit: it must stay a Python int, not a tracer."""
    cfg = _config(True, 32, 32, 8, 8)
    spec = tc.block_specs(cfg, False)["kp"]((1, 4, 1, 32, 16))
    array = jax.ShapeDtypeStruct((1, 4, 1, 32, 16), jnp.float32)
    seen = []

    def f(x):
        seen.append(tpu_cost.pipeline_bytes((1, 2, cfg.num_q, cfg.num_k), [spec], [array]))
        return x

    jax.jit(f)(np.zeros(3))
    block = 2 * 1 * 8 * 16 * 4  # G heads x slabs x block_k x width, float32
    # Per head group, q tiles 0-3 see key tiles 0..qi; q tile 1 starts on key tile 0, still loaded from
    # q tile 0: 1 + 1 + 3 + 4 fetches.
    fetches = 2 * 9
    assert seen == [fetches * block]
