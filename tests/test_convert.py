"""Adding identity MTA to a trained baseline (mta_jax/convert.py, python -m train.convert).

The converted model is compared with the baseline it came from: same logits on random tokens, for random
baseline parameters (norm scales included), several MTA layouts and GQA.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mta_jax import ModelConfig, MTAConfig
from mta_jax.convert import add_mta
from mta_jax.hf_llama import load_llama, save_llama
from tests.train_helpers import ROOT
from train.config import load_train_config
from train.convert import main as convert_main
from train.loop import train
from train.params_io import abstract_params, check_params, load_params, model_from_params, save_params

BASE = ModelConfig(vocab_size=31, dim=32, num_layers=2, num_heads=4, num_kv_heads=2)


def random_params(cfg: ModelConfig, rng: np.random.Generator) -> dict:
    """Random parameters of a model of `cfg` (numpy, no XLA work): kernels with std fan_in^-0.5, norm
    scales around 1, MTA parts (if any) at the identity plus noise."""

    def draw(path, leaf):
        if path[-1].key == "scale":
            return (1 + 0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
        std = 1.0 if path[-1].key == "embedding" else leaf.shape[0] ** -0.5
        return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def logits(cfg: ModelConfig, params, tokens) -> np.ndarray:
    """[B, T, vocab] float32 logits of the model `cfg` with `params` (one compiled program per config)."""
    graphdef, state = nnx.split(model_from_params(cfg, params))
    return np.asarray(_forward(graphdef, state, jnp.asarray(tokens, jnp.int32)))


def random_tokens(cfg: ModelConfig, rng: np.random.Generator, length: int = 24) -> jax.Array:
    return jnp.asarray(rng.integers(0, cfg.vocab_size, (2, length)), jnp.int32)


CASES = {
    "pre+post conv on layer 1, left pad, post head mix, GQA": (
        BASE,
        dict(pre_conv=(2, 4), post_conv=(3, 3), pad_key="left", post_head_mix=2),
        (1,),
    ),
    "pre+post conv on all layers, pre head mix, dropout": (
        BASE,
        dict(pre_conv=(2, 3), post_conv=(3, 5), pre_head_mix=4, dropout_rate=0.1),
        None,
    ),
    "right pad post conv on layer 0, head mixing, MQA, half RoPE, untied": (
        dataclasses.replace(BASE, num_kv_heads=1, rope_style="half", tie_embeddings=False),
        dict(post_conv=(2, 2), pad_key="right", pre_head_mix=2, post_head_mix=4),
        (0,),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conversion_changes_no_logit(case, rng):
    cfg, mta, layers = CASES[case]
    params = random_params(cfg, rng)
    tokens = random_tokens(cfg, rng)
    new_cfg, new_params = add_mta(cfg, params, mta, kq_conv_layers=layers)

    assert new_cfg == dataclasses.replace(cfg, mta=MTAConfig(**mta), kq_conv_layers=layers)
    check_params(new_cfg, new_params)
    old = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    new = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(new_params)[0]}
    assert all(np.array_equal(old[name], new[name]) for name in old)  # every old parameter kept
    assert all(x.shape[-1] > 0 for x in jax.tree.leaves(params))  # the input was not modified
    assert set(old) < set(new)

    base_logits = logits(cfg, params, tokens)
    np.testing.assert_allclose(logits(new_cfg, new_params, tokens), base_logits, rtol=1e-5, atol=1e-5)

    # the new parameters are live: moving one of them away from the identity moves the logits
    attention = new_params["layers"][layers[0] if layers else 0]["attention"]
    name = next(n for n in ("pre_conv", "post_conv", "pre_head_mix", "post_head_mix") if n in attention)
    attention[name] = attention[name] + 0.5 * rng.standard_normal(attention[name].shape, np.float32)
    assert np.abs(logits(new_cfg, new_params, tokens) - base_logits).max() > 1e-3


def test_identity_kernels_sit_on_the_current_query_and_key(rng):
    params = random_params(BASE, rng)
    _, new = add_mta(BASE, params, dict(pre_conv=(3, 5), post_conv=(2, 4), pad_key="left", post_head_mix=2))
    pre, post = (np.asarray(new["layers"][1]["attention"][n]) for n in ("pre_conv", "post_conv"))
    assert pre.shape == (4, 3, 5) and post.shape == (4, 2, 4)
    assert (pre.sum((1, 2)) == 1).all() and (pre[:, 2, 4] == 1).all()  # last query row, left pad c_k - 1
    assert (post.sum((1, 2)) == 1).all() and (post[:, 1, 3] == 1).all()
    mix = np.asarray(new["layers"][0]["attention"]["post_head_mix"])
    np.testing.assert_array_equal(mix, np.stack([np.eye(2), np.eye(2)]))


def test_bad_conversions_are_refused_with_their_reason(rng):
    params = random_params(BASE, rng)
    with pytest.raises(
        ValueError, match=r"group_norm, gate change the model's output.*pass allow_function_change=True to"
    ):
        add_mta(BASE, params, dict(pre_conv=(2, 3), group_norm=True, gate="scalar"))
    with pytest.raises(ValueError, match=r"depth_scaling change.* 1 - lambda_init"):
        add_mta(BASE, params, dict(depth_scaling=True))
    with pytest.raises(ValueError, match="causal=False lets every query see later keys"):
        add_mta(BASE, params, dict(pre_conv=(2, 3), causal=False))
    with pytest.raises(
        ValueError, match=r"kq_conv_layers=\(0, 2\) is invalid: layer index 2 is not an integer in"
    ):
        add_mta(BASE, params, dict(pre_conv=(2, 3)), kq_conv_layers=[0, 2])
    with pytest.raises(ValueError, match=r"kq_conv_layers=\(1, 1\) is invalid: must not repeat"):
        add_mta(BASE, params, dict(pre_conv=(2, 3)), kq_conv_layers=[1, 1])
    with pytest.raises(ValueError, match="kq_conv_layers=.* mta has no pre_conv or post_conv"):
        add_mta(BASE, params, dict(post_head_mix=2), kq_conv_layers=[1])
    with pytest.raises(ValueError, match="pre_head_mix=3 is invalid: must divide num_heads=4"):
        add_mta(BASE, params, dict(pre_head_mix=3))
    with pytest.raises(ValueError, match="unknown field"):
        add_mta(BASE, params, dict(conv=(2, 3)))
    converted_cfg, converted = add_mta(BASE, params, dict(pre_conv=(2, 3)))
    with pytest.raises(ValueError, match="the model already has MTA"):
        add_mta(converted_cfg, converted, dict(post_conv=(2, 3)))
    with pytest.raises(ValueError, match="params do not fit .*unexpected layers/0/attention/pre_conv"):
        add_mta(BASE, converted, dict(post_conv=(2, 3)))
    with pytest.raises(ValueError, match=r"wq/kernel has shape \(32, 32\), the model needs \(32, 16\)"):
        add_mta(
            dataclasses.replace(BASE, num_heads=2, num_kv_heads=2, head_dim=8), params, dict(pre_conv=(2, 3))
        )


def test_function_changing_parts_are_allowed_on_request(rng, caplog):
    params = random_params(BASE, rng)
    with caplog.at_level(logging.WARNING, logger="mta_jax.convert"):
        cfg, new = add_mta(BASE, params, dict(pre_conv=(2, 3), gate="scalar"), allow_function_change=True)
    assert "differs from the baseline" in caplog.text and "sigmoid" in caplog.text
    assert cfg.mta.gate == "scalar"
    check_params(cfg, new)
    kernels = [np.asarray(new["layers"][i]["attention"]["gate_kernel"]) for i in range(2)]
    assert kernels[0].shape == (8, 1) and not np.array_equal(kernels[0], kernels[1])  # random, per layer
    assert np.abs(kernels[0]).max() <= 3 * BASE.dim**-0.5  # the model's truncated normal, std dim^-0.5


def test_a_converted_model_round_trips_through_a_parameter_directory(tmp_path, rng):
    params = random_params(BASE, rng)
    cfg, new = add_mta(BASE, params, dict(pre_conv=(2, 3), post_head_mix=2), kq_conv_layers=[1])
    save_params(tmp_path / "p", cfg, new)
    loaded_cfg, loaded = load_params(tmp_path / "p")
    assert loaded_cfg == cfg
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    # and the loaded parameters can be converted further only as a baseline: a clear refusal
    with pytest.raises(ValueError, match="already has MTA"):
        add_mta(loaded_cfg, loaded, dict(post_conv=(2, 3)))


def test_llama_files_round_trip_without_torch(tmp_path, rng):
    """save_llama then load_llama; an "interleaved" model comes back as "half" with the same logits."""
    cfg = dataclasses.replace(BASE, tie_embeddings=False, rope_scaling={"kind": "linear", "factor": 2.0})
    params = random_params(cfg, rng)
    tokens = random_tokens(cfg, rng, length=40)
    save_llama(tmp_path / "hf", cfg, params)
    loaded_cfg, loaded = load_llama(tmp_path / "hf")
    assert loaded_cfg.rope_style == "half" and loaded_cfg.rope_scaling == cfg.rope_scaling
    assert loaded_cfg.ffn_hidden_dim == cfg.ffn_hidden_dim and loaded_cfg.norm_eps == cfg.norm_eps
    np.testing.assert_allclose(logits(loaded_cfg, loaded, tokens), logits(cfg, params, tokens), atol=2e-5)
    np.testing.assert_array_equal(
        loaded["layers"][1]["feed_forward"]["w2"]["kernel"],
        params["layers"][1]["feed_forward"]["w2"]["kernel"],
    )
    # the permutation is real: the exported q/k weights under our interleaved rotation give other logits
    assert np.abs(logits(cfg, loaded, tokens) - logits(cfg, params, tokens)).max() > 1e-3

    mta_cfg, mta_params = add_mta(cfg, params, dict(pre_conv=(2, 3)), kq_conv_layers=[1])
    with pytest.raises(ValueError, match=r"no place for the MTA parameters layers/1/attention/pre_conv"):
        save_llama(tmp_path / "hf2", mta_cfg, mta_params)


def test_cli_converts_and_a_train_config_continues_from_it(tmp_path, rng, capsys):
    """add-mta on a saved baseline, then configs/train/continue_mta.yaml trains 2 steps from the result."""
    config = ROOT / "configs/train/continue_mta.yaml"
    target_cfg = load_train_config(config).model
    baseline_cfg = target_cfg.baseline()
    params = random_params(baseline_cfg, rng)
    save_params(tmp_path / "baseline", baseline_cfg, params)
    out = tmp_path / "converted"
    mta_file = str(ROOT / "configs/mta/toy_pre_conv.yaml")
    assert (
        convert_main(["add-mta", "--from", str(tmp_path / "baseline"), "--to", str(out), "--mta", mta_file])
        == 0
    )
    printed = capsys.readouterr().out
    assert f"init_from: {out}" in printed and f"model: {out / 'model.yaml'}" in printed
    cfg, converted = load_params(out)
    assert cfg == target_cfg
    _, expected = add_mta(baseline_cfg, params, dict(pre_conv=(2, 5)))  # its logits: the tests above
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(converted), strict=True):
        np.testing.assert_array_equal(a, b)

    overrides = [
        f"init_from={out}",
        f"run_dir={tmp_path / 'run'}",
        "steps=2",
        "global_batch_size=4",
        "eval_batches=1",
        "log_every=1",
        "progress=false",
        "checkpoint.every=2",
        "checkpoint.async_save=false",
    ]
    result = train(load_train_config(config, overrides))
    assert result.step == 2 and np.isfinite(result.eval_loss)
    _, trained = load_params(tmp_path / "run")
    kernel = trained["layers"][0]["attention"]["pre_conv"]
    assert kernel.shape == (2, 2, 5) and not np.array_equal(
        kernel, converted["layers"][0]["attention"]["pre_conv"]
    )


def test_cli_reports_bad_requests(tmp_path, rng, capsys):
    save_params(tmp_path / "baseline", BASE, random_params(BASE, rng))
    source = str(tmp_path / "baseline")
    gate = '{"pre_conv": [2, 3], "gate": "scalar"}'
    assert convert_main(["add-mta", "--from", source, "--to", str(tmp_path / "o"), "--mta", gate]) == 2
    err = capsys.readouterr().err  # the command line's flag, not add_mta's keyword
    assert "error: mta=" in err and "pass --allow-function-change to accept" in err
    assert "allow_function_change=True" not in err
    assert not (tmp_path / "o").exists()
    args = ["add-mta", "--from", source, "--to", str(tmp_path / "o"), "--mta", "{pre_conv: [2, 3]}"]
    assert convert_main([*args, "--kq-conv-layers", "1,x"]) == 2
    assert "--kq-conv-layers='1,x' is invalid" in capsys.readouterr().err
    assert convert_main(args) == 0
    assert load_params(tmp_path / "o")[0].kq_conv_layers is None
    layer_1 = [*args, "--kq-conv-layers", "1"]
    assert convert_main(layer_1) == 2  # parameters there: the flag that replaces them, not the keyword
    err = capsys.readouterr().err
    assert "already holds parameters; pass --overwrite to replace them" in err and "overwrite=True" not in err
    assert load_params(tmp_path / "o")[0].kq_conv_layers is None
    assert convert_main([*layer_1, "--overwrite"]) == 0
    assert load_params(tmp_path / "o")[0].kq_conv_layers == (1,)
    assert convert_main(["export-llama", "--from", str(tmp_path / "o"), "--to", str(tmp_path / "hf")]) == 2
    assert "no place for the MTA parameters layers/1/attention/pre_conv" in capsys.readouterr().err
    assert (
        convert_main(["import-llama", "--hf-dir", str(tmp_path / "nothing"), "--to", str(tmp_path / "x")])
        == 2
    )
    assert "has no config.json" in capsys.readouterr().err


def test_export_refuses_a_non_empty_directory_and_its_own_input(tmp_path, rng, capsys):
    save_params(tmp_path / "baseline", BASE, random_params(BASE, rng))
    source, hf = str(tmp_path / "baseline"), tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")  # e.g. the Hugging Face model it came from
    export = ["export-llama", "--from", source, "--to", str(hf)]
    assert convert_main(export) == 2
    assert "the directory is not empty; pass --overwrite" in capsys.readouterr().err
    assert (hf / "config.json").read_text() == "{}" and not (hf / "model.safetensors").exists()
    assert convert_main([*export, "--overwrite"]) == 0
    assert load_llama(hf)[0].dim == BASE.dim

    before = {p: p.read_bytes() for p in (tmp_path / "baseline").rglob("*") if p.is_file()}
    own = ["export-llama", "--from", source, "--to", source + "/.", "--overwrite"]
    assert convert_main(own) == 2
    assert "it is the input directory (--from)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "baseline").rglob("*") if p.is_file()} == before
