"""The decoder: parameter counts of the paper's models, per-layer MTA, causality, packing, gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mta_jax.config import ModelConfig, MTAConfig, load_model_config, swiglu_hidden_dim
from mta_jax.model import MTATransformer, count_params
from tests import loops
from tests.helpers import random_mta_params, random_segment_ids

SIZES = {"300M": (1024, 20, 16), "550M": (1280, 24, 10), "880M": (1536, 24, 16), "1B": (2048, 24, 16)}

TINY = ModelConfig(
    vocab_size=50,
    dim=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    mta=MTAConfig(
        pre_conv=(3, 5), post_conv=(2, 3), pre_head_mix=4, post_head_mix=2, group_norm=True, gate="scalar"
    ),
    kq_conv_layers=(1,),
)


def test_880m_parameter_count_matches_the_paper():
    baseline = count_params(load_model_config("configs/models/880M_baseline.yaml"))
    mta = count_params(load_model_config("configs/models/880M_mta.yaml"))
    assert baseline == 876_553_728
    assert mta - baseline == 29_592


@pytest.mark.parametrize("size", SIZES)
def test_paper_model_counts_follow_the_formulas(size):
    dim, layers, heads = SIZES[size]
    baseline = load_model_config(f"configs/models/{size}_baseline.yaml")
    mta = load_model_config(f"configs/models/{size}_mta.yaml")
    hidden = baseline.ffn_hidden_dim
    want_baseline = 128_256 * dim + layers * (4 * dim * dim + 3 * dim * hidden + 2 * dim) + dim
    assert count_params(baseline) == want_baseline
    # Spec section 5: 2 L M (c_q c_k / 4 + c_h) + L (2 head_dim + 1), kq-conv in a quarter of the layers.
    head_dim = dim // heads
    want_extra = 2 * layers * heads * (6 * 11 / 4 + heads) + layers * (2 * head_dim + 1)
    assert count_params(mta) - count_params(baseline) == want_extra
    assert mta.kq_conv_layers == tuple(range(2, layers, 4))


def _model(cfg, seed):
    return MTATransformer(cfg, rngs=nnx.Rngs(seed))


@nnx.jit
def _logits(model, tokens, segment_ids=None):
    return model(tokens, segment_ids=segment_ids)


def _randomise_mta(model, rng):
    """Replaces every MTA parameter by random values (away from the identity)."""
    for layer in model.layers:
        attention = layer.attention
        random = random_mta_params(attention.mta, attention.num_heads, attention.head_dim, rng)
        for field in dataclasses.fields(random):
            value = getattr(random, field.name)
            if value is not None:
                getattr(attention, field.name)[...] = value


def test_kq_conv_only_in_chosen_layers_and_mixing_everywhere(seed):
    model = _model(TINY, seed)
    for i, layer in enumerate(model.layers):
        attention = layer.attention
        assert (attention.pre_conv is not None) == (i == 1)
        assert (attention.post_conv is not None) == (i == 1)
        assert attention.pre_head_mix is not None and attention.post_head_mix is not None
        assert attention.norm_scale is not None and attention.gate_kernel is not None
    assert model.output is None  # tied embeddings
    untied = _model(dataclasses.replace(TINY, tie_embeddings=False), seed)
    assert untied.output.kernel.shape == (32, 50)


def test_embedding_init_is_truncated_normal(seed):
    cfg = dataclasses.replace(TINY, vocab_size=4096, dim=64, num_layers=1, kq_conv_layers=None)
    table = _model(cfg, seed).tok_embeddings.embedding[...]
    assert abs(float(jnp.std(table)) - 0.986 * 64**-0.5) < 0.02 * 64**-0.5
    assert float(jnp.max(jnp.abs(table))) <= 3 * 64**-0.5 + 1e-7


def test_causality_with_random_mta(seed, rng):
    model = _model(TINY, seed)
    _randomise_mta(model, rng)
    tokens = jnp.asarray(rng.integers(0, 50, (2, 16)))
    t = int(rng.integers(1, 15))
    changed = tokens.at[:, t:].set(jnp.asarray(rng.integers(0, 50, (2, 16 - t))))
    a, b = _logits(model, tokens), _logits(model, changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


def test_packed_rows_equal_documents_run_alone(seed, rng):
    """Segment ids isolate documents in every layer: conv, mixing, and RoPE positions restart."""
    model = _model(TINY, seed)
    _randomise_mta(model, rng)
    tokens = jnp.asarray(rng.integers(0, 50, (2, 18)))
    segment_ids = random_segment_ids(rng, 2, 18, max_docs=3)
    packed = _logits(model, tokens, segment_ids)
    for b in range(2):
        ids = np.asarray(segment_ids[b])
        for doc in np.unique(ids):
            rows = np.nonzero(ids == doc)[0]
            alone = _logits(model, tokens[b : b + 1, rows])
            bound = _model_rounding_bound(TINY, keys=18, scale=float(np.abs(alone).max()))
            np.testing.assert_allclose(packed[b, rows], alone[0], rtol=0, atol=bound)


def _model_rounding_bound(cfg, *, keys: int, scale: float) -> float:
    """float32 eps x the terms summed along one token's path through the model (per layer: the q/k/v/o
    projections, the attention chain of tests/test_attention.py's bound, the FFN in and out) x the output's
    size. Equal computations with sums in another order (a packed row against its document alone) stay
    within it; a token that leaks across documents moves the logits by far more."""
    mta = cfg.mta
    pre, post = mta.pre_conv or (1, 1), mta.post_conv or (1, 1)
    head_dim = cfg.dim // cfg.num_heads
    attention = head_dim + pre[0] * pre[1] * (mta.pre_head_mix or 1) + keys
    attention += post[0] * post[1] * (mta.post_head_mix or 1)
    per_layer = 4 * cfg.dim + attention + 2 * swiglu_hidden_dim(cfg.dim, cfg.ffn_multiple_of)
    return float(np.finfo(np.float32).eps) * (cfg.num_layers * per_layer + cfg.dim) * scale


def test_blockwise_model_equals_reference_model(seed, rng):
    """The model's attention path is a config field; small tiles force several per sequence."""
    tokens = jnp.asarray(rng.integers(0, 50, (2, 21)))
    segment_ids = random_segment_ids(rng, 2, 21, max_docs=3)
    logits = {}
    for implementation in ("reference", "blockwise"):
        cfg = dataclasses.replace(
            TINY, attention_implementation=implementation, attention_block_q=8, attention_block_k=4
        )
        model = _model(cfg, seed)
        _randomise_mta(model, np.random.default_rng(seed))
        logits[implementation] = _logits(model, tokens, segment_ids)
    np.testing.assert_allclose(logits["blockwise"], logits["reference"], rtol=1e-4, atol=1e-5)


