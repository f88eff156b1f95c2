"""implementation="pallas" end to end (glue + kernels, interpreted on CPU) against the reference path."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ops import pallas_attention_core, unsupported_option
from mta_jax import attention
from mta_jax.config import MTAConfig
from tests.helpers import random_mta_params, random_qkv, random_segment_ids

# Pre-softmax conv with mixing in groups of 2 before and 4 after the softmax.
MIXED = MTAConfig(pre_conv=(3, 5), pre_head_mix=2, post_head_mix=4)


def _compare(rng, cfg, kernel, q_len, kv_len, num_kv_heads, packed, blocks, batch=1):
    q, k, v = random_qkv(rng, batch, q_len, 4, num_kv_heads, 16, kv_len=kv_len)
    params = random_mta_params(cfg, 4, 16, rng)
    ids = random_segment_ids(rng, batch, q_len) if packed else None
    dropout_rng = jax.random.key(int(rng.integers(2**31))) if cfg.dropout_rate else None

    def run(core, **options):
        def f(q, k, v, params):
            return core(
                q, k, v, params, cfg, q_segment_ids=ids, kv_segment_ids=ids, dropout_rng=dropout_rng,
                **options,
            )  # fmt: skip

        return jax.vjp(jax.jit(f), q, k, v, params)

    want, want_vjp = run(attention.reference_attention_core)
    got, got_vjp = run(pallas_attention_core, kernel=kernel, block_q=blocks, block_k=blocks)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    cotangent = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    for g, w in zip(jax.tree.leaves(got_vjp(cotangent)), jax.tree.leaves(want_vjp(cotangent)), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-4 * float(jnp.abs(w).max()))


def test_triton_kernel_packed_gqa(rng):
    """Lengths that are not whole tiles (the glue pads at the front) and packed documents."""
    _compare(rng, MIXED, "triton", 40, 40, 2, packed=True, blocks=16)


def test_triton_kernel_kv_longer_left_padding(rng):
    cfg = MTAConfig(pre_conv=(2, 4), pad_key="left", post_head_mix=2)
    _compare(rng, cfg, "triton", 20, 36, 4, packed=False, blocks=16)


def test_tpu_kernel_packed_gqa(rng):
    _compare(rng, MIXED, "tpu", 40, 40, 2, packed=True, blocks=None)


def test_tpu_kernel_post_conv_full_layer(rng):
    """The paper's whole layer (pre and post conv, mixing on both sides, dropout) with lengths that are not
    whole tiles, packed documents and GQA: the TPU kernels with the post-softmax conv."""
    cfg = MTAConfig(
        pre_conv=(3, 5), post_conv=(2, 3), pre_head_mix=4, post_head_mix=4, dropout_rate=0.2, pad_key="both"
    )
    _compare(rng, cfg, "tpu", 40, 40, 2, packed=True, blocks=None, batch=2)


def test_post_conv_on_cpu_runs_the_tpu_kernels_interpreted(rng):
    cfg = MTAConfig(post_conv=(2, 3), pad_key="left")
    _compare(rng, cfg, None, 24, 40, 4, packed=False, blocks=None)


def test_post_conv_with_the_triton_kernels_is_refused(rng):
    cfg = MTAConfig(post_conv=(2, 3))
    q, k, v = random_qkv(rng, 1, 16, 2, 2, 16)
    params = random_mta_params(cfg, 2, 16, rng)
    with pytest.raises(ValueError, match=re.escape("post_conv=(2, 3) with the Triton kernels")):
        pallas_attention_core(
            q, k, v, params, cfg, q_segment_ids=None, kv_segment_ids=None, dropout_rng=None, kernel="triton"
        )


# Dropout in the kernels draws the reference path's mask: same batch rows, heads and (unpadded) positions.
DROPPED = MTAConfig(pre_conv=(3, 5), pre_head_mix=2, post_head_mix=4, dropout_rate=0.3)


def test_triton_kernel_dropout_is_the_reference_mask(rng):
    _compare(rng, DROPPED, "triton", 40, 40, 2, packed=True, blocks=16, batch=2)


def test_tpu_kernel_dropout_is_the_reference_mask(rng):
    cfg = MTAConfig(pre_conv=(2, 3), dropout_rate=0.2)  # the online-softmax forward
    _compare(rng, cfg, "tpu", 40, 72, 2, packed=False, blocks=None, batch=2)


SHARDED_DROPOUT = """
import jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
from flax.core import spmd
from mta_jax import attention
from mta_jax.config import MTAConfig
from tests.helpers import random_mta_params, random_qkv

rng = np.random.default_rng({seed})
cfg = MTAConfig(pre_conv=(2, 3), post_head_mix=2, dropout_rate=0.3)
q, k, v = random_qkv(rng, 4, 24, 2, 2, 16)
params = random_mta_params(cfg, 2, 16, rng)
key = jax.random.key(3)
def run(impl):
    return jax.jit(lambda q, k, v: attention.multi_token_attention(
        q, k, v, params, cfg, implementation=impl, deterministic=False, dropout_rng=key,
        block_q=16, block_k=16,
    ))(q, k, v)
