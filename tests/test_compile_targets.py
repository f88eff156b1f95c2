"""The fused kernels accepted by the real compilers of TPU v5e and v6e (libtpu) and of an H200 (XLA's
Triton and ptxas), compiled on this CPU: at the default tiles of each chip (bench/compile_check.py) and
at the shapes and tiles of the interpreted tests (v5e, H200).

Needs the `compile` extra (skipped without it); ptxas is optional (registers and spills are checked
where it is on PATH). The full target matrix is `python -m bench.compile_check`'s job.
"""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import pytest

from bench.compile_check import Point, check_point
from kernels import aot
from kernels.chips import get_chip
from kernels.tpu_core import mta_core_tpu
from kernels.triton_core import mta_core_triton
from tests.test_tpu_core import CASES as TPU_CASES
from tests.test_triton_core import CASES as TRITON_CASES

# Head mixing (G > 1) at D = 128 leaves the GPU backward a few dozen bytes of spill stores at the
# smallest tiles (kernels/triton_tiles.py explains why); one head a program must spill nothing.
MAX_SPILL_WITH_MIXING = 1024
# Together these compile every kernel: forward, dQ, dK/dV with the band (kq_conv), the lse, post-mix and
# delta passes with head mixing (head_mix). The conv with mixing compiles for minutes: --runslow.
DEFAULT_POINTS = [
    ("kq_conv", 128),
    ("head_mix", 128),
    pytest.param("kq_conv_mix4", 64, marks=pytest.mark.slow),
]


def device_or_skip(name: str):
    try:
        return aot.compile_only_device(get_chip(name))
    except aot.CompilerUnavailable as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("layer, head_dim", DEFAULT_POINTS)
@pytest.mark.parametrize("target", ["v5e", "v6e", "h200"])
def test_default_tiles_compile_forward_and_backward(target, layer, head_dim):
    chip = get_chip(target)
    record = check_point(chip, device_or_skip(target), Point(layer, "pallas", head_dim, 1024, "fwd+bwd"))
    assert record["accepted"], record["error"]
    names = {k["name"] for k in record["kernels"]}
    assert {"mta_core_dq", "mta_core_dkv"} <= names or {"mta_core_bwd_dq", "mta_core_bwd_dkv"} <= names
    if chip.platform != "cuda":
        return
    mixing = layer != "kq_conv"
    for kernel in record["kernels"]:
        assert kernel["accepted"], kernel
        assert kernel["smem_bytes"] <= chip.smem_per_block, kernel
        assert kernel["num_stages"] >= 2, kernel
        if shutil.which("ptxas"):
            spill = kernel["ptxas"]["spill_store_bytes"]
            assert spill <= (MAX_SPILL_WITH_MIXING if mixing else 0), kernel


@pytest.mark.parametrize("target", ["v5p", "v4"])
def test_sixteen_head_mixing_compiles_at_the_default_tiles(target):
    """The tile chooser with no margin over its VMEM estimate, on the chips with the least VMEM: the
    paper's mixing layer (16 heads before and after the softmax) at 256 x 256 on a v5p, 64 x 128 on a v4."""
    chip = get_chip(target)
    record = check_point(chip, device_or_skip(target), Point("mix_all", "pallas", 128, 1024, "fwd+bwd"))
    assert record["accepted"], record["error"]
    fwd = record["tiles"]["fwd"]
    assert (fwd["block_q"], fwd["block_k"]) == {"v5p": (256, 256), "v4": (64, 128)}[target]


def test_a_v4_leaves_the_layers_it_cannot_hold_to_blockwise():
    """16 heads x 6 slabs do not fit a v4's 16 MiB of VMEM at any tile (libtpu refused the smallest,
    32 x 128, before the chooser said so): the point is skipped with the reason, not compiled."""
    record = check_point(
        get_chip("v4"), device_or_skip("v4"), Point("kq_conv_mix_all", "pallas", 128, 1024, "fwd+bwd")
    )
    assert record["accepted"] is None
    assert "16 heads x 6 slabs on v4 (its dq kernel needs" in record["skipped"]


def _abstract(device, arrays: dict) -> dict:
    return {name: None if a is None else aot.abstract(device, a.shape, a.dtype) for name, a in arrays.items()}


