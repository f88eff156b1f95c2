"""Kernels chosen for the platform compiled for, not the host's: compiled for a TPU and a GPU from this CPU.

Needs the `compile` extra (libtpu and the CUDA plugin); skipped without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from kernels import aot
from kernels.chips import CHIPS, get_chip
from kernels.platform import Target, chip_of, traced_target
from mta_jax import attention
from mta_jax.config import MTAConfig
from mta_jax.params import init_mta_params

CFG = MTAConfig(pre_conv=(2, 3), post_head_mix=2)
SIGNS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def device_or_skip(name: str):
    try:
        return aot.compile_only_device(get_chip(name))
    except aot.CompilerUnavailable as error:
        pytest.skip(str(error))


def compiled_text(device, implementation: str, *, mesh: bool, cfg=CFG, q_len=128) -> str:
    """HLO of the gradient of the layer compiled for `device`, with the target named by a mesh or not."""
    heads, head_dim = 4, 64
    params = jax.eval_shape(lambda: init_mta_params(cfg, heads, head_dim, jax.random.key(0)))
    if mesh:
        sharding = aot.sharding(device)
    else:  # a bare device: nothing at trace time names it, so the choice is staged per platform
        sharding = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((1, q_len, heads, head_dim), jnp.bfloat16, sharding=sharding)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sharding), params)

    def loss(q, k, v, p):
        out = attention.multi_token_attention(q, k, v, p, cfg, implementation=implementation)
        return out.astype(jnp.float32).sum()

    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(x, x, x, params)
    return traced.lower().compile().as_text()


@pytest.mark.parametrize(
    "target, mesh",
    [
        pytest.param("v5e", True, id="v5e-mesh"),
        pytest.param("h200", False, id="h200-bare-device"),
        pytest.param("v5e", False, id="v5e-bare-device", marks=pytest.mark.slow),
        pytest.param("h200", True, id="h200-mesh", marks=pytest.mark.slow),
    ],
)
def test_auto_compiles_the_targets_kernel(target, mesh):
    """implementation="auto" gets that platform's fused kernel (forward and backward), never the other's."""
    device = device_or_skip(target)
    platform = get_chip(target).platform
    text = compiled_text(device, "auto", mesh=mesh)
    other = SIGNS["cuda" if platform == "tpu" else "tpu"]
    assert text.count(SIGNS[platform]) >= 3, f"no {platform} kernels in the compiled HLO"
    assert other not in text


def test_auto_falls_back_to_blockwise_per_platform():
    """The post-softmax conv is in the TPU kernels, not the GPU's: on a v5e target "auto" compiles Mosaic
    kernels for it (forward and backward), on an H200 target XLA alone."""
    cfg = MTAConfig(pre_conv=(2, 3), post_conv=(2, 3))
    assert compiled_text(device_or_skip("v5e"), "auto", mesh=True, cfg=cfg).count(SIGNS["tpu"]) >= 4
    text = compiled_text(device_or_skip("h200"), "auto", mesh=True, cfg=cfg)
    assert SIGNS["tpu"] not in text and SIGNS["cuda"] not in text


def test_traced_target_reads_the_mesh():
    device = device_or_skip("v5e")
    seen = []

    def f(x):
        seen.append(traced_target(x))
        return x * 2

    with aot.target_mesh(device):
        jax.jit(f).trace(aot.abstract(device, (8, 128), jnp.float32))
    jax.jit(f).trace(jax.ShapeDtypeStruct((8, 128), jnp.float32))
    assert seen[0] == Target("tpu", "TPU v5 lite")
    assert seen[1] is None  # a plain CPU trace names no device


@pytest.mark.parametrize("name", sorted(CHIPS))
def test_every_target_has_a_compile_only_device(name):
    """The chip table's device kinds are what the compilers report, and chip_of maps them back."""
    chip = get_chip(name)
    device = device_or_skip(name)
    assert device.device_kind == chip.device_kind
    assert chip_of(chip.platform, device.device_kind) is chip


def test_chip_of_falls_back_to_the_smallest_chip():
    assert chip_of("tpu", "TPU v9 imaginary").name == "v4"
    assert chip_of("cuda", None).name in ("h100", "h200")  # no local GPU here: the fallback
    assert chip_of("cpu", None) is None
