"""NNX layers: RoPE conventions, the attention layer against plain attention, SwiGLU, the Linen face."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

from mta_jax.config import ModelConfig, MTAConfig, swiglu_hidden_dim
from mta_jax.layers import MultiTokenAttention, SwiGLU
from mta_jax.linen import MultiTokenAttention as LinenMultiTokenAttention
from mta_jax.rope import RopeScaling, apply_rope, rope_angles
from tests.helpers import FULL, random_mta_params


def test_rope_interleaved_equals_complex_rotation(rng):
    """Pair (2i, 2i+1) as the complex number x_2i + j x_2i+1, times exp(j pos theta^(-2i/D))."""
    x = rng.standard_normal((2, 5, 3, 8))
    positions = rng.integers(0, 1000, size=(2, 5))
    got = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), 1e4, "interleaved"))
    want = np.zeros_like(x)
    for b in range(2):
        for t in range(5):
            for i in range(4):
                for h in range(3):
                    z = complex(x[b, t, h, 2 * i], x[b, t, h, 2 * i + 1])
                    z *= np.exp(1j * positions[b, t] * 1e4 ** (-2 * i / 8))
                    want[b, t, h, 2 * i], want[b, t, h, 2 * i + 1] = z.real, z.imag
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_rope_is_float64_exact_for_float64_inputs(rng, style):
    """float64 in, float64 out, against the complex rotation in float64 (it was rounded to float32)."""
    x = rng.standard_normal((2, 7, 3, 8))
    positions = rng.integers(0, 100_000, size=(2, 7))
    freq = 1e4 ** (-np.arange(4) * 2 / 8)
    pairs = (x[..., 0::2], x[..., 1::2]) if style == "interleaved" else (x[..., :4], x[..., 4:])
    z = (pairs[0] + 1j * pairs[1]) * np.exp(1j * positions[..., None, None] * freq)
    if style == "interleaved":
        want = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
    else:
        want = np.concatenate([z.real, z.imag], axis=-1)
    with jax.enable_x64(True):
        got = apply_rope(jnp.asarray(x), jnp.asarray(positions), 1e4, style)
        assert got.dtype == jnp.float64
        # angles up to 1e5 rad: float64 rounding of pos * freq is ~1e-11 absolute
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)


def test_rope_half_equals_hugging_face_rotate_half(rng):
    x = rng.standard_normal((1, 6, 2, 8))
    positions = np.arange(6)
    inv_freq = 1.0 / (1e5 ** (np.arange(0, 8, 2) / 8))
    emb = np.concatenate([np.outer(positions, inv_freq)] * 2, axis=-1)[None, :, None, :]
    rotate_half = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    want = x * np.cos(emb) + rotate_half * np.sin(emb)
    got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), 1e5, "half")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_rope_scores_depend_only_on_relative_position(rng, style):
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

    def score(m, n):
        return jnp.sum(
            apply_rope(q, jnp.asarray([m]), 1e4, style) * apply_rope(k, jnp.asarray([n]), 1e4, style)
        )

    np.testing.assert_allclose(score(7, 3), score(107, 103), rtol=1e-4)
    assert not np.isclose(score(7, 3), score(7, 4))


def _plain_attention(layer: MultiTokenAttention, x, style):
    """Projections + RoPE + jax.nn.dot_product_attention + wo, from the layer's weights."""
    b, t, _ = x.shape
    heads, kv_heads, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = (x @ layer.wq.kernel[...]).reshape(b, t, heads, d)
    k = (x @ layer.wk.kernel[...]).reshape(b, t, kv_heads, d)
    v = (x @ layer.wv.kernel[...]).reshape(b, t, kv_heads, d)
    q, k = (apply_rope(y, jnp.arange(t), layer.rope_theta, style) for y in (q, k))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return out.reshape(b, t, heads * d) @ layer.wo.kernel[...]


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_fresh_mta_layer_is_standard_attention(rng, style):
    """Identity-initialised kq-conv and head mixing: the layer equals plain causal attention."""
    cfg = MTAConfig(pre_conv=(6, 11), post_conv=(6, 11), pre_head_mix=4, post_head_mix=4)
    layer = MultiTokenAttention(64, 4, 2, mta=cfg, rope_style=style, rngs=nnx.Rngs(int(rng.integers(1e6))))
    x = jnp.asarray(rng.standard_normal((2, 12, 64)), jnp.float32)
    np.testing.assert_allclose(layer(x), _plain_attention(layer, x, style), rtol=1e-5, atol=1e-6)
    grad_mta = jax.grad(lambda x: jnp.sum(jnp.sin(layer(x))))(x)
    grad_plain = jax.grad(lambda x: jnp.sum(jnp.sin(_plain_attention(layer, x, style))))(x)
    np.testing.assert_allclose(grad_mta, grad_plain, rtol=1e-4, atol=1e-5)


def test_layer_initialisation_follows_the_reference(rng):
    dim = 256
    layer = MultiTokenAttention(dim, 8, mta=FULL, rngs=nnx.Rngs(int(rng.integers(1e6))))
    # Normal(0, dim^-0.5) cut at +-3 std has std 0.986 dim^-0.5; tolerances are > 4 sampling sigmas.
    for w, tolerance in ((layer.wq.kernel[...], 0.03), (layer.gate_kernel[...], 0.6)):
        assert abs(float(jnp.std(w)) - 0.986 * dim**-0.5) < tolerance * dim**-0.5
        assert float(jnp.max(jnp.abs(w))) <= 3 * dim**-0.5 + 1e-7
    np.testing.assert_array_equal(layer.gate_bias[...], 0.0)
    np.testing.assert_array_equal(layer.norm_scale[...], 1.0)
    kernel = np.zeros((8, 3, 5))
    kernel[:, 2, 2] = 1.0
    np.testing.assert_array_equal(layer.pre_conv[...], kernel)
    np.testing.assert_array_equal(layer.post_head_mix[...], np.tile(np.eye(4), (2, 1, 1)))