def test_fresh_mta_model_equals_the_baseline_with_the_same_weights(seed, rng):
    """Identity kq-conv and head mixing (no norm, no gate) leave a Transformer unchanged."""
    mta_cfg = MTAConfig(pre_conv=(6, 11), post_conv=(6, 11), pre_head_mix=4, post_head_mix=4)
    mta = _model(dataclasses.replace(TINY, mta=mta_cfg, kq_conv_layers=None), seed)
    baseline = _model(TINY.baseline(), seed)
    shared = nnx.state(baseline, nnx.Param)
    nnx.update(mta, shared)  # same projection, FFN, norm and embedding weights
    tokens = jnp.asarray(rng.integers(0, 50, (2, 14)))
    np.testing.assert_allclose(_logits(mta, tokens), _logits(baseline, tokens), rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter(seed, rng):
    model = _model(TINY, seed)
    _randomise_mta(model, rng)
    tokens = jnp.asarray(rng.integers(0, 50, (2, 12)))

    def loss(model):
        logits = model(tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    grads = nnx.grad(loss)(model)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, value in flat:
        value = value[...]
        assert np.all(np.isfinite(value)), path
        assert np.any(value != 0), f"no gradient reaches {'/'.join(map(str, path))}"


def test_bfloat16_model_close_to_float32(seed, rng):
    model32 = _model(TINY, seed)
    _randomise_mta(model32, rng)
    model16 = _model(dataclasses.replace(TINY, dtype="bfloat16"), seed)
    nnx.update(model16, nnx.state(model32, nnx.Param))
    tokens = jnp.asarray(rng.integers(0, 50, (2, 16)))
    a, b = _logits(model32, tokens), _logits(model16, tokens)
    assert b.dtype == jnp.float32
    # Seen over 60 seeds: relative error median 1.6%, max 3.1%, argmax agreement >= 90%; the tail is
    # long (one suite run drew 6.2%), a broken bf16 path would be off by O(1).
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 0.12
    assert np.mean(np.argmax(a, -1) == np.argmax(b, -1)) > 0.75


def test_bad_tokens_are_rejected(seed):
    with pytest.raises(ValueError, match=r"tokens with shape \(2, 3, 1\) and dtype int32 is invalid"):
        _model(TINY, seed)(jnp.zeros((2, 3, 1), jnp.int32))


def test_mismatched_segment_ids_and_positions_are_named(seed):
    model, tokens = _model(TINY, seed), jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 4\): expected tokens' shape \(2, 5\)"):
        model(tokens, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"positions has shape \(5, 2\)"):
        model(tokens, positions=jnp.zeros((5, 2), jnp.int32))


def _rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope_interleaved(x, positions, theta):
    """x [T, H, D]: pairs (2i, 2i + 1) rotated by position * theta^(-2i / D), as complex numbers."""
    half = x.shape[-1] // 2
    freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * positions[:, None, None] * freq)
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def _f64(param) -> np.ndarray:
    return np.asarray(param[...], np.float64)


