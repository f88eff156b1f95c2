"""Run configuration: YAML -> validated frozen dataclasses, with dotted command-line overrides.

    cfg = load_train_config("configs/train/tiny_lm.yaml", ["steps=50", "optimizer.learning_rate=3e-4"])

Top-level keys are TrainConfig's fields; `model` is a mapping of ModelConfig fields, the path of a
model YAML (relative to the config file, then to the working directory), or {base: <path>, field: value}.
An override's value is parsed as YAML ("3e-4" -> float, "null" -> None, "[1, 3]" -> list). An unknown
key or a value of the wrong type is a ValueError that names it and lists what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mta_jax.config import ModelConfig, model_config_from_dict
from train.checkpoint import CheckpointConfig
from train.data import SYNTHETIC_KINDS, DataConfig
from train.distributed import DistributedConfig
from train.mesh import MeshConfig
from train.optim import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one run needs. Steps count optimizer updates of one global batch each."""

    model: ModelConfig
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    run_dir: str = "runs/default"
    steps: int = 1000
    global_batch_size: int = 32  # rows of data.seq_len tokens per step, over all processes
    microbatches: int = 1  # gradient accumulation: the global batch in this many passes
    seed: int = 0  # parameters, dropout and data order
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4
    # Stop the run at the first evaluation whose held-out sequence error is <= this fraction (toy and
    # needle tasks; checked at every eval, so it needs eval_every >= 1). None: run all the steps.
    stop_at_eval_error: float | None = None
    progress: bool | None = None  # None: a progress bar on a terminal, plain log lines otherwise
    # Start from these parameters (a parameter directory or another run's directory, see
    # train/params_io.py) with a fresh optimizer, when run_dir has no checkpoint yet.
    init_from: str | None = None

    def __post_init__(self):
        for field in ("steps", "global_batch_size", "microbatches", "log_every", "eval_batches"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} is invalid: must be an integer >= 1")
        if self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every!r} is invalid: must be >= 0 (0: only at the end)")
        self._check_stop_at_eval_error()
        if self.global_batch_size % self.microbatches:
            raise ValueError(
                f"microbatches={self.microbatches!r} is invalid: must divide "
                f"global_batch_size={self.global_batch_size}"
            )

    def _check_stop_at_eval_error(self) -> None:
        target = self.stop_at_eval_error
        if target is None:
            return
        name = f"stop_at_eval_error={target!r} is invalid"
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
            raise ValueError(f"{name}: must be a fraction in [0, 1) (0.01: stop at 1% sequence error)")
        if self.eval_every < 1:
            raise ValueError(f"{name}: needs eval_every >= 1 (it is checked at each evaluation)")
        if self.data.kind not in SYNTHETIC_KINDS:
            raise ValueError(
                f"{name}: data.kind={self.data.kind!r} has no sequence error (only {SYNTHETIC_KINDS})"
            )


def _type_name(hint) -> str:
    return " | ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in _options(hint))


