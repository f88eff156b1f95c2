"""train/pictures.py: the attention weights it draws, and its CLI end to end on tiny checkpoints."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from matplotlib import image as mpimg

from mta_jax.config import ModelConfig
from mta_jax.layers import MTA_PARAM_NAMES
from mta_jax.masks import default_positions
from mta_jax.model import MTATransformer
from mta_jax.params import MTAParams
from tests.helpers import random_mta_params
from tests.loops import conv_loop, mix_loop, softmax_rows
from tests.train_helpers import ROOT
from train import toy
from train.attention_maps import (
    attention_inputs,
    layer_attention_maps,
    output_from_weights,
    queries_keys_values,
)
from train.config import TrainConfig, dump
from train.data import TOY_EVAL_START, DataConfig
from train.params_io import load_params, save_params
from train.pictures import ToyTokens, choose_tokens, main, parse_indices, picture_input

DATA = ROOT / "tests" / "data"
# Every MTA part on; the key-query conv only in layer 1, so layer 0 has head mixing alone.
FULL = ModelConfig(
    vocab_size=31,
    dim=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    kq_conv_layers=(1,),
    attention_implementation="reference",
    mta={
        "pre_conv": (2, 3),
        "post_conv": (3, 3),
        "pre_head_mix": 4,
        "post_head_mix": 2,
        "group_norm": True,
        "gate": "scalar",
    },
)
PRE_CONV_ONLY = ModelConfig(
    vocab_size=31,
    dim=32,
    num_layers=2,
    num_heads=2,
    attention_implementation="reference",
    mta={"pre_conv": (3, 5)},
)


def _model(cfg: ModelConfig, rng: np.random.Generator, *, random_mta: bool = True) -> MTATransformer:
    """A fresh model in eval mode; random_mta: every MTA parameter random instead of the identity."""
    model = MTATransformer(cfg, rngs=nnx.Rngs(int(rng.integers(2**31))))
    if random_mta:
        for block in model.layers:
            attention = block.attention
            values = random_mta_params(attention.mta, attention.num_heads, attention.head_dim, rng)
            for name in MTA_PARAM_NAMES:
                if getattr(values, name) is not None:
                    getattr(attention, name)[...] = getattr(values, name)
    model.eval()
    return model


def _tokens(rng: np.random.Generator, length: int = 14) -> jnp.ndarray:
    return jnp.asarray(rng.integers(0, 31, (1, length)), jnp.int32)


@nnx.jit
def _layer_results(model: MTATransformer, tokens: jnp.ndarray) -> list[dict]:
    """Per layer: the weights, q and k, the layer's own output and the outputs rebuilt from the weights."""
    positions = default_positions(tokens.shape[1], None)
    results = []
    for block, x in zip(model.layers, attention_inputs(model, tokens), strict=True):
        attention = block.attention
        maps = layer_attention_maps(attention, x)
        q, k, _ = queries_keys_values(attention, x)
        results.append(
            {
                "before": maps.before,
                "after": maps.after,
                "q": q,
                "k": k,
                "output": attention(x, positions=positions, deterministic=True),
                "from_after": output_from_weights(attention, x, maps.after),
                "from_before": output_from_weights(attention, x, maps.before),
            }
        )
    return results


