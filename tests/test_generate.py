"""generate() and the sampling helpers (mta_jax/generate.py), and the command python -m train.generate."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mta_jax.config import ModelConfig, MTAConfig
from mta_jax.generate import filter_top_k, filter_top_p, generate, sample_logits
from mta_jax.model import MTATransformer
from tests.test_decode import random_model
from train import generate as cli
from train import toy
from train.params_io import save_params

PROMPT, NEW = 7, 6
# A cheap MTA model (one layer: generate's logic does not depend on depth; tests/test_decode.py checks
# decoding itself): both convs, head mixing and the gate.
MTA = dict(
    mta=MTAConfig(pre_conv=(2, 3), post_conv=(2, 3), pre_head_mix=2, post_head_mix=4, gate="scalar"),
    num_kv_heads=2,
    num_layers=1,
)


# ---------------------------------------------------------------------------------------- sampling helpers


def test_top_k_keeps_exactly_k(rng):
    logits = jnp.asarray(rng.integers(0, 4, (5, 12)), jnp.float32)  # many ties
    for k in (1, 3, 12):
        kept = np.isfinite(filter_top_k(logits, k))
        assert (kept.sum(-1) == k).all()
        for row, keep in zip(np.asarray(logits), kept, strict=True):
            assert row[keep].min() >= row[~keep].max(initial=-np.inf)  # the k largest
        assert np.array_equal(np.asarray(filter_top_k(logits, k))[kept], np.asarray(logits)[kept])


def test_top_p_keeps_the_smallest_set_with_mass_p(rng):
    logits = jnp.asarray(3 * rng.standard_normal((6, 20)), jnp.float32)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    for p in (0.05, 0.5, 0.9, 1.0):
        kept = np.isfinite(filter_top_p(logits, p))
        for row, keep in zip(probs, kept, strict=True):
            mass = np.sort(row[keep])
            assert mass.sum() >= p - 1e-6 or keep.all()  # enough mass...
            assert mass.sum() - mass[0] < p  # ...and none to spare: dropping the smallest goes below p
            assert row[keep].min() >= row[~keep].max(initial=-np.inf)  # the most probable ones


def test_sample_logits(rng):
    logits = jnp.asarray(rng.standard_normal((4, 9)), jnp.float32)
    assert np.array_equal(sample_logits(logits, None), np.argmax(logits, -1))  # temperature 0: argmax
    key = jax.random.key(int(rng.integers(2**31)))
    many = jnp.tile(logits, (64, 1))  # 64 draws per row in one call
    assert np.array_equal(sample_logits(many, key, temperature=2.0, top_k=1), np.argmax(many, -1))
    draws = np.asarray(sample_logits(many, key, temperature=1.0, top_k=3)).reshape(64, 4)
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    assert all(np.isin(draws[:, b], top3[b]).all() for b in range(4))
    assert len(np.unique(draws)) > 4  # it does sample
    with pytest.raises(ValueError, match=r"temperature=-1.0 is invalid: must be a number >= 0"):
        sample_logits(logits, key, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p=1.5 is invalid: must be None or a number in \(0, 1\]"):
        sample_logits(logits, key, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match=r"top_k=0 is invalid"):
        sample_logits(logits, key, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match=r"rng=None is invalid"):
        sample_logits(logits, None, temperature=1.0)


# ------------------------------------------------------------------------------------------------ generate


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def greedy_by_full_forward(model, prompt, lengths, new):
    """Greedy continuation re-running the full forward pass on the growing sequence (right-padded to a
    fixed width: causal, so the padding never changes the logits read)."""
    graphdef, state = nnx.split(model)
    batch = prompt.shape[0]
    buffer = np.zeros((batch, prompt.shape[1] + new), np.int32)
    buffer[:, : prompt.shape[1]] = prompt
    for step in range(new):
        logits = np.asarray(_forward(graphdef, state, jnp.asarray(buffer)))
        for b in range(batch):
            position = lengths[b] + step
            buffer[b, position] = np.argmax(logits[b, position - 1])
    return buffer


@pytest.fixture(scope="module")
def model_and_prompt():
    rng = np.random.default_rng(0)
    model = random_model(rng, **MTA)
    prompt = rng.integers(0, 31, (2, PROMPT)).astype(np.int32)
    return model, prompt


def test_greedy_equals_the_argmax_of_the_full_forward_pass(model_and_prompt):
    model, prompt = model_and_prompt
    lengths = np.asarray([PROMPT, PROMPT - 3])  # the short prompt is left-padded inside
    expected = greedy_by_full_forward(model, prompt, lengths, NEW)
    out = np.asarray(generate(model, jnp.asarray(prompt), NEW, prompt_lengths=lengths))
    assert out.shape == (2, PROMPT + NEW)
    assert np.array_equal(out[0], expected[0])
    assert np.array_equal(out[1, : PROMPT - 3 + NEW], expected[1, : PROMPT - 3 + NEW])
    assert (out[1, PROMPT - 3 + NEW :] == 0).all()

    # eos: row 0 stops at its third new token; the rest of it is eos; row 1 is unchanged.
    eos = int(expected[0, PROMPT + 2])
    stopped = np.asarray(generate(model, jnp.asarray(prompt), NEW, prompt_lengths=lengths, eos_id=eos))
    first_eos = PROMPT + int(np.argmax(expected[0, PROMPT:] == eos))
    assert np.array_equal(stopped[0, : first_eos + 1], expected[0, : first_eos + 1])
    assert (stopped[0, first_eos:] == eos).all()


def test_sampling_is_reproducible(model_and_prompt):
    model, prompt = model_and_prompt
    prompt = jnp.asarray(prompt)
    sample = functools.partial(generate, model, prompt, NEW, temperature=1.0, top_p=0.95, top_k=20)
    first, again = sample(rng=jax.random.key(1)), sample(rng=jax.random.key(1))
    assert np.array_equal(first, again)
    others = [sample(rng=jax.random.key(seed)) for seed in (2, 3)]
    assert any(not np.array_equal(first, other) for other in others)
    assert np.array_equal(first[:, :PROMPT], prompt)
    # top_k=1 leaves one token: sampling is greedy decoding.
    greedy = generate(model, prompt, NEW)
    assert np.array_equal(sample(rng=jax.random.key(4), top_k=1), greedy)


def test_generate_rejects_bad_arguments(model_and_prompt):
    model, prompt = model_and_prompt
    prompt = jnp.asarray(prompt)
    with pytest.raises(ValueError, match=r"max_new_tokens=0 is invalid: must be an integer >= 1"):
        generate(model, prompt, 0)
    with pytest.raises(ValueError, match=r"max_len=5 is invalid: the cache must hold"):
        generate(model, prompt, 4, max_len=5)
    with pytest.raises(ValueError, match=r"prompt_lengths=\[0, 7\] is invalid: each must be in \[1, 7\]"):
        generate(model, prompt, 4, prompt_lengths=jnp.asarray([0, 7]))
    with pytest.raises(ValueError, match=r"rng=None is invalid"):
        generate(model, prompt, 4, temperature=0.5)
    with pytest.raises(ValueError, match=r"prompt_tokens with shape \(7,\)"):
        generate(model, prompt[0], 4)


# ------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A parameter directory of a fresh tiny model on the toy vocabulary."""
    cfg = ModelConfig(vocab_size=toy.VOCAB_SIZE, dim=32, num_heads=4, **MTA)
    model = MTATransformer(cfg, rngs=nnx.Rngs(3))
    return save_params(
        tmp_path_factory.mktemp("ckpt") / "params", cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )


