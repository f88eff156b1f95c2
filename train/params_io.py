"""Model parameters on disk, without the optimizer: for evaluation, generation, conversion and for starting
a run from them (TrainConfig.init_from).

A parameter directory holds
    model.yaml   the ModelConfig (mta_jax.config fields)
    params/      an Orbax StandardSave of the nested dict of nnx.Param values
A training run directory (train/loop.py) holds config.yaml and checkpoints/<step>/state; `load_params`
reads either kind, taking only the parameters out of a training checkpoint.

    cfg, params = load_params("runs/toy_small")           # newest checkpoint of a run
    model = load_model("runs/toy_small")                   # an MTATransformer in eval mode
    save_params("ckpt/mta", cfg, params)                   # -> a parameter directory
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from mta_jax.config import ModelConfig, model_config_from_dict
from mta_jax.model import MTATransformer
from train.errors import short_error
from train.files import write_text_atomic

PyTree = Any
log = logging.getLogger(__name__)


class UnreadableCheckpointError(ValueError):
    """Orbax could not read a saved parameter tree (corrupt, truncated or missing files)."""


class ParamsExistError(ValueError):
    """save_params refuses to replace parameters; `option` names what allows it (a command line says its
    own flag: error.for_option("--overwrite"))."""

    def __init__(self, directory: Path, option: str = "overwrite=True"):
        self.directory, self.option = directory, option
        super().__init__(f"{directory} already holds parameters; pass {option} to replace them")

    def for_option(self, option: str) -> ParamsExistError:
        return ParamsExistError(self.directory, option)


MODEL_FILE = "model.yaml"
PARAMS_DIR = "params"


def save_params(directory: str | os.PathLike, cfg: ModelConfig, params: PyTree, *, overwrite=False) -> Path:
    """Writes `params` (nested dict of arrays, as nnx.to_pure_dict gives) and `cfg` to `directory`."""
    directory = Path(directory).absolute()
    check_params(cfg, params)
    if (directory / PARAMS_DIR).exists() and not overwrite:
        raise ParamsExistError(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params, force=overwrite)
        checkpointer.wait_until_finished()
    write_text_atomic(directory / MODEL_FILE, yaml.safe_dump(_model_dict(cfg), sort_keys=False))
    return directory


def load_params(path: str | os.PathLike, *, step: int | None = None) -> tuple[ModelConfig, PyTree]:
    """(ModelConfig, params) from a parameter directory or a training run directory.

    step: which checkpoint of a run (default: the newest readable one; an unreadable newer one is skipped
    with a warning); not allowed for a parameter directory.
    Parameters come back as numpy-backed jax arrays on the default device, in their saved dtype.
    """
    path = Path(path).absolute()
    if (path / MODEL_FILE).is_file():
        if step is not None:
            raise ValueError(f"step={step} is invalid: {path} is a parameter directory with one step")
        cfg = _read_model(path / MODEL_FILE)
        try:
            return cfg, _restore(path / PARAMS_DIR, cfg)
        except UnreadableCheckpointError as error:
            raise ValueError(f"checkpoint={str(path)!r} is invalid: {error}") from None
    if (path / "config.yaml").is_file():
        cfg = _read_model(path / "config.yaml", key="model")
        checkpoints = path / "checkpoints"
        steps = sorted(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit() and p.is_dir())
        if not steps:
            raise ValueError(f"checkpoint={str(path)!r} is invalid: the run has no saved checkpoint")
        if step is None:
            return cfg, _restore_newest_readable(checkpoints, steps, cfg)
        if step not in steps:
            raise ValueError(f"step={step} is invalid: {path} has checkpoints of steps {steps}")
        try:
            return cfg, _restore(checkpoints / str(step) / "state", cfg, key="params")
        except UnreadableCheckpointError as error:
            raise ValueError(f"step={step} is invalid: {error}") from None
    raise ValueError(
        f"checkpoint={str(path)!r} is invalid: neither a parameter directory (with {MODEL_FILE}) nor a "
        "run directory (with config.yaml and checkpoints/)"
    )


def load_model(path: str | os.PathLike, *, step: int | None = None, **overrides) -> MTATransformer:
    """The MTATransformer saved at `path` (see load_params), in eval mode (dropout off).

    overrides: ModelConfig fields to replace that do not change parameter shapes, e.g.
    attention_implementation="reference" or dtype="float32".
    """
    cfg, params = load_params(path, step=step)
    if overrides:
        cfg = model_config_from_dict({**_model_dict(cfg), **overrides})
    return model_from_params(cfg, params)


def model_from_params(cfg: ModelConfig, params: PyTree) -> MTATransformer:
    """An MTATransformer of `cfg` holding `params` (nested dict), in eval mode."""
    check_params(cfg, params)
    model = nnx.eval_shape(lambda: MTATransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        rest = jax.jit(lambda: nnx.split(MTATransformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[2])()
    nnx.replace_by_pure_dict(abstract, params)
    model = nnx.merge(graphdef, abstract, rest)
    model.eval()
    return model


def abstract_params(cfg: ModelConfig) -> PyTree:
    """The nested dict of jax.ShapeDtypeStruct that a model of `cfg` has as parameters."""
    model = nnx.eval_shape(lambda: MTATransformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def check_params(cfg: ModelConfig, params: PyTree, *, flat: bool = False) -> None:
    """Raises ValueError naming every missing, unexpected or mis-shaped parameter of `params` for `cfg`.
    flat: params is already a {"layers/0/attention/wq/kernel": array} dict."""
    expected = _flat(abstract_params(cfg))
    given = params if flat else _flat(params)
    problems = [f"missing {name} {tuple(expected[name].shape)}" for name in expected if name not in given]
    problems += [f"unexpected {name}" for name in given if name not in expected]
    problems += [
        f"{name} has shape {tuple(np.shape(given[name]))}, the model needs {tuple(expected[name].shape)}"
        for name in expected
        if name in given and tuple(np.shape(given[name])) != tuple(expected[name].shape)
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"the parameters do not fit the model config: {shown}")


def _flat(tree: PyTree) -> dict[str, Any]:
    """{"layers/0/attention/wq/kernel": leaf} for a nested dict (integer and string keys alike)."""
    return {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _restore_newest_readable(checkpoints: Path, steps: list[int], cfg: ModelConfig) -> PyTree:
    """The params of the newest of `steps` that restores; ValueError naming every step tried if none does."""
    failures = []
    for step in sorted(steps, reverse=True):
        try:
            params = _restore(checkpoints / str(step) / "state", cfg, key="params")
        except UnreadableCheckpointError as error:
            failures.append(f"step {step}: {error}")
            continue
        if failures:
            log.warning(
                "skipped unreadable checkpoint(s) of %s (%s); using step %d",
                checkpoints,
                "; ".join(failures),
                step,
            )
        return params
    raise ValueError(f"no checkpoint in {checkpoints} could be read: {'; '.join(failures)}")


def _restore(directory: Path, cfg: ModelConfig, key: str | None = None) -> PyTree:
    """The params subtree of the Orbax pytree in `directory` (only `key` of it when given). Raises
    UnreadableCheckpointError for files Orbax cannot read, ValueError for parameters that do not fit cfg."""
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params(cfg))
    try:
        with _quiet_item_metadata():
            metadata = ocp.PyTreeCheckpointer().metadata(directory)
    except Exception as error:  # corrupt, truncated or missing files all surface differently
        reason = short_error(error, 160, first_line=True)
        raise UnreadableCheckpointError(f"its parameters cannot be read ({reason})") from None
    if hasattr(metadata, "item_metadata"):
        metadata = metadata.item_metadata
    if metadata is None:
        raise UnreadableCheckpointError("its parameters cannot be read (no readable metadata)")
    tree = metadata.tree
    saved = _flat(tree[key] if key is not None else tree)
    check_params(cfg, saved, flat=True)
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    target = jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct(t.shape, saved[_name(path)].dtype) for path, t in paths]
    )
    item = {key: target} if key is not None else target
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=_one_device()), item)
    try:
        with _quiet_item_metadata(), ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(
                directory,
                args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
            )
    except Exception as error:  # corrupt, truncated or missing files all surface differently
        reason = short_error(error, 160, first_line=True)
        raise UnreadableCheckpointError(f"its parameters cannot be read ({reason})") from None
    return restored[key] if key is not None else restored


class _NoItemMetadataWarning(logging.Filter):
    """Drops Orbax's warning that an item directory (a run's checkpoints/<step>/state) has no
    _CHECKPOINT_METADATA: that file sits one level up, at the step, and the item reads fine; and its
    warning of unreadable item metadata, which _restore turns into an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Metadata file does not exist" not in message and "Failed to get item metadata" not in message


@contextlib.contextmanager
def _quiet_item_metadata():
    quiet = _NoItemMetadataWarning()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _one_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _read_model(path: Path, key: str | None = None) -> ModelConfig:
    raw = yaml.safe_load(path.read_text()) or {}
    data = raw.get(key) if key is not None else raw
    if not isinstance(data, dict):
        raise ValueError(f"{path} is invalid: it holds no model config mapping")
    return model_config_from_dict(data)


def _model_dict(cfg: ModelConfig) -> dict:
    from train.config import to_dict  # train.config imports the data stack; keep it off this import path

    return to_dict(cfg)
