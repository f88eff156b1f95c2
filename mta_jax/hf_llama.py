"""Hugging Face LlamaForCausalLM checkpoints (a local directory) to and from our model's parameters.

A checkpoint directory holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json. Tensors are read and written with safetensors' numpy API (bfloat16 through
ml_dtypes), so neither torch nor transformers is needed, and nothing is ever fetched from a hub.

    cfg, params = load_llama("Llama-3.2-1B")           # ModelConfig (rope_style "half"), nested dict
    model = train.params_io.model_from_params(cfg, params)
    save_llama("out/hf", cfg, params)                   # LlamaForCausalLM.from_pretrained("out/hf") loads it

Names: q/k/v/o_proj = attention wq/wk/wv/wo, gate_proj = w1, up_proj = w3, down_proj = w2 (HF weights
[out, in] are our kernels [in, out] transposed), input_layernorm = attention_norm, post_attention_layernorm
= ffn_norm, model.norm = norm, embed_tokens = tok_embeddings, lm_head = output (absent when tied).
HF's RoPE rotates pairs (i, i + D/2), our "half" style, so imported q/k weights are used as they are;
exporting an "interleaved" model permutes each head's q/k output columns into that order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from mta_jax.config import ModelConfig
from mta_jax.rope import RopeScaling

PyTree = Any
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some older checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DEFAULT_MAX_POSITIONS = 8192  # HF records a maximum length; our model has none
DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------- config


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32") -> ModelConfig:
    """Our ModelConfig (rope_style "half", no MTA) for a Hugging Face Llama config.json mapping."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise ValueError(
            f"model_type={model_type!r} is invalid: only Hugging Face Llama checkpoints (model_type "
            "'llama', LlamaForCausalLM) can be imported"
        )
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            raise ValueError(
                f"{field}={hf[field]!r} is invalid: our model has no biases in its attention and MLP "
                "projections (only attention_bias=false, mlp_bias=false checkpoints are supported)"
            )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is invalid: our FFN is SwiGLU (silu)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: must be one of {DTYPES}")
    missing = [
        key
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        if key not in hf
    ]
    if missing:
        raise ValueError(f"{CONFIG_FILE} is invalid: it has no {', '.join(missing)}")
    theta, scaling = _rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_hidden_dim_override=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_style="half",
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=dtype,
    )


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from transformers 5's rope_parameters or 4's rope_theta + rope_scaling."""
    parameters = hf.get("rope_parameters")
    if isinstance(parameters, Mapping) and parameters:
        theta, scaling = parameters.get("rope_theta", hf.get("rope_theta", 10_000.0)), parameters
    else:
        theta, scaling = hf.get("rope_theta", 10_000.0), hf.get("rope_scaling")
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    if kind == "linear":
        return float(theta), RopeScaling(kind="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        return float(theta), RopeScaling(
            kind="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position=int(scaling["original_max_position_embeddings"]),
        )
    raise ValueError(
        f"rope_scaling rope_type={kind!r} is invalid: supported are 'default', 'linear' and 'llama3'"
    )


def config_to_hf(cfg: ModelConfig, *, max_position_embeddings: int | None = None) -> dict[str, Any]:
    """The config.json mapping of a LlamaForCausalLM equal to our (MTA-free) model of `cfg`.

    RoPE is written in transformers 4's keys (rope_theta, rope_scaling), which transformers 5 reads too.
    max_position_embeddings: recorded only (default: original_max_position * factor with llama3 scaling,
    else DEFAULT_MAX_POSITIONS).
    """
    scaling = cfg.rope_scaling
    if max_position_embeddings is None:
        max_position_embeddings = DEFAULT_MAX_POSITIONS
        if scaling is not None and scaling.kind == "llama3":
            max_position_embeddings = int(scaling.original_max_position * scaling.factor)
    hf_scaling = None
    if scaling is not None and scaling.kind == "linear":
        hf_scaling = {"rope_type": "linear", "factor": scaling.factor}
    elif scaling is not None:
        hf_scaling = {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": hf_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": cfg.param_dtype,
    }


# ------------------------------------------------------------------------------------------- tensors


def tensor_map(cfg: ModelConfig) -> dict[str, tuple[tuple, bool]]:
    """{HF tensor name: (path of our parameter in the nested dict, transposed?)} for a model of `cfg`."""
    names = {"model.embed_tokens.weight": (("tok_embeddings", "embedding"), False)}
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        for proj, kernel in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")):
            names[f"{hf}self_attn.{proj}_proj.weight"] = ((*ours, "attention", kernel, "kernel"), True)
        for proj, kernel in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            names[f"{hf}mlp.{proj}_proj.weight"] = ((*ours, "feed_forward", kernel, "kernel"), True)
        names[f"{hf}input_layernorm.weight"] = ((*ours, "attention_norm", "scale"), False)
        names[f"{hf}post_attention_layernorm.weight"] = ((*ours, "ffn_norm", "scale"), False)
    names["model.norm.weight"] = (("norm", "scale"), False)
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = (("output", "kernel"), True)
    return names


def _our_shapes(cfg: ModelConfig) -> dict[tuple, tuple[int, ...]]:
    """{path: shape} of every parameter of a model of `cfg` (abstract: nothing is allocated)."""
    from mta_jax.model import MTATransformer

    abstract = nnx.eval_shape(lambda: MTATransformer(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))[0]
    return {tuple(getattr(k, "key", k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _hf_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    return tuple(reversed(shape)) if transposed else shape


def load_llama(directory: str | os.PathLike, *, dtype: str = "float32") -> tuple[ModelConfig, PyTree]:
    """(ModelConfig, params) of the LlamaForCausalLM checkpoint in the local `directory`.

    params: nested dict of numpy arrays in `dtype` (model_from_params / save_params take it).
    Raises ValueError for a missing config.json or weights, an unsupported config, a missing, extra or
    mis-shaped tensor (named with the shape found and the one expected).
    """
    from safetensors import safe_open

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"directory={str(directory)!r} is invalid: it has no {CONFIG_FILE}")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is invalid: not JSON ({error})") from None
    cfg = config_from_hf(hf, dtype=dtype)
    files = _tensor_files(directory)
    names = tensor_map(cfg)
    shapes = _our_shapes(cfg)
    tied_head = cfg.tie_embeddings and "lm_head.weight" in files
    missing = [name for name in names if name not in files]
    extra = [
        name
        for name in files
        if name not in names
        and not name.endswith(IGNORED_SUFFIXES)
        and not (tied_head and name == "lm_head.weight")
    ]
    if missing or extra:
        raise ValueError(
            f"the tensors in {directory} do not fit its {CONFIG_FILE}: "
            + "; ".join([f"missing {n}" for n in missing[:8]] + [f"unexpected {n}" for n in extra[:8]])
        )

    target = np.dtype(jax.numpy.dtype(dtype))
    params: dict = {}
    by_file: dict[Path, list[str]] = {}
    for name in [*names, *(["lm_head.weight"] if tied_head else [])]:
        by_file.setdefault(files[name], []).append(name)
    head = None
    for path, file_names in by_file.items():
        with safe_open(path, framework="np") as f:
            for name in file_names:
                found = tuple(f.get_slice(name).get_shape())
                if name == "lm_head.weight" and tied_head:
                    expected = (cfg.vocab_size, cfg.dim)
                else:
                    our_path, transposed = names[name]
                    expected = _hf_shape(shapes[our_path], transposed)
                if found != expected:
                    raise ValueError(
                        f"tensor {name} in {path.name} has shape {found}, the config needs {expected}"
                    )
                value = np.asarray(f.get_tensor(name)).astype(target)
                if name == "lm_head.weight" and tied_head:
                    head = value
                    continue
                _set(params, our_path, np.ascontiguousarray(value.T if transposed else value))
    if head is not None and not np.array_equal(head, params["tok_embeddings"]["embedding"]):
        raise ValueError(
            "lm_head.weight is invalid: it differs from model.embed_tokens.weight although "
            "tie_word_embeddings is true"
        )
    return cfg, params


def _tensor_files(directory: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a single-file or sharded checkpoint."""
    from safetensors import safe_open

    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.is_file():
        with safe_open(single, framework="np") as f:
            return dict.fromkeys(f.keys(), single)
    if not index.is_file():
        found = sorted(
            p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors")
        )
        raise ValueError(
            f"directory={str(directory)!r} is invalid: no safetensors weights ({WEIGHTS_FILE}, or shards "
            f"listed in {INDEX_FILE}); found {found or 'no weight files'}. PyTorch .bin checkpoints are not "
            "read: save them with save_pretrained(..., safe_serialization=True)"
        )
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, Mapping):
        raise ValueError(f"{index} is invalid: it has no weight_map")
    files: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        path = directory / shard
        if not path.is_file():
            raise ValueError(
                f"{index} is invalid: it lists the shard {shard}, which is missing in {directory}"
            )
        with safe_open(path, framework="np") as f:
            keys = set(f.keys())
        for name, listed in weight_map.items():
            if listed == shard and name not in keys:
                raise ValueError(f"{index} is invalid: it places {name} in {shard}, which does not hold it")
        files.update(dict.fromkeys(keys, path))
    return files


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple):
    for key in path:
        if key not in tree and isinstance(key, int) and str(key) in tree:
            key = str(key)
        tree = tree[key]
    return tree