def test_cli_prints_the_greedy_continuation(checkpoint, capsys):
    assert cli.main(["--checkpoint", str(checkpoint), "--prompt", "abc.de#a", "--tokenizer", "toy"]) == 0
    printed = capsys.readouterr().out.strip()
    from train.params_io import load_model

    ids = np.concatenate([[toy.BOS_ID], toy.encode("abc.de#a")])
    tokens = np.asarray(generate(load_model(checkpoint), jnp.asarray(ids[None]), 64, eos_id=toy.EOS_ID))[0]
    assert printed == cli.continuation(cli.ToyVocabulary(), tokens[ids.size :])
    assert set(printed) <= set(toy.VOCAB)


def test_cli_errors(checkpoint, tmp_path, capsys):
    assert cli.main(["--checkpoint", str(tmp_path / "none"), "--prompt", "a", "--tokenizer", "toy"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint=" in err and "is invalid: no such directory" in err
    assert cli.main(["--checkpoint", str(checkpoint), "--prompt", "aBc!", "--tokenizer", "toy"]) == 2
    assert "characters ['!', 'B'] are not in the vocabulary" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(checkpoint), "--prompt", "abc"]) == 2
    assert "--tokenizer=None is invalid" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(checkpoint), "--prompt", "abc", "--tokenizer", "byte"]) == 2
    assert "token ids [97, 98, 99, 256] lie outside the model's vocabulary of 31" in capsys.readouterr().err
    argv = ["--checkpoint", str(checkpoint), "--prompt", "a", "--tokenizer", "toy", "--top-p", "2"]
    assert cli.main(argv) == 2
    assert "top_p=2.0 is invalid" in capsys.readouterr().err
