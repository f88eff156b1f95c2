"""Every configuration and input error is a ValueError that names the field, the value and the rule."""

import glob

import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax.attention import multi_token_attention
from mta_jax.config import ModelConfig, MTAConfig, load_model_config, model_config_from_dict
from mta_jax.params import init_mta_params

MODEL = dict(vocab_size=64, dim=32, num_layers=4, num_heads=4)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(pre_conv=(3, 4)), r"pre_conv\[1\] \(c_k\)=4 is invalid: must be odd with pad_key=\"both\""),
        (dict(post_conv=(2, 10)), r"post_conv\[1\] \(c_k\)=10 is invalid: must be odd"),
        (dict(pre_conv=(0, 3)), r"pre_conv\[0\] \(c_q\)=0 is invalid: must be a positive integer"),
        (dict(pre_conv=(3,)), r"pre_conv=\(3,\) is invalid: must be None or a pair"),
        (dict(pad_key="middle"), r"pad_key='middle' is invalid: must be one of \('both', 'left', 'right'\)"),
        (dict(gate="vector"), r"gate='vector' is invalid: must be one of"),
        (dict(dropout_rate=1.0), r"dropout_rate=1.0 is invalid: must be in \[0, 1\)"),
        (dict(post_head_mix=0), r"post_head_mix=0 is invalid: must be a positive integer"),
        (dict(group_norm="yes"), r"group_norm='yes' is invalid: must be True or False"),
    ],
)
def test_mta_config_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MTAConfig(**kwargs)


def test_even_c_k_is_allowed_with_one_sided_padding():
    assert MTAConfig(pre_conv=(2, 4), pad_key="left").pre_conv == (2, 4)
    assert MTAConfig(pre_conv=[2, 4], pad_key="right").pre_conv == (2, 4)  # lists become tuples


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(mta=MTAConfig(post_head_mix=3)), r"post_head_mix=3 is invalid: must divide num_heads=4"),
        (dict(mta=MTAConfig(pre_head_mix=8)), r"pre_head_mix=8 is invalid: must divide num_heads=4"),
        (dict(num_kv_heads=3), r"num_kv_heads=3 is invalid: must divide num_heads=4"),
        (
            dict(kq_conv_layers=(1, 4), mta=MTAConfig()),
            r"kq_conv_layers=\(1, 4\) is invalid: layer index 4 is out of range \[0, 4\)",
        ),
        (dict(kq_conv_layers=(-1,), mta=MTAConfig()), r"layer index -1 is out of range"),
        (dict(kq_conv_layers=(1, 1), mta=MTAConfig()), r"must not repeat a layer"),
        (dict(num_heads=5), r"num_heads=5 is invalid: must divide dim=32"),
        (dict(rope_style="neox"), r"rope_style='neox' is invalid: must be one of \('interleaved', 'half'\)"),
        (dict(attention_implementation="flash"), r"attention_implementation='flash' is invalid"),
        (dict(attention_block_q=0), r"attention_block_q=0 is invalid: must be a positive integer"),
        (dict(attention_block_k=2.5), r"attention_block_k=2.5 is invalid: must be a positive integer"),
        (dict(dtype="int8"), r"dtype='int8' is invalid"),
        (dict(vocab_size=0), r"vocab_size=0 is invalid: must be a positive integer"),
        (dict(head_dim=7), r"head_dim=7 is invalid: must be even"),
    ],
)
def test_model_config_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**{**MODEL, **kwargs})


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"model=\['n_layers'\] is invalid: unknown field"):
        model_config_from_dict({**MODEL, "n_layers": 3})
    with pytest.raises(ValueError, match=r"mta=\['c_h'\] is invalid: unknown field"):
        model_config_from_dict({**MODEL, "mta": {"c_h": 4}})


def test_layer_mta_keeps_the_kq_conv_only_in_chosen_layers():
    cfg = ModelConfig(
        **MODEL,
        mta=MTAConfig(pre_conv=(3, 5), post_conv=(3, 5), pre_head_mix=4, group_norm=True),
        kq_conv_layers=(1, 3),
    )
    for i in range(4):
        layer = cfg.layer_mta(i)
        assert layer.has_kq_conv == (i in (1, 3))
        assert layer.pre_head_mix == 4 and layer.group_norm
    assert ModelConfig(**MODEL).layer_mta(0) is None