def save_llama(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    params: PyTree,
    *,
    max_position_embeddings: int | None = None,
) -> Path:
    """Writes config.json and model.safetensors of the LlamaForCausalLM equal to our model `cfg` / `params`.

    Only models without MTA (Llama has no place for MTA parameters). Tensors keep their dtype; an
    "interleaved" RoPE model has its q/k projections permuted to HF's half-rotation order.
    """
    from safetensors.numpy import save_file

    if cfg.mta is not None:
        mta_names = [
            "/".join(str(k) for k in path)
            for path in _our_shapes(cfg)
            if path[0] == "layers" and path[2] == "attention" and not str(path[3]).startswith("w")
        ]
        raise ValueError(
            f"cfg.mta={cfg.mta!r} is invalid for a Llama export: Hugging Face's LlamaForCausalLM has no "
            f"place for the MTA parameters {', '.join(mta_names)}; only models with mta=None export"
        )
    names = tensor_map(cfg)
    shapes = _our_shapes(cfg)
    tensors = {}
    problems = []
    for name, (path, transposed) in names.items():
        try:
            value = np.asarray(_get(params, path))
        except (KeyError, TypeError):
            problems.append(f"missing {'/'.join(map(str, path))}")
            continue
        if value.shape != shapes[path]:
            problems.append(
                f"{'/'.join(map(str, path))} has shape {value.shape}, the config needs {shapes[path]}"
            )
            continue
        if cfg.rope_style == "interleaved" and path[-2] in ("wq", "wk"):
            value = _interleaved_to_half(value, cfg.head_dim)
        tensors[name] = np.ascontiguousarray(value.T if transposed else value)
    if problems:
        raise ValueError(f"the parameters do not fit the model config: {'; '.join(problems[:8])}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(cfg, max_position_embeddings=max_position_embeddings)
    (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    return directory


def _interleaved_to_half(kernel: np.ndarray, head_dim: int) -> np.ndarray:
    """q/k kernel [dim, heads * D] with each head's outputs reordered from pairs (2i, 2i+1) to (i, i + D/2).

    The same permutation on q and k leaves q.k unchanged, and pair i keeps its frequency."""
    order = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    dim = kernel.shape[0]
    return kernel.reshape(dim, -1, head_dim)[:, :, order].reshape(dim, -1)