def _loop_weights(q, k, params: MTAParams, pad_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(before, after) [H, T, T] by the float64 loops of tests/loops.py; q: [T, H, D], k: [T, Hkv, D]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    p = {name: None if v is None else np.asarray(v, np.float64) for name, v in vars(params).items()}
    seq_len, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    visible = np.tril(np.ones((seq_len, seq_len), bool))
    scores = np.stack([q[:, h] @ k[:, h // group].T / np.sqrt(head_dim) for h in range(num_heads)])
    before = np.stack([softmax_rows(s, visible) for s in scores])
    if p["pre_conv"] is not None:
        scores = np.stack(
            [
                conv_loop(np.where(visible, s, 0.0), w, pad_key)
                for s, w in zip(scores, p["pre_conv"], strict=True)
            ]
        )
    if p["pre_head_mix"] is not None:
        scores = mix_loop(scores, p["pre_head_mix"])
    after = np.stack([softmax_rows(s, visible) for s in scores])
    if p["post_conv"] is not None:
        after = np.stack(
            [
                np.where(visible, conv_loop(s, w, pad_key), 0.0)
                for s, w in zip(after, p["post_conv"], strict=True)
            ]
        )
    if p["post_head_mix"] is not None:
        after = mix_loop(after, p["post_head_mix"])
    return before, after


@pytest.mark.parametrize("cfg", [FULL, PRE_CONV_ONLY], ids=["full", "pre_conv_only"])
def test_weights_match_float64_loops_and_reproduce_the_layer_output(cfg, rng):
    model = _model(cfg, rng)
    for block, result in zip(model.layers, _layer_results(model, _tokens(rng)), strict=True):
        attention = block.attention
        before, after = _loop_weights(
            result["q"][0], result["k"][0], attention.mta_params(), attention.mta.pad_key
        )
        np.testing.assert_allclose(result["before"][0], before, atol=2e-5)
        np.testing.assert_allclose(result["after"][0], after, atol=2e-5)
        # The layer's own forward: "after" times V must give its output, "before" must not.
        np.testing.assert_allclose(result["from_after"], result["output"], atol=2e-5)
        assert not np.allclose(result["from_before"], result["output"], atol=1e-3)


def test_identity_mta_parameters_change_nothing(rng):
    model = _model(FULL, rng, random_mta=False)
    for result in _layer_results(model, _tokens(rng)):
        np.testing.assert_allclose(result["after"], result["before"], atol=1e-6)
        np.testing.assert_allclose(result["from_after"], result["output"], atol=2e-5)


def test_pre_conv_weights_are_causal_distributions(rng):
    model = _model(PRE_CONV_ONLY, rng)
    for result in _layer_results(model, _tokens(rng)):  # the length of the test above: no new compile
        for weights in (result["before"], result["after"]):
            weights = np.asarray(weights)
            assert weights.shape == (1, 2, 14, 14)
            np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
            assert (weights >= 0).all()
            assert (np.triu(weights[0], 1) == 0).all()  # no weight on a future key
        assert not np.allclose(result["before"], result["after"], atol=1e-3)  # the random kernels act


def _parameter_dir(directory, cfg, rng, *, random_mta=True):
    model = _model(cfg, rng, random_mta=random_mta)
    return save_params(directory, cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _run_dir(directory, cfg, rng, step, seed, data=None):
    """A training run directory as train/loop.py leaves it: config.yaml and checkpoints/<step>/state."""
    from train.checkpoint import CheckpointConfig, Checkpointer

    model = _model(cfg, rng)
    data = DataConfig(kind="toy", seq_len=24, toy_block_size=3) if data is None else data
    directory.mkdir()
    (directory / "config.yaml").write_text(dump(TrainConfig(model=cfg, data=data, seed=seed)))
    with Checkpointer(directory / "checkpoints", CheckpointConfig(async_save=False)) as checkpointer:
        checkpointer.save(step, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}, force=True)
    return directory


def _check_png(path, min_side=150, max_side=4000):
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert min_side <= pixels.shape[0] <= max_side and min_side <= pixels.shape[1] <= max_side
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    return pixels.shape


def _record_colour_scales(monkeypatch) -> dict[str, set]:
    """{file name: {(colour map, (vmin, vmax)) of each heatmap}}, filled as train.drawing saves figures."""
    from train import drawing

    scales, save = {}, drawing._save

    def record(fig, plt, title, path):
        images = [image for ax in fig.axes for image in ax.get_images()]
        scales[Path(path).name] = {(image.get_cmap().name, tuple(image.get_clim())) for image in images}
        save(fig, plt, title, path)

    monkeypatch.setattr(drawing, "_save", record)
    return scales


def test_cli_draws_kernels_head_mixing_and_attention_maps(tmp_path, rng, capsys, monkeypatch):
    checkpoint = _parameter_dir(tmp_path / "params", FULL, rng)
    out = tmp_path / "pictures"
    scales = _record_colour_scales(monkeypatch)
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--text", "abc.dbe#ab"]) == 0
    index = json.loads((out / "index.json").read_text())
    names = [entry["file"] for entry in index["files"]]
    expected = ["kernels_pre.png", "kernels_post.png", "head_mix.png", "attention_layer0.png"]
    assert names == [*expected, "attention_layer1.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "index.json"])
    assert index["tokens"] == list("^abc.dbe#ab") and index["heads"] == [0, 1, 2, 3]
    shapes = {name: _check_png(out / name) for name in names}
    # kernels: one row (layer 1) of four heads; attention: four rows (heads) of two panels
    assert shapes["kernels_pre.png"][1] > 3 * shapes["kernels_pre.png"][0]
    assert 1.5 < shapes["attention_layer1.png"][0] / shapes["attention_layer1.png"][1] < 2.5
    assert all(p.stat().st_size < 300_000 for p in out.iterdir())
    assert "kernels_pre.png" in capsys.readouterr().out
    # one colour map and one scale per figure; the kernels' and head mixing's symmetric about 0 and as
    # wide as the largest drawn entry (random MTA parameters: each head's own range differs)
    assert set(scales) == set(names) and all(len(scale) == 1 for scale in scales.values()), scales
    layers = load_params(checkpoint)[1]["layers"]
    mixes = [layers[i]["attention"][f"{kind}_head_mix"] for i in (0, 1) for kind in ("pre", "post")]
    for name, values in [
        ("kernels_pre.png", [layers[1]["attention"]["pre_conv"]]),
        ("kernels_post.png", [layers[1]["attention"]["post_conv"]]),
        ("head_mix.png", mixes),
    ]:
        [(cmap, (low, high))] = scales[name]
        limit = max(float(np.abs(np.asarray(v)).max()) for v in values)
        assert cmap == "RdBu_r" and low == -high and high == pytest.approx(limit, rel=1e-6), name


def test_cli_draws_a_toy_sample_of_a_run_directory_for_chosen_layers_and_heads(tmp_path, rng):
    run = _run_dir(tmp_path / "run", PRE_CONV_ONLY, rng, step=7, seed=5)
    out = tmp_path / "pictures"
    argv = ["--checkpoint", str(run), "--out", str(out), "--toy-sample", "3", "--layers", "1", "--heads", "1"]
    assert main(argv) == 0
    index = json.loads((out / "index.json").read_text())
    text = DataConfig(kind="toy", seq_len=24, toy_block_size=3).toy_task().text(5, TOY_EVAL_START + 3)
    assert index["input"] == f"toy sample 3: {text}" and index["tokens"] == list("^" + text)
    assert index["step"] == 7 and index["layers"] == [1] and index["heads"] == [1]
    assert [entry["file"] for entry in index["files"]] == ["kernels.png", "attention_layer1.png"]
    height, width = _check_png(out / "kernels.png", min_side=100)[:2]
    assert width > height  # one kernel of 3 x 5 taps
    height, width = _check_png(out / "attention_layer1.png")[:2]
    assert height < 0.8 * width  # one row (head) of two panels


def test_a_text_run_draws_its_first_held_out_document_without_text(tmp_path, rng):
    """--text defaults to the run's own text: the first held-out document of data.path (eval_fraction 0.5
    of the 4 documents of heldout_tiny.txt: the third), cut to --max-tokens."""
    path = str(DATA / "heldout_tiny.txt")
    data = DataConfig(kind="text", path=path, eval_fraction=0.5, seq_len=32)
    cfg = dataclasses.replace(PRE_CONV_ONLY, vocab_size=259)  # bytes, BOS, EOS, pad
    run = _run_dir(tmp_path / "run", cfg, rng, step=2, seed=0, data=data)
    out = tmp_path / "pictures"
    assert main(["--checkpoint", str(run), "--out", str(out), "--layers", "1", "--max-tokens", "12"]) == 0
    index = json.loads((out / "index.json").read_text())
    document = (DATA / "heldout_tiny.txt").read_text().split("\n\n")[2]
    assert index["input"].startswith(f"held-out document 0 of data.path={path}: {document}")
    assert index["input"].endswith(f" (first 12 of {len(document.encode()) + 2} tokens)")
    assert index["tokens"] == ["<s>", *document[:11].replace(" ", "\u2423")]


def test_cli_on_a_baseline_draws_attention_and_says_there_are_no_kernels(tmp_path, rng, capsys):
    checkpoint = _parameter_dir(tmp_path / "params", PRE_CONV_ONLY.baseline(), rng, random_mta=False)
    out = tmp_path / "pictures"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--max-tokens", "12"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert [entry["file"] for entry in index["files"]] == ["attention_layer0.png", "attention_layer1.png"]
    assert "baseline" in index["notes"][0] and "note: no key-query convolution" in capsys.readouterr().out
    # a parameter directory of the toy vocabulary: a toy sample, cut to --max-tokens
    assert index["input"].startswith("toy sample 0: ") and "(first 12 of " in index["input"]
    assert len(index["tokens"]) == 12 and index["tokens"][0] == "^"
    height, width = _check_png(out / "attention_layer1.png")[:2]
    assert height > 1.5 * width  # two rows (heads) of one panel each


def test_errors_name_the_argument(tmp_path, rng, capsys):
    checkpoint = _parameter_dir(tmp_path / "params", PRE_CONV_ONLY, rng)
    out = str(tmp_path / "out")
    cli_cases = [
        (["--checkpoint", str(tmp_path / "missing")], "checkpoint='.*missing' is invalid: no such directory"),
        (["--checkpoint", str(tmp_path)], r"checkpoint='.*' is invalid: neither a parameter directory"),
        (
            ["--checkpoint", str(checkpoint), "--layers", "0,2"],
            r"layers='0,2' is invalid: layer index 2 is out of range \[0, 2\)",
        ),
        (
            ["--checkpoint", str(checkpoint), "--text", "Hi!"],
            r"text='Hi!' is invalid: characters \['!', 'H'\] are not in",
        ),
    ]
    for argv, message in cli_cases:
        assert main([*argv, "--out", out]) == 2
        assert re.search(f"error: {message}", capsys.readouterr().err), argv

    with pytest.raises(ValueError, match="heads='x' is invalid: must be comma-separated integers"):
        parse_indices("heads", "x", 4, "head")
    with pytest.raises(ValueError, match=r"heads='1,4' is invalid: head index 4 is out of range \[0, 4\)"):
        parse_indices("heads", "1,4", 4, "head")

    def make(text=None, toy_sample=None, tokens=None):
        tokens = ToyTokens() if tokens is None else tokens
        return picture_input(checkpoint, tokens, 31, text=text, toy_sample=toy_sample, max_tokens=8)

    with pytest.raises(ValueError, match="text='' is invalid: must hold at least one character"):
        make(text="")
    with pytest.raises(ValueError, match="toy_sample=-1 is invalid: must be >= 0"):
        make(toy_sample=-1)
    byte_tokens = choose_tokens(checkpoint, "byte", 31)
    with pytest.raises(
        ValueError, match="text='ab' is invalid: token id 257 is outside the model's vocab_size=31"
    ):
        make(text="ab", tokens=byte_tokens)
    with pytest.raises(ValueError, match="text=None is invalid: the checkpoint is neither a toy-task model"):
        make(tokens=byte_tokens)
    with pytest.raises(
        ValueError, match="tokenizer=None is invalid: .* vocab_size=1000 and no tokenizer.json"
    ):
        choose_tokens(checkpoint, None, 1000)


def test_toy_text_gets_a_bos_unless_it_has_one():
    assert toy.decode(ToyTokens().encode("ab#a")) == "^ab#a"
    assert toy.decode(ToyTokens().encode("^ab#a")) == "^ab#a"


def test_drawing_does_not_import_pictures():
    """pictures.py imports drawing.py; drawing.py (PictureInput included) must not import it back, not
    even for type checking, so that neither module needs the other to be loaded first."""
    import ast

    from train import drawing, pictures

    tree = ast.parse(Path(drawing.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert "train.pictures" not in imported
    assert pictures.PictureInput is drawing.PictureInput
