"""Hugging Face Llama import/export (mta_jax/hf_llama.py) against transformers' own LlamaForCausalLM.

Needs the `hf` extra (CPU torch + transformers); skipped without it. Checkpoints are tiny random models
written to tmp_path; nothing is fetched (HF_HUB_OFFLINE is set before transformers is imported).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mta_jax import ModelConfig
from mta_jax.convert import add_mta
from mta_jax.hf_llama import load_llama, save_llama
from tests.test_convert import logits, random_params

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# rope scaling with a short original context, so that 40-token inputs reach the scaled frequencies
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
SEQ_LEN = 40


def hf_model(seed: int, *, tied: bool, rope_scaling=LLAMA3_ROPE):
    """A random LlamaForCausalLM: hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 100, vocab 97;
    weights redrawn with std 0.2 and norm weights around 1 so that every part matters to the logits."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=100,  # not a multiple of 256: needs ffn_hidden_dim_override
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        rope_theta=5000.0,
        rope_scaling=rope_scaling,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untied checkpoint on disk (and its model) for the tests that damage copies of it."""
    directory = tmp_path_factory.mktemp("hf") / "llama"
    model = hf_model(0, tied=False)
    model.save_pretrained(directory, safe_serialization=True)
    return directory, model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_import_add_mta_and_export_keep_transformers_logits(tied, seed, rng, tmp_path):
    model = hf_model(seed, tied=tied)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tokens = rng.integers(0, 97, (2, SEQ_LEN))
    reference = hf_logits(model, tokens)

    cfg, params = load_llama(tmp_path / "hf")
    assert (cfg.tie_embeddings, cfg.ffn_hidden_dim, cfg.num_kv_heads, cfg.rope_style) == (
        tied,
        100,
        2,
        "half",
    )
    assert cfg.rope_scaling.original_max_position == 16 and cfg.rope_theta == 5000.0
    np.testing.assert_allclose(logits(cfg, params, tokens), reference, atol=1e-4, rtol=0)
    if not tied:  # the scaling bites at these lengths: without it the logits differ
        unscaled = dataclasses.replace(cfg, rope_scaling=None)
        assert np.abs(logits(unscaled, params, tokens) - reference).max() > 1e-3

    mta = dict(pre_conv=(2, 3), post_conv=(2, 3), pre_head_mix=2, post_head_mix=4)
    mta_cfg, mta_params = add_mta(cfg, params, mta, kq_conv_layers=[1])
    np.testing.assert_allclose(logits(mta_cfg, mta_params, tokens), reference, atol=1e-4, rtol=0)

    save_llama(tmp_path / "exported", cfg, params)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "exported", attn_implementation="eager"
    )
    np.testing.assert_allclose(hf_logits(reloaded.eval(), tokens), reference, atol=1e-5, rtol=0)


def test_a_native_interleaved_model_exports_to_transformers(rng, tmp_path):
    """Our default RoPE layout ("interleaved") is permuted into HF's half rotation on export."""
    cfg = ModelConfig(
        vocab_size=31, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, rope_scaling={"kind": "linear"}
    )
    params = random_params(cfg, rng)
    tokens = rng.integers(0, 31, (2, 24))
    save_llama(tmp_path / "hf", cfg, params)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(model.eval(), tokens), logits(cfg, params, tokens), atol=1e-4)


def test_sharded_bfloat16_checkpoints_load_every_tensor(checkpoint, tmp_path):
    _, model = checkpoint
    model.to(torch.bfloat16).save_pretrained(
        tmp_path / "bf16", safe_serialization=True, max_shard_size="40KB"
    )
    model.float()
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "bf16").glob("model-*-of-*.safetensors"))) > 1
    cfg, params = load_llama(tmp_path / "bf16")
    state = {name: t.to(torch.bfloat16).float().numpy() for name, t in model.state_dict().items()}
    np.testing.assert_array_equal(
        params["layers"][1]["attention"]["wk"]["kernel"], state["model.layers.1.self_attn.k_proj.weight"].T
    )
    np.testing.assert_array_equal(
        params["layers"][0]["feed_forward"]["w1"]["kernel"], state["model.layers.0.mlp.gate_proj.weight"].T
    )
    np.testing.assert_array_equal(params["output"]["kernel"], state["lm_head.weight"].T)
    assert params["norm"]["scale"].dtype == np.float32
    _, half = load_llama(tmp_path / "bf16", dtype="bfloat16")
    assert half["norm"]["scale"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(half["norm"]["scale"].astype(np.float32), state["model.norm.weight"])


def _copy(checkpoint, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(checkpoint[0], directory)
    return directory


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = dict(load_file(path))
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_bad_checkpoints_fail_with_a_clear_message(checkpoint, tmp_path):
    directory = _copy(checkpoint, tmp_path)
    (directory / "config.json").rename(directory / "config.bak")
    with pytest.raises(ValueError, match="it has no config.json"):
        load_llama(directory)
    (directory / "config.bak").rename(directory / "config.json")

    (directory / "model.safetensors").rename(directory / "weights.bak")
    with pytest.raises(ValueError, match="no safetensors weights .*found no weight files"):
        load_llama(directory)
    (directory / "weights.bak").rename(directory / "model.safetensors")

    _edit_tensors(
        directory,
        lambda t: t.update(
            {"model.layers.0.mlp.upp_proj.weight": t.pop("model.layers.0.mlp.up_proj.weight")}
        ),
    )
    with pytest.raises(
        ValueError,
        match="missing model.layers.0.mlp.up_proj.weight; unexpected model.layers.0.mlp.upp_proj.weight",
    ):
        load_llama(directory)

    directory = _copy(checkpoint, tmp_path / "b")
    _edit_tensors(
        directory,
        lambda t: t.update(
            {"model.layers.1.self_attn.k_proj.weight": t["model.layers.1.self_attn.k_proj.weight"][:16]}
        ),
    )
    with pytest.raises(
        ValueError,
        match=r"model.layers.1.self_attn.k_proj.weight .* has shape \(16, 64\), the config needs \(32, 64\)",
    ):
        load_llama(directory)


def test_unsupported_configs_are_named(checkpoint, tmp_path):
    directory = _copy(checkpoint, tmp_path)
    for change, message in [
        ({"attention_bias": True}, "attention_bias=True is invalid: our model has no biases"),
        ({"mlp_bias": True}, "mlp_bias=True is invalid"),
        ({"model_type": "mistral"}, "model_type='mistral' is invalid: only Hugging Face Llama"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is invalid"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None},
            "rope_type='yarn' is invalid",
        ),
        (
            {"tie_word_embeddings": True},
            "lm_head.weight is invalid: it differs from model.embed_tokens.weight",
        ),
    ]:
        original = (directory / "config.json").read_text()
        _edit_config(directory, **change)
        with pytest.raises(ValueError, match=message):
            load_llama(directory)
        (directory / "config.json").write_text(original)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match="lists the shard model-00002-of-00002.safetensors, which is missing"
    ):
        load_llama(directory)
