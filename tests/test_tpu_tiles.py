"""The TPU tile chooser (kernels/tpu_tiles.py) and what it tells implementation="auto": the largest
tiles whose VMEM estimate fits each chip, and a named refusal where even the smallest do not.
libtpu's verdicts on these choices are tests/test_compile_targets.py's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import pytest

from bench.attention import layer_config
from kernels import ops, tpu_tiles
from kernels.chips import get_chip
from mta_jax import attention
from mta_jax.config import load_model_config
from train.aot_step import attention_paths

TPUS = ("v4", "v5e", "v5p", "v6e")
LAYERS = ("kq_conv", "kq_conv_mix4", "head_mix", "mix_all", "kq_conv_mix_all", "full")


def _problem(layer: str, head_dim: int) -> tpu_tiles.Problem:
    return ops._tpu_problem(layer_config(layer, 16), head_dim, jnp.bfloat16)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", TPUS)
def test_each_kernel_gets_the_largest_tiles_that_fit(name, layer, head_dim):
    """Most scores a program among the tiles that fit; of equal ones the squarest, then the longer side
    where the kernel streams (block_q for fwd / dQ, block_k for dK/dV); none fitting, the smallest."""
    chip, problem = get_chip(name), _problem(layer, head_dim)
    chosen = tpu_tiles.default_block_sizes(chip, problem)
    every = [
        tpu_tiles.TpuTiles(bq, bk)
        for bq in tpu_tiles.SIZES_Q
        for bk in tpu_tiles.SIZES_K
        if bk >= problem.width
    ]
    smallest = min(every, key=lambda t: t.block_q * t.block_k)
    for kind in ("fwd", "dq", "dkv"):
        tiles = getattr(chosen, kind)
        fitting = [t for t in every if tpu_tiles.fits(kind, problem, t, chip)]
        if not fitting:
            assert tiles == smallest, (kind, tiles)
            continue
        assert tiles in fitting, (kind, tiles)
        area = max(t.block_q * t.block_k for t in fitting)
        best = [t for t in fitting if t.block_q * t.block_k == area]
        squarest = min(abs(t.block_q - t.block_k) for t in best)
        best = [t for t in best if abs(t.block_q - t.block_k) == squarest]
        side = (lambda t: t.block_k) if kind == "dkv" else (lambda t: t.block_q)
        assert tiles == max(best, key=side), (kind, tiles, best)
    over = max(tpu_tiles.vmem_bytes(k, problem, smallest) for k in ("fwd", "dq", "dkv"))
    refused = tpu_tiles.no_fit(chip, problem) is not None
    assert refused == (over > tpu_tiles.NO_FIT_RATIO * chip.vmem_bytes * 7 // 8)


def test_sixteen_heads_take_256_by_256_tiles_where_the_vmem_allows():
    """The chooser's reason to exist: 16-head mixing on a v5p (64 MiB of VMEM) at twice the tiles the
    old 2x margin allowed (128 x 128), which libtpu accepts (tests/test_compile_targets.py)."""
    blocks = tpu_tiles.default_block_sizes(get_chip("v5p"), _problem("mix_all", 128))
    assert (blocks.fwd.block_q, blocks.fwd.block_k) == (256, 256)
    assert (blocks.dq.block_q, blocks.dq.block_k) == (256, 256)
    assert blocks.dkv.block_q * blocks.dkv.block_k >= 128 * 256


def test_a_layer_no_tile_holds_is_refused_by_name():
    reason = ops.unsupported_option(
        layer_config("kq_conv_mix_all", 16),
        dtype=jnp.bfloat16,
        head_dim=128,
        platform="tpu",
        chip=get_chip("v4"),
    )
    assert reason.startswith("16 heads x 6 slabs on v4 (its dq kernel needs ")
    assert "MiB of VMEM at the smallest tiles, 32 x 128; the limit is 14 MiB)" in reason
    full = ops.unsupported_option(
        layer_config("full", 16), dtype=jnp.bfloat16, head_dim=128, platform="tpu", chip=get_chip("v4")
    )
    assert "with the post-softmax conv on v4" in full
    for name in ("v5e", "v5p", "v6e"):
        for layer in LAYERS:
            cfg = layer_config(layer, 16)
            assert ops.unsupported_option(cfg, head_dim=128, platform="tpu", chip=get_chip(name)) is None


def test_auto_runs_blockwise_where_the_chip_cannot_hold_the_layer(monkeypatch):
    monkeypatch.setattr(attention, "_announced", set())
    cfg = layer_config("kq_conv_mix_all", 16)

    def choice(chip):
        return attention.choose_implementation(
            cfg, 2048, 2048, "tpu", dtype=jnp.bfloat16, head_dim=128, chip=chip
        )

    assert choice(get_chip("v4")) == "blockwise"
    assert choice(get_chip("v5e")) == "pallas"
    assert choice(None) == "pallas"  # the chip unknown (an export for any TPU): the kernels


def test_auto_per_layer_of_the_880m_model_on_a_v4():
    """On a v4 (16 MiB of VMEM) the paper's kq-conv layers (16 heads, 6 slabs, post conv) fall back to
    blockwise; the 16-head mixing layers stay fused. In bfloat16, as configs/train/880M_mta.yaml trains."""
    model = load_model_config(Path(__file__).parents[1] / "configs" / "models" / "880M_mta.yaml")
    model = dataclasses.replace(model, dtype="bfloat16")
    conv_layers = [2, 6, 10, 14, 18, 22]
    paths = attention_paths(model, 2048, "tpu", get_chip("v4"))
    assert paths == {"pallas": [i for i in range(24) if i not in conv_layers], "blockwise": conv_layers}
    assert attention_paths(model, 2048, "tpu", get_chip("v5p")) == {"pallas": list(range(24))}
