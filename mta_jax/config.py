"""Frozen, self-validating configuration: MTAConfig (one attention layer) and ModelConfig (the LM).

Every invalid value raises ValueError naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mta_jax.rope import RopeScaling

PAD_KEY_MODES = ("both", "left", "right")
GATE_MODES = (None, "scalar", "elementwise")
ROPE_STYLES = ("interleaved", "half")
IMPLEMENTATIONS = ("auto", "reference", "blockwise", "pallas")


def _error(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{field}={value!r} is invalid: {allowed}")


def _within(section: str, error: ValueError) -> ValueError:
    """error with its field prefixed by `section.` (unless the message already starts with the section)."""
    message = str(error)
    if message.startswith((f"{section}=", f"{section}.")):
        return error
    return ValueError(f"{section}.{message}")


def check_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _error(field, value, "must be a positive integer")


def _check_head_counts(num_heads: Any, num_kv_heads: Any) -> None:
    check_positive_int("num_heads", num_heads)
    check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise _error(
            "num_kv_heads", num_kv_heads, f"must divide num_heads={num_heads} (grouped-query attention)"
        )


def resolve_head_dim(dim: Any, num_heads: Any, num_kv_heads: Any, head_dim: Any) -> int:
    """The head dim of an attention layer (dim // num_heads when head_dim is None), after checking
    dim, the head counts and head_dim; shared by ModelConfig and the NNX layer."""
    check_positive_int("dim", dim)
    _check_head_counts(num_heads, num_kv_heads)
    if head_dim is None:
        if dim % num_heads:
            raise _error("num_heads", num_heads, f"must divide dim={dim} when head_dim is unset")
        head_dim = dim // num_heads
    check_positive_int("head_dim", head_dim)
    return head_dim


def check_choice(field: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise _error(field, value, f"must be one of {choices}")


def _check_conv_size(field: str, value: Any, pad_key: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _error(field, value, "must be None or a pair (c_q, c_k) of positive integers")
    c_q, c_k = value
    check_positive_int(f"{field}[0] (c_q)", c_q)
    check_positive_int(f"{field}[1] (c_k)", c_k)
    if pad_key == "both" and c_k % 2 == 0:
        raise _error(f"{field}[1] (c_k)", c_k, 'must be odd with pad_key="both" (equal padding on each side)')
    return (c_q, c_k)


@dataclasses.dataclass(frozen=True)
class MTAConfig:
    """The Multi-Token Attention options of one attention layer (spec sections 1-3).

    pre_conv / post_conv: (c_q, c_k) of the key-query convolution before / after the softmax, or None.
    pad_key: how the key axis is padded for the convolution: "both" (c_k odd), "left" or "right".
    pre_head_mix: group size of the pre-softmax linear head mixing (num_heads = over all heads), or None.
    post_head_mix: group size c_h of the post-softmax head convolution, or None.
    group_norm: per-head RMSNorm over the head dim after attention; norm_eps its epsilon.
    depth_scaling: multiply by (1 - lambda_init(layer_index)) after the norm (DIFF Transformer formula).
    gate: None, "scalar" (Linear(D, 1) shared by heads) or "elementwise" (Linear(D, D)).
    dropout_rate: attention dropout on the final attention weights.
    causal: key j is visible to query i only if j <= i (bottom-right aligned when T != S).
    """

    pre_conv: tuple[int, int] | None = None
    post_conv: tuple[int, int] | None = None
    pad_key: str = "both"
    pre_head_mix: int | None = None
    post_head_mix: int | None = None
    group_norm: bool = False
    norm_eps: float = 1e-5
    depth_scaling: bool = False
    gate: str | None = None
    dropout_rate: float = 0.0
    causal: bool = True

    def __post_init__(self):
        if self.pad_key not in PAD_KEY_MODES:
            raise _error("pad_key", self.pad_key, f"must be one of {PAD_KEY_MODES}")
        # Lists (from YAML) become tuples so that the config stays hashable.
        object.__setattr__(self, "pre_conv", _check_conv_size("pre_conv", self.pre_conv, self.pad_key))
        object.__setattr__(self, "post_conv", _check_conv_size("post_conv", self.post_conv, self.pad_key))
        for field in ("pre_head_mix", "post_head_mix"):
            if getattr(self, field) is not None:
                check_positive_int(field, getattr(self, field))
        if self.gate not in GATE_MODES:
            raise _error("gate", self.gate, f"must be one of {GATE_MODES}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise _error("dropout_rate", self.dropout_rate, "must be in [0, 1)")
        if not self.norm_eps > 0:
            raise _error("norm_eps", self.norm_eps, "must be > 0")
        for field in ("group_norm", "depth_scaling", "causal"):
            if not isinstance(getattr(self, field), bool):
                raise _error(field, getattr(self, field), "must be True or False")

    @property
    def has_kq_conv(self) -> bool:
        return self.pre_conv is not None or self.post_conv is not None

    def check_heads(self, num_heads: int, num_kv_heads: int) -> None:
        """Checks the options that depend on the head counts."""
        _check_head_counts(num_heads, num_kv_heads)
        for field in ("pre_head_mix", "post_head_mix"):
            group = getattr(self, field)
            if group is not None and num_heads % group:
                raise _error(field, group, f"must divide num_heads={num_heads}")

    def without_kq_conv(self) -> MTAConfig:
        """This config with both key-query convolutions removed (layers outside kq_conv_layers)."""
        return dataclasses.replace(self, pre_conv=None, post_conv=None)


def depth_scale(layer_index: int) -> float:
    """1 - lambda_init with lambda_init = 0.8 - 0.6 exp(-0.3 layer_index), layer_index 0-based."""
    return 1.0 - (0.8 - 0.6 * math.exp(-0.3 * layer_index))


def swiglu_hidden_dim(dim: int, multiple_of: int = 256, multiplier: float = 1.0) -> int:
    """The reference's FFN width: 2/3 of 4 * dim, times multiplier, rounded up to multiple_of."""
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Llama-style decoder of spec section 5 with per-layer MTA settings.

    mta: the MTA options of the layers; None for a plain Transformer.
    kq_conv_layers: 0-based indices of the layers that keep mta.pre_conv / mta.post_conv (None: all);
        the other layers get the same MTA options without the key-query convolution.
    """

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_multiple_of: int = 256
    ffn_dim_multiplier: float = 1.0
    norm_eps: float = 1e-5
    rope_theta: float = 100_000.0
    rope_style: str = "interleaved"
    rope_scaling: RopeScaling | None = None  # a mapping of RopeScaling fields in YAML
    tie_embeddings: bool = True
    mta: MTAConfig | None = None
    kq_conv_layers: tuple[int, ...] | None = None
    attention_implementation: str = "auto"
    attention_block_q: int | None = None
    attention_block_k: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    # The FFN width when it is not the reference's formula (ffn_multiple_of, ffn_dim_multiplier), e.g. a
    # Hugging Face checkpoint's intermediate_size; None: the formula.
    ffn_hidden_dim_override: int | None = None

    def __post_init__(self):
        for field in ("vocab_size", "dim", "num_layers", "num_heads", "ffn_multiple_of"):
            check_positive_int(field, getattr(self, field))
        if self.ffn_hidden_dim_override is not None:
            check_positive_int("ffn_hidden_dim_override", self.ffn_hidden_dim_override)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        head_dim = resolve_head_dim(self.dim, self.num_heads, self.num_kv_heads, self.head_dim)
        object.__setattr__(self, "head_dim", head_dim)
        check_choice("rope_style", self.rope_style, ROPE_STYLES)
        if isinstance(self.rope_scaling, Mapping):
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError as error:
                raise _error("rope_scaling", self.rope_scaling, str(error)) from None
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise _error("rope_scaling", self.rope_scaling, "must be a RopeScaling, a mapping or None")
        if self.head_dim % 2:
            raise _error("head_dim", self.head_dim, "must be even (RoPE rotates pairs)")
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise _error(
                "attention_implementation",
                self.attention_implementation,
                f"must be one of {IMPLEMENTATIONS}",
            )
        for field in ("attention_block_q", "attention_block_k"):
            if getattr(self, field) is not None:
                check_positive_int(field, getattr(self, field))
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in ("float32", "bfloat16", "float16", "float64"):
                raise _error(field, getattr(self, field), "must be float32, bfloat16, float16 or float64")
        try:  # an error of the mta section names its field as mta.<field>
            if isinstance(self.mta, Mapping):
                object.__setattr__(self, "mta", mta_config_from_dict(self.mta))
            if self.mta is not None:
                if not isinstance(self.mta, MTAConfig):
                    raise _error("mta", self.mta, "must be an MTAConfig, a mapping or None")
                self.mta.check_heads(self.num_heads, self.num_kv_heads)
        except ValueError as error:
            raise _within("mta", error) from None
        if self.kq_conv_layers is not None:
            layers = tuple(self.kq_conv_layers)
            for index in layers:
                if isinstance(index, bool) or not isinstance(index, int):
                    raise _error("kq_conv_layers", self.kq_conv_layers, "must hold integers")
                if not 0 <= index < self.num_layers:
                    raise _error(
                        "kq_conv_layers",
                        self.kq_conv_layers,
                        f"layer index {index} is out of range [0, {self.num_layers})",
                    )
            if len(set(layers)) != len(layers):
                raise _error("kq_conv_layers", self.kq_conv_layers, "must not repeat a layer")
            object.__setattr__(self, "kq_conv_layers", layers)

    @property
    def ffn_hidden_dim(self) -> int:
        if self.ffn_hidden_dim_override is not None:
            return self.ffn_hidden_dim_override
        return swiglu_hidden_dim(self.dim, self.ffn_multiple_of, self.ffn_dim_multiplier)

    def layer_mta(self, layer_index: int) -> MTAConfig | None:
        """The MTA options of one layer: the key-query convolution only in kq_conv_layers."""
        if self.mta is None:
            return None
        if self.kq_conv_layers is None or layer_index in self.kq_conv_layers:
            return self.mta
        return self.mta.without_kq_conv()

    def baseline(self) -> ModelConfig:
        """The same model without any MTA part."""
        return dataclasses.replace(self, mta=None, kq_conv_layers=None)


def _from_dict(cls, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise _error(where, data, "must be a mapping of field names to values")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise _error(where, unknown, f"unknown field(s); allowed fields are {sorted(names)}")
    return cls(**data)


def mta_config_from_dict(data: Mapping[str, Any]) -> MTAConfig:
    return _from_dict(MTAConfig, data, "mta")


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    return _from_dict(ModelConfig, data, "model")


def load_model_config(path: str | Path, **overrides: Any) -> ModelConfig:
    """Reads a model config from a YAML file (see configs/models/); overrides replace top-level keys."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, Mapping):
        raise _error(str(path), data, "a model config file must hold a mapping")
    return model_config_from_dict({**data, **overrides})