def _heads(x, linear, num_heads):
    """x [T, dim] @ kernel -> [T, num_heads, head_dim]."""
    out = x @ _f64(linear.kernel)
    return out.reshape(x.shape[0], num_heads, -1)


def _model_loop(model, cfg, tokens, segment_ids):
    """The decoder in numpy float64, layer by layer, each packed document on its own (tests/loops.py)."""
    embedding = _f64(model.tok_embeddings.embedding)
    logits = []
    for row, ids in zip(np.asarray(tokens), np.asarray(segment_ids), strict=True):
        positions = np.concatenate([np.arange(np.sum(ids == d)) for d in np.unique(ids)])
        x = embedding[row]
        for layer in model.layers:
            attn = layer.attention
            h = _rms_norm(x, _f64(layer.attention_norm.scale), cfg.norm_eps)
            q = _rope_interleaved(_heads(h, attn.wq, attn.num_heads), positions, cfg.rope_theta)
            k = _rope_interleaved(_heads(h, attn.wk, attn.num_kv_heads), positions, cfg.rope_theta)
            v = _heads(h, attn.wv, attn.num_kv_heads)
            params = dataclasses.asdict(attn.mta_params())
            out = loops.packed_attention_loop(q, k, v, params, attn.mta, ids, layer_index=attn.layer_index)
            x = x + out.reshape(len(row), -1) @ _f64(attn.wo.kernel)
            h = _rms_norm(x, _f64(layer.ffn_norm.scale), cfg.norm_eps)
            ffn = layer.feed_forward
            gate = h @ _f64(ffn.w1.kernel)
            x = x + (gate / (1 + np.exp(-gate)) * (h @ _f64(ffn.w3.kernel))) @ _f64(ffn.w2.kernel)
        logits.append(_rms_norm(x, _f64(model.norm.scale), cfg.norm_eps) @ embedding.T)
    return np.stack(logits)


@pytest.mark.parametrize("implementation", ["reference", "blockwise"])
def test_float64_model_equals_a_float64_loop(seed, rng, implementation):
    """A float64 model is float64 end to end (RoPE, attention, norms, logits): every layer's MTA parts
    random, packed documents, GQA, blockwise tiles smaller than a document; 1e-12 against numpy."""
    cfg = dataclasses.replace(
        TINY, dtype="float64", param_dtype="float64", attention_implementation=implementation,
        attention_block_q=8, attention_block_k=4,
    )  # fmt: skip
    with jax.enable_x64(True):
        model = _model(cfg, seed)
        _randomise_mta(model, rng)
        tokens = jnp.asarray(rng.integers(0, 50, (2, 13)))
        segment_ids = random_segment_ids(rng, 2, 13, max_docs=3)
        got = _logits(model, tokens, segment_ids)
        assert got.dtype == jnp.float64
        want = _model_loop(model, cfg, tokens, segment_ids)
    # float64 rounding over ~10^3 operations a logit of size ~1: a few 1e-14; 1e-12 leaves room.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_float64_model_without_x64_is_refused():
    cfg = dataclasses.replace(TINY, dtype="float64", param_dtype="float64")
    with jax.enable_x64(False), pytest.raises(ValueError, match="float64 model needs 64-bit jax"):
        _model(cfg, 0)