def test_layer_dropout_follows_train_and_eval(rng):
    cfg = MTAConfig(pre_conv=(2, 3), dropout_rate=0.5)
    layer = MultiTokenAttention(32, 2, mta=cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((1, 8, 32)), jnp.float32)
    a, b = layer(x), layer(x)  # train mode by default, as nnx.Dropout: a new mask per call
    assert not np.allclose(a, b)
    layer.eval()
    np.testing.assert_array_equal(layer(x), layer(x))
    np.testing.assert_array_equal(layer(x), layer(x, deterministic=True))


@pytest.mark.parametrize("dim, hidden", [(1024, 2816), (1280, 3584), (1536, 4096), (2048, 5632)])
def test_swiglu_hidden_dim_matches_the_reference(dim, hidden):
    assert swiglu_hidden_dim(dim) == hidden  # 256 * ceil(int(8 * dim / 3) / 256)


def test_swiglu(rng):
    ffn = SwiGLU(16, 48, rngs=nnx.Rngs(0))
    x = rng.standard_normal((3, 16))
    w1, w2, w3 = (np.asarray(w.kernel[...], np.float64) for w in (ffn.w1, ffn.w2, ffn.w3))
    a = x @ w1
    want = ((a / (1 + np.exp(-a))) * (x @ w3)) @ w2
    np.testing.assert_allclose(ffn(jnp.asarray(x, jnp.float32)), want, rtol=1e-5, atol=1e-6)


def test_linen_face_equals_nnx_layer(rng):
    cfg = FULL
    kwargs = dict(num_kv_heads=2, mta=cfg, layer_index=2)
    linen_layer = LinenMultiTokenAttention(32, 4, **kwargs)
    x = jnp.asarray(rng.standard_normal((2, 9, 32)), jnp.float32)
    boxed = linen_layer.init(jax.random.key(0), x)["params"]
    # Matrices come boxed with their logical axes (for nn.get_partition_spec); values via nn.unbox.
    assert nn.get_partition_spec(boxed)["attention"]["wq"]["kernel"] == P("embed", "q_heads")
    params = nn.unbox(boxed)
    # Random (non-identity) MTA parameters, then the same values in the NNX layer.
    random = random_mta_params(cfg, 4, 8, rng)
    attention = dict(params["attention"])
    attention.update({name: value for name, value in vars(random).items() if value is not None})
    params = {"attention": attention}
    nnx_layer = MultiTokenAttention(32, 4, rngs=nnx.Rngs(1), **kwargs)
    state = nnx.state(nnx_layer, nnx.Param)
    nnx.replace_by_pure_dict(state, params["attention"])
    nnx.update(nnx_layer, state)
    want = nnx_layer(x)
    got = linen_layer.apply({"params": params}, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(want, _plain_attention(nnx_layer, x, "interleaved"), atol=1e-3)


def _hf_llama3_inv_freq(head_dim, theta, factor, low, high, original):
    """Hugging Face's _compute_llama3_parameters, transcribed loop by loop in float64."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * np.pi / freq
        if wavelen < original / high:
            out.append(freq)
        elif wavelen > original / low:
            out.append(freq / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


@pytest.mark.parametrize("kind", ["llama3", "linear"])
def test_rope_scaling_matches_hugging_face_frequencies(kind):
    scaling = RopeScaling(kind, 8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64)
    head_dim, theta = 64, 5e5
    got = np.asarray(rope_angles(jnp.asarray([1]), head_dim, theta, scaling))[0]
    if kind == "llama3":
        want = _hf_llama3_inv_freq(head_dim, theta, 8.0, 1.0, 4.0, 64)
        assert (want != 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)).any()  # the case bites
    else:
        want = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim) / 8.0
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_rope_scaling_is_read_from_a_model_config_mapping():
    linear = {"kind": "linear", "factor": 2.0}
    cfg = ModelConfig(vocab_size=8, dim=16, num_layers=1, num_heads=2, rope_scaling=linear)
    assert cfg.rope_scaling == RopeScaling("linear", factor=2.0)
    with pytest.raises(ValueError, match="rope_scaling.kind='yarn' is invalid"):
        ModelConfig(vocab_size=8, dim=16, num_layers=1, num_heads=2, rope_scaling={"kind": "yarn"})


def test_layer_constructor_validates_like_the_config():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"num_heads=7 is invalid: must divide dim=1536"):
        MultiTokenAttention(dim=1536, num_heads=7, rngs=rngs)
    with pytest.raises(ValueError, match=r"num_kv_heads=3 is invalid: must divide num_heads=4"):
        MultiTokenAttention(dim=32, num_heads=4, num_kv_heads=3, rngs=rngs)
    with pytest.raises(ValueError, match=r"rope_style='rotate' is invalid"):
        MultiTokenAttention(dim=32, num_heads=4, rope_style="rotate", rngs=rngs)
    with pytest.raises(ValueError, match=r"implementation='fast' is invalid"):
        MultiTokenAttention(dim=32, num_heads=4, implementation="fast", rngs=rngs)
    MultiTokenAttention(dim=36, num_heads=4, head_dim=8, rngs=rngs)  # explicit head_dim need not divide


def test_layer_inputs_are_checked_with_named_shapes():
    layer = MultiTokenAttention(dim=16, num_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x has shape \(2, 3, 8\): expected \[batch, seq_len, dim=16\]"):
        layer(jnp.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 4\)"):
        layer(jnp.zeros((2, 3, 16)), segment_ids=jnp.zeros((2, 4), jnp.int32))