def _options(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _coerce(value: Any, hint, where: str) -> Any:
    """value checked against a simple field type (int, float, str, bool, their optionals)."""
    for option in _options(hint):
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if option is str and isinstance(value, str):
            return value
    raise ValueError(f"{where}={value!r} is invalid: must be {_type_name(hint)}")


def _build(cls, data: Any, where: str):
    """cls(**data) for a config dataclass, checking keys and simple types, with `where.` in errors."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}={data!r} is invalid: must be a mapping of its fields")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys are {names}")
    values = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ValueError as error:
        message = str(error)
        raise ValueError(message if message.startswith(f"{where}.") else f"{where}.{message}") from None


def _model_mapping(value: Any, base_dir: Path) -> dict:
    """model: a file path, a mapping of fields, or a mapping with `base: <file>` plus fields to replace."""
    if isinstance(value, Mapping) and "base" in value:
        return {**_model_mapping(value["base"], base_dir), **{k: v for k, v in value.items() if k != "base"}}
    if isinstance(value, str):
        candidates = [base_dir / value, Path(value)]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ValueError(f"model={value!r} is invalid: no such file (looked in {base_dir} and .)")
        value = _read_yaml(path, "model")
    if not isinstance(value, Mapping):
        raise ValueError(f"model={value!r} is invalid: must be a mapping of ModelConfig fields or a path")
    return dict(value)


def _read_yaml(path: Path, what: str) -> Any:
    """The YAML document in `path`; malformed YAML is a ValueError naming the file and line."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{what}={str(path)!r} is invalid: malformed YAML{where}: {problem}") from None


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """raw with each "a.b.c=value" set (value parsed as YAML)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is invalid: must be key.sub=value")
        node = raw
        *parents, leaf = key.split(".")
        for index, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"override {item!r} is invalid: {'.'.join(parents[: index + 1])} is not a section"
                )
            node = child
        node[leaf] = yaml.safe_load(text) if text else ""
    return raw


def train_config_from_dict(raw: Mapping[str, Any], base_dir: str | Path = ".") -> TrainConfig:
    raw = dict(raw)
    if "model" not in raw:
        raise ValueError("model is missing: give a mapping of ModelConfig fields or a model config file")
    model = _model_mapping(raw.pop("model"), Path(base_dir))
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed keys are {names}")
    values: dict[str, Any] = {"model": _model_from_mapping(model)}
    for name, value in raw.items():
        hint = hints[name]
        values[name] = (
            _build(hint, value, name) if dataclasses.is_dataclass(hint) else _coerce(value, hint, name)
        )
    return TrainConfig(**values)


def _model_from_mapping(data: dict) -> ModelConfig:
    try:
        return model_config_from_dict(data)
    except (TypeError, ValueError) as error:
        message = str(error)
        raise ValueError(message if message.startswith("model") else f"model.{message}") from None


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config in the YAML file `path`, with `overrides` ("key.sub=value") applied."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config={str(path)!r} is invalid: no such file")
    raw = _read_yaml(path, "config") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config={str(path)!r} is invalid: the file must hold a mapping")
    if "model" in raw:
        raw["model"] = _model_mapping(raw["model"], path.parent)
    return train_config_from_dict(apply_overrides(raw, overrides), path.parent)


def to_dict(cfg: Any) -> Any:
    """A config as plain YAML-safe data (tuples become lists); loads back to an equal config."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [to_dict(item) for item in cfg]
    return cfg


def dump(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# Model fields that change how the model is computed, not its parameters: a resumed run may change them.
RESUMABLE_MODEL_FIELDS = ("attention_implementation", "attention_block_q", "attention_block_k", "dtype")


def model_differences(saved: ModelConfig, requested: ModelConfig) -> list[str]:
    """"model.field: saved A, requested B" for each field (leaf of a nested section) that differs,
    leaving out RESUMABLE_MODEL_FIELDS."""
    old, new = to_dict(saved), to_dict(requested)
    for name in RESUMABLE_MODEL_FIELDS:
        old.pop(name, None), new.pop(name, None)
    return _differences(old, new, "model")


def _differences(old: Any, new: Any, where: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for key in list(old) + [k for k in new if k not in old]
            for line in _differences(old.get(key), new.get(key), f"{where}.{key}")
        ]
    return [] if old == new else [f"{where}: saved {old!r}, requested {new!r}"]


def check_resumable(cfg: TrainConfig, run_dir: str | Path) -> None:
    """Raises ValueError if run_dir has checkpoints of another model than cfg.model (see its config.yaml)."""
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    checkpoints = run_dir / "checkpoints"
    if not saved_path.is_file() or not any(p.name.isdigit() for p in checkpoints.glob("*")):
        return
    try:
        saved = load_train_config(saved_path)
    except ValueError as error:
        raise ValueError(f"{saved_path} is invalid: {error}; use a new run_dir") from None
    changes = model_differences(saved.model, cfg.model)
    if changes:
        raise ValueError(
            f"run_dir={str(run_dir)!r} is invalid: its checkpoints are of another model than requested:\n  "
            + "\n  ".join(changes)
            + "\nNothing was written there. Use a new run_dir; init_from="
            + f"{str(run_dir)!r} starts it from these parameters where their shapes fit the new model."
        )