def test_every_shipped_config_loads():
    paths = sorted(glob.glob("configs/models/*.yaml"))
    assert len(paths) >= 8
    for path in paths:
        assert isinstance(load_model_config(path), ModelConfig)


def _inputs(q_shape=(2, 8, 4, 8), kv_shape=(2, 8, 2, 8), dtype=jnp.float32):
    return jnp.zeros(q_shape, dtype), jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype)


CFG = MTAConfig(pre_conv=(3, 5), post_head_mix=2, gate="scalar")
PARAMS = init_mta_params(CFG, 4, 8, jnp.zeros((2,), jnp.uint32))


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(q=jnp.zeros((2, 8, 4))), r"q.shape=\(2, 8, 4\) is invalid: must be 4-D"),
        (dict(v=jnp.zeros((2, 8, 2, 4))), r"v.shape=\(2, 8, 2, 4\) is invalid: must equal k.shape"),
        (dict(k=jnp.zeros((3, 8, 2, 8)), v=jnp.zeros((3, 8, 2, 8))), r"k.shape=\(3, 8, 2, 8\) is invalid"),
        (
            dict(k=jnp.zeros((2, 8, 3, 8)), v=jnp.zeros((2, 8, 3, 8))),
            r"k.shape\[2\]=3 \(kv heads\) is invalid",
        ),
        (dict(k=jnp.zeros((2, 8, 2, 8), jnp.bfloat16)), r"q, k, v dtypes \(float32, bfloat16, float32\)"),
        (dict(q=jnp.zeros((2, 8, 4, 8), jnp.int32)), r"q.dtype=int32 is invalid: must be a floating"),
        (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), r"segment_ids with shape \(2, 7\) .* \(2, 8\)"),
        (
            dict(segment_ids=jnp.zeros((2, 8), jnp.float32)),
            r"segment_ids with shape \(2, 8\) and dtype float32",
        ),
        (dict(kv_segment_ids=jnp.zeros((2, 8), jnp.int32)), r"kv_segment_ids needs segment_ids"),
        (dict(implementation="pallas_gpu"), r"implementation='pallas_gpu' is invalid: must be one of"),
        (
            dict(params=init_mta_params(MTAConfig(pre_conv=(3, 3)), 4, 8, jnp.zeros((2,), jnp.uint32))),
            r"params.pre_conv with shape \(4, 3, 3\) is invalid: the config asks for \(4, 3, 5\)",
        ),
        (
            dict(cfg=MTAConfig(pre_conv=(3, 5), post_head_mix=3, gate="scalar")),
            r"post_head_mix=3 is invalid: must divide num_heads=4",
        ),
        (
            dict(cfg=MTAConfig(pre_conv=(3, 5), post_head_mix=2, gate="scalar", depth_scaling=True)),
            r"layer_index=None is invalid: depth_scaling=True needs the layer index",
        ),
    ],
)
def test_attention_input_errors(change, pattern):
    q, k, v = _inputs()
    args = dict(q=q, k=k, v=v, params=PARAMS, cfg=CFG)
    args.update(change)
    with pytest.raises(ValueError, match=pattern):
        multi_token_attention(**args)


def test_kv_segment_ids_required_when_lengths_differ():
    q, k, v = _inputs(kv_shape=(2, 10, 2, 8))
    with pytest.raises(ValueError, match=r"kv_segment_ids=None is invalid: with S=10 != T=8"):
        multi_token_attention(q, k, v, PARAMS, CFG, segment_ids=jnp.zeros((2, 8), jnp.int32))
    out = multi_token_attention(
        q,
        k,
        v,
        PARAMS,
        CFG,
        segment_ids=jnp.zeros((2, 8), jnp.int32),
        kv_segment_ids=jnp.zeros((2, 10), jnp.int32),
    )
    assert out.shape == q.shape and np.all(np.isfinite(out))
