"""Parameters on disk (train/params_io.py) and starting a run from them (TrainConfig.init_from)."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_helpers import TINY
from train.config import train_config_from_dict
from train.loop import train
from train.params_io import check_params, load_model, load_params, model_from_params, save_params


def _run(tmp_path, name, **overrides):
    raw = {**TINY, "run_dir": str(tmp_path / name), "steps": 2, **overrides}
    raw["checkpoint"] = {"every": 2, "keep": 2, "async_save": False}
    return train(train_config_from_dict(raw))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("params_io")
    _run(tmp_path, "a")
    return tmp_path


def _equal(a, b) -> bool:
    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(flat_a) != len(flat_b):
        return False
    return all(np.array_equal(x, y) for x, y in zip(flat_a, flat_b, strict=True))


def test_a_run_directory_and_a_parameter_directory_load_the_same_model(trained, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        cfg, params = load_params(trained / "a")
    assert "Metadata file does not exist" not in caplog.text  # Orbax's noise about the state item
    assert cfg == train_config_from_dict({**TINY}).model
    save_params(tmp_path / "p", cfg, params)
    cfg2, params2 = load_params(tmp_path / "p")
    assert cfg2 == cfg and _equal(params, params2)

    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    from_run = load_model(trained / "a")(tokens)
    from_dir = model_from_params(cfg2, params2)(tokens)
    np.testing.assert_array_equal(from_run, from_dir)
    # eval mode: dropout (rate 0.1 in TINY) is off, so two calls agree
    np.testing.assert_array_equal(from_run, load_model(trained / "a")(tokens))
    ref = load_model(trained / "a", attention_implementation="reference", dtype="float32")(tokens)
    np.testing.assert_allclose(from_run, ref, atol=1e-5)


def test_bad_paths_steps_and_shapes_are_named(trained, tmp_path):
    with pytest.raises(ValueError, match="neither a parameter directory"):
        load_params(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"step=3 is invalid: .* steps \[2\]"):
        load_params(trained / "a", step=3)
    cfg, params = load_params(trained / "a")
    with pytest.raises(ValueError, match=r"tok_embeddings/embedding has shape \(31, 32\), the model needs"):
        check_params(dataclasses.replace(cfg, vocab_size=40), params)
    params["layers"][1]["attention"].pop("pre_conv")
    with pytest.raises(ValueError, match="missing layers/1/attention/pre_conv "):
        save_params(tmp_path / "p", cfg, params)
    save_params(tmp_path / "q", *load_params(trained / "a"))
    with pytest.raises(ValueError, match="already holds parameters; pass overwrite=True to replace them"):
        save_params(tmp_path / "q", *load_params(trained / "a"))


def test_init_from_starts_a_new_run_at_the_saved_parameters(trained, tmp_path):
    _, saved = load_params(trained / "a")
    # warm-up from a learning rate of 0: the one step leaves the parameters where they started
    _run(tmp_path, "b", steps=1, init_from=str(trained / "a"), optimizer={"warmup_steps": 5})
    _, started = load_params(tmp_path / "b")
    assert _equal(saved, started)
    fresh = jax.tree.leaves(load_params(tmp_path / "b")[1])
    assert all(jnp.isfinite(x).all() for x in fresh)


def test_init_from_with_another_shape_is_a_clear_error(trained, tmp_path):
    model = {**TINY["model"], "dim": 48}
    with pytest.raises(ValueError, match=r"init_from=.* is invalid: .*has shape"):
        _run(tmp_path, "c", model=model, init_from=str(trained / "a"))


def test_a_corrupt_parameter_directory_is_one_error(trained, tmp_path):
    save_params(tmp_path / "p", *load_params(trained / "a"))
    for path in (tmp_path / "p" / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"checkpoint='.*p' is invalid: its parameters cannot be read \("):
        load_params(tmp_path / "p")