def _compile_core(device, core, args: list, diff: list[int], **options) -> str:
    """Forward and backward (the VJP of a cotangent) of the core op, compiled; returns the HLO text."""

    def gradients(*all_args):
        def loss(*dargs):
            full = list(all_args)
            for i, a in zip(diff, dargs, strict=True):
                full[i] = a
            return core(*full, **options).astype(jnp.float32).sum()

        return jax.grad(loss, argnums=tuple(range(len(diff))))(*[all_args[i] for i in diff])

    with aot.target_mesh(device):
        return jax.jit(gradients).trace(*args).lower().compile().as_text()


@pytest.mark.parametrize("name", ["chunked-tiles-t<s", "dropout-pre2-post4-chunked"])
def test_interpreted_triton_shapes_compile_for_h200(name):
    from tests.test_triton_core import dropout_options, make_inputs

    device = device_or_skip("h200")
    case = dict(TRITON_CASES[name])
    args = [
        None if a is None else aot.abstract(device, a.shape, a.dtype) for a in make_inputs(0, **case["kw"])
    ]
    diff = [i for i in (0, 1, 2, 3, 6, 7) if args[i] is not None]
    options = {"causal": case["causal"]}
    if case.get("dropout"):  # the in-kernel hash: int32 multiplies and logical shifts
        options.update(dropout_options(0, case["dropout"], *args[0].shape[:2]))
    if case.get("blocks"):
        options["block_sizes"] = case["blocks"]
    else:
        options.update(block_q=case.get("block_q", 16), block_k=case.get("block_k", 16))
    text = _compile_core(device, mta_core_triton, args, diff, **options)
    assert text.count("__gpu$xla.gpu.triton") >= 3


@pytest.mark.parametrize(
    "name", ["pre2_post4_gqa", "own_tiles_pre2_post4", "dropout_pre2_post4", "mix16_dropout"]
)
def test_interpreted_tpu_shapes_compile_for_v5e(name, rng):
    from tests.test_tpu_core import _inputs

    device = device_or_skip("v5e")
    inputs = _inputs(rng, **TPU_CASES[name])
    names = ("qp", "kp", "v", "band", "q_seg", "kv_seg", "pre_mix", "post_mix")
    arrays = {**inputs, "q_seg": inputs["segs"][0], "kv_seg": inputs["segs"][1]}
    abstract = _abstract(device, {n: arrays[n] for n in names})
    args = [abstract[n] for n in names]
    diff = [i for i in (0, 1, 2, 3, 6, 7) if args[i] is not None]
    blocks = inputs.get("blocks")
    options = dict(block_sizes=blocks) if blocks else dict(block_q=128, block_k=128)
    options["vmem_bytes"] = get_chip("v5e").vmem_bytes  # as kernels/ops.py passes it
    options.update(inputs["dropout"])  # the in-kernel hash: int32 multiplies and logical shifts
    text = _compile_core(device, mta_core_tpu, args, diff, causal=inputs["causal"], **options)
    assert text.count("tpu_custom_call") >= 3


def test_pallas_path_on_a_named_tpu_target_lowers_its_mosaic_kernels():
    """The paper's full layer lacks a GPU kernel (post conv), so the platform-independent staging is off;
    under a compile-only TPU's mesh the pallas path must still lower the TPU kernels, not the host's
    interpreted ones (which compile for the TPU too, but cost and measure nothing of the kernels)."""
    from bench.attention import layer_config
    from bench.compile_check import tpu_kernels
    from mta_jax.attention import multi_token_attention
    from mta_jax.params import init_mta_params

    device = device_or_skip("v5e")
    heads, head_dim, seq = 2, 128, 256
    cfg = layer_config("full", heads)
    params = jax.eval_shape(lambda: init_mta_params(cfg, heads, head_dim, jax.random.key(0)))
    params = jax.tree.map(lambda p: aot.abstract(device, p.shape, p.dtype), params)
    q = aot.abstract(device, (1, seq, heads, head_dim), jnp.bfloat16)

    def loss(q, k, v, params):
        return multi_token_attention(q, k, v, params, cfg, implementation="pallas").astype(jnp.float32).sum()

    with aot.target_mesh(device):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q, params).lower()
    names = {k["name"] for k in tpu_kernels(lowered)}
    assert {"mta_core_fwd_post_conv", "mta_core_dq_post_conv", "mta_core_dkv_post_conv"} <= names, names
    for kernel in tpu_kernels(lowered):  # the pipeline-counted bytes: at least the operands once
        assert kernel["estimate_bytes_accessed"] > 0 and kernel["estimate_flops"] > 0, kernel
