"""Adding MTA to a trained baseline model: new MTA parameters at the identity, every old parameter kept.

The key-query convolutions (pre and post softmax) and the head mixing start at the identity and leave the
model's function unchanged, so the converted model gives the same logits and can be trained further (the
paper's Table 10 recipe). Group norm, depth scaling, the output gate and non-causal attention change the
function at initialisation; add_mta refuses them unless allow_function_change=True.

    new_cfg, new_params = add_mta(cfg, params, MTAConfig(pre_conv=(6, 11)), kq_conv_layers=(2, 6))
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mta_jax.config import ModelConfig, MTAConfig, mta_config_from_dict
from mta_jax.params import init_mta_params

PyTree = Any
log = logging.getLogger(__name__)

# The MTA options that change the model's output at initialisation, and why.
FUNCTION_CHANGING = {
    "group_norm": "the per-head RMSNorm rescales every head's output",
    "depth_scaling": "the output is multiplied by 1 - lambda_init(layer) < 1",
    "gate": "the output is multiplied by sigmoid(g(out)), about 0.5 at initialisation",
    "causal": "causal=False lets every query see later keys",
}


class FunctionChangeError(ValueError):
    """add_mta refuses MTA options that change the model's output; `option` names what accepts them
    (a command line says its own flag: error.for_option("--allow-function-change"))."""

    def __init__(self, mta: MTAConfig, parts: Sequence[str], option: str = "allow_function_change=True"):
        self.mta, self.parts, self.option = mta, list(parts), option
        super().__init__(
            f"mta={mta!r} is invalid for a conversion that keeps the logits: {', '.join(parts)} change the "
            f"model's output at initialisation ({_reasons(parts)}). Leave them out, or pass {option} to "
            "accept a converted model that differs from the baseline"
        )

    def for_option(self, option: str) -> FunctionChangeError:
        return FunctionChangeError(self.mta, self.parts, option)


def _reasons(parts: Sequence[str]) -> str:
    return "; ".join(f"{name}: {FUNCTION_CHANGING[name]}" for name in parts)


def function_changing_parts(mta: MTAConfig) -> list[str]:
    """The names of the options of `mta` that make the converted model differ from the baseline."""
    parts = [name for name in ("group_norm", "depth_scaling") if getattr(mta, name)]
    if mta.gate is not None:
        parts.append("gate")
    if not mta.causal:
        parts.append("causal")
    return parts


def add_mta(
    cfg: ModelConfig,
    params: PyTree,
    mta: MTAConfig | Mapping[str, Any],
    *,
    kq_conv_layers: Sequence[int] | None = None,
    seed: int = 0,
    allow_function_change: bool = False,
) -> tuple[ModelConfig, PyTree]:
    """(new_cfg, new_params): the baseline `cfg` / `params` with the MTA parts of `mta` on every layer.

    params: nested dict of arrays (nnx.to_pure_dict of the model's nnx.Param state); not modified.
    kq_conv_layers: 0-based layers that get mta.pre_conv / mta.post_conv (None: all), as in ModelConfig.
    seed: the key of the gate's random kernel (only with allow_function_change and a gate).
    allow_function_change: accept group_norm, depth_scaling, gate and causal=False (logged as a warning).
    """
    if cfg.mta is not None:
        raise ValueError(
            f"cfg.mta={cfg.mta!r} is invalid: the model already has MTA; add_mta converts a baseline "
            "model (mta=None)"
        )
    if isinstance(mta, Mapping):
        mta = mta_config_from_dict(mta)
    if not isinstance(mta, MTAConfig):
        raise ValueError(f"mta={mta!r} is invalid: must be an MTAConfig or a mapping of its fields")
    mta.check_heads(cfg.num_heads, cfg.num_kv_heads)
    kq_conv_layers = _check_layers(kq_conv_layers, cfg.num_layers, mta)
    changing = function_changing_parts(mta)
    if changing:
        if not allow_function_change:
            raise FunctionChangeError(mta, changing)
        reasons = _reasons(changing)
        log.warning("add_mta: the converted model's output differs from the baseline's (%s)", reasons)
    _check_baseline_params(cfg, params)

    new_cfg = dataclasses.replace(cfg, mta=mta, kq_conv_layers=kq_conv_layers)
    dtype = jnp.dtype(cfg.param_dtype)
    key = jax.random.key(seed)
    layers = dict(params["layers"])
    for index, layer_key in enumerate(_layer_keys(layers, cfg.num_layers)):
        mta_params = init_mta_params(
            new_cfg.layer_mta(index),
            cfg.num_heads,
            cfg.head_dim,
            jax.random.fold_in(key, index),
            gate_std=cfg.dim**-0.5,  # the model's own gate initialisation (layers.MultiTokenAttention)
            dtype=dtype,
        )
        attention = dict(layers[layer_key]["attention"])
        for field in dataclasses.fields(mta_params):
            value = getattr(mta_params, field.name)
            if value is not None:
                attention[field.name] = value
        layers[layer_key] = {**layers[layer_key], "attention": attention}
    return new_cfg, {**params, "layers": layers}


def _check_layers(layers: Sequence[int] | None, num_layers: int, mta: MTAConfig) -> tuple[int, ...] | None:
    if layers is None:
        return None
    layers = tuple(layers)
    if not mta.has_kq_conv:
        raise ValueError(
            f"kq_conv_layers={layers!r} is invalid: mta has no pre_conv or post_conv to place on layers"
        )
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_layers:
            raise ValueError(
                f"kq_conv_layers={layers!r} is invalid: layer index {index!r} is not an integer in "
                f"[0, {num_layers})"
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"kq_conv_layers={layers!r} is invalid: must not repeat a layer")
    return layers


def _layer_keys(layers: Mapping, num_layers: int) -> list:
    """The keys of layers 0..num_layers-1 in `layers` (integers, or strings after some round trips)."""
    return [index if index in layers else str(index) for index in range(num_layers)]


def _check_baseline_params(cfg: ModelConfig, params: PyTree) -> None:
    """Raises ValueError naming every parameter of `params` that a model of `cfg` lacks or shapes
    differently (only names and shapes are compared)."""
    from mta_jax.model import MTATransformer

    abstract = nnx.eval_shape(lambda: MTATransformer(cfg, rngs=nnx.Rngs(0)))
    expected = _flat(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    if not isinstance(params, Mapping) or "layers" not in params:
        raise ValueError("params is invalid: must be the nested dict of the model's parameters")
    given = _flat(params)
    problems = [f"missing {name}" for name in expected if name not in given]
    problems += [f"unexpected {name}" for name in given if name not in expected]
    problems += [
        f"{name} has shape {tuple(given[name].shape)}, the model needs {tuple(expected[name].shape)}"
        for name in expected
        if name in given and tuple(given[name].shape) != tuple(expected[name].shape)
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"params do not fit the baseline model config: {shown}")


def _flat(tree: PyTree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}