want = run("reference")
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
q, k, v = (jax.device_put(x, rows) for x in (q, k, v))
with jax.set_mesh(mesh), spmd.logical_axis_rules([("batch", "data")]):
    got = run("pallas")
np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
print("ok")
"""


def test_dropout_mask_under_a_sharded_batch(seed):
    """Under a 2-device mesh each device's batch rows draw the mask of their global index."""
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_DROPOUT.format(seed=seed)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_through_multi_token_attention(rng):
    """The public function: per-head output stage on top, same signature as every path."""
    cfg = MTAConfig(pre_conv=(2, 3), group_norm=True, gate="scalar")
    q, k, v = random_qkv(rng, 2, 24, 2, 2, 16)
    params = random_mta_params(cfg, 2, 16, rng)
    outs = {
        impl: attention.multi_token_attention(
            q, k, v, params, cfg, implementation=impl, block_q=16, block_k=16
        )
        for impl in ("reference", "pallas")
    }
    np.testing.assert_allclose(outs["pallas"], outs["reference"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cfg, option",
    [
        (MTAConfig(pre_head_mix=24), "pre_head_mix=24 (head mixing in groups of more than 16)"),
        (MTAConfig(post_head_mix=24), "post_head_mix=24"),
        (MTAConfig(pre_head_mix=2, post_head_mix=3), "pre_head_mix=2 with post_head_mix=3"),
    ],
)
def test_unsupported_option_is_named(rng, cfg, option):
    num_heads = 24
    q, k, v = random_qkv(rng, 1, 16, num_heads, num_heads, 16)
    params = random_mta_params(cfg, num_heads, 16, rng)
    with pytest.raises(ValueError, match='"pallas" does not support ' + re.escape(option)):
        attention.multi_token_attention(
            q, k, v, params, cfg, implementation="pallas", deterministic=False, dropout_rng=jax.random.key(0)
        )


def test_auto_on_accelerators(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_announced", set())
    paper_full = MTAConfig(pre_conv=(6, 11), post_conv=(6, 11), pre_head_mix=16, post_head_mix=16)
    paper_mix = MTAConfig(pre_head_mix=16, post_head_mix=16, group_norm=True, gate="scalar", dropout_rate=0.1)
    with caplog.at_level(logging.INFO, logger="mta_jax"):
        assert attention.choose_implementation(MIXED, 512, 512, backend="gpu") == "pallas"
        assert attention.choose_implementation(MIXED, 512, 512, backend="tpu") == "pallas"
        assert attention.choose_implementation(paper_full, 512, 512, backend="gpu") == "blockwise"
        assert attention.choose_implementation(paper_mix, 512, 512, backend="tpu") == "pallas"
        assert attention.choose_implementation(paper_mix, 512, 512, backend="gpu") == "blockwise"
    messages = [r.getMessage() for r in caplog.records]
    assert "lack post_conv=(6, 11) on gpu" in messages[2]
    assert "lack pre_head_mix=16 on gpu (head mixing in groups of more than 4)" in messages[3]
    assert unsupported_option(MIXED) is None


def _export(kernel, platform, head_dim):
    """jax.export of forward + backward at the default tiles: the paper's kq-conv layer, mixing in 4s."""
    cfg = MTAConfig(pre_conv=(6, 11), pre_head_mix=4, post_head_mix=4)
    shape = jax.ShapeDtypeStruct((1, 1024, 16, head_dim), jnp.bfloat16)
    params = jax.eval_shape(lambda: random_mta_params(cfg, 16, head_dim, np.random.default_rng(0)))
    ids = jax.ShapeDtypeStruct((1, 1024), jnp.int32)

    def loss(q, k, v, params, ids):
        out = pallas_attention_core(
            q, k, v, params, cfg, q_segment_ids=ids, kv_segment_ids=ids, dropout_rng=None,
            kernel=kernel, interpret=False,
        )  # fmt: skip
        return jnp.sum(out)

    checks = (
        [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if kernel == "triton" else []
    )
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return jax.export.export(grad, platforms=[platform], disabled_checks=checks)(
        shape, shape, shape, params, ids
    )


@pytest.mark.parametrize(
    "kernel, platform, call", [("triton", "cuda", "triton"), ("tpu", "tpu", "tpu_custom_call")]
)
def test_full_path_lowers_for_accelerators(kernel, platform, call):
    exported = _export(kernel, platform, 128)
    assert call in exported.mlir_module()


def test_auto_per_layer_of_the_paper_880m_model():
    """What "auto" runs in each layer of configs/models/880M_mta.yaml in training (dropout off, as
    configured): on TPU the fused kernels in every layer, the post-softmax conv's included; on GPU
    blockwise (groups of 16 heads do not fit the Triton kernels, which lack the post-softmax conv)."""
    from mta_jax.config import load_model_config
    from train.aot_step import attention_paths

    model = load_model_config(Path(__file__).parents[1] / "configs" / "models" / "880M_mta.yaml")
    assert attention_paths(model, 2048, "tpu") == {"pallas": list(range(24))}
    assert attention_paths(model, 2048, "gpu") == {"blockwise": list(range(24))}
