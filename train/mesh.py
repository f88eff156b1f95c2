"""The device mesh (data, fsdp, tensor) and the rules that map logical axes onto it.

Parameters carry logical axis names (mta_jax/layers.py: "embed", "q_heads", "kv_heads", "mlp",
"vocab"); LOGICAL_AXIS_RULES maps them, and the activations' "batch", onto mesh axes:
  batch -> (data, fsdp)   every data-parallel rank holds different rows (activations: [batch, length,
                          act_embed], the last two unsplit)
  embed -> fsdp           parameters and optimizer state are split over the fsdp axis (ZeRO-3 style)
  heads, mlp, vocab -> tensor   Megatron-style tensor parallelism
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger("train")

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Axis sizes; -1 fills what the other axes leave. num_slices > 1: data parallelism across
    TPU slices (over the data-centre network), each slice holding the whole data x fsdp x tensor mesh."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    num_slices: int = 1

    def __post_init__(self):
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            if size != -1 and size < 1:
                raise ValueError(f"mesh.{axis}={size!r} is invalid: must be >= 1, or -1 to fill")
        if sum(size == -1 for size in sizes.values()) > 1:
            raise ValueError(f"mesh={sizes} is invalid: at most one axis may be -1")
        if self.num_slices < 1:
            raise ValueError(f"mesh.num_slices={self.num_slices!r} is invalid: must be >= 1")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) for num_devices devices, -1 resolved."""
        sizes = [getattr(self, axis) for axis in MESH_AXES]
        known = math.prod(size for size in sizes if size != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh={dict(zip(MESH_AXES, sizes, strict=True))} is invalid: the fixed axes "
                    f"({known} devices) must divide the {num_devices} devices"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh={dict(zip(MESH_AXES, sizes, strict=True))} is invalid: it needs "
                f"{math.prod(sizes)} devices and there are {num_devices}"
            )
        return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A Mesh over `devices` (default: all, across every process) with axes MESH_AXES."""
    devices = jax.devices() if devices is None else devices
    shape = cfg.shape(len(devices))
    if cfg.num_slices > 1:
        if shape[0] % cfg.num_slices:
            raise ValueError(
                f"mesh.num_slices={cfg.num_slices} is invalid: must divide the data axis ({shape[0]})"
            )
        per_slice = (shape[0] // cfg.num_slices, shape[1], shape[2])
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, (cfg.num_slices, 1, 1), devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (AssertionError, NotImplementedError, ValueError):  # topologies it does not know
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a [B, ...] batch split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, where: str) -> PartitionSpec:
    """spec with every dimension that its mesh axes do not divide left unsplit (and said once)."""
    fitted = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        split = math.prod(mesh.shape[name] for name in names)
        if split > 1 and size % split:
            log.warning("%s: size %d is not divisible by mesh axes %s; not split", where, size, names)
            axes = None
        fitted.append(axes)
    return PartitionSpec(*fitted)


def sharding_context(mesh: Mesh):
    """The context to trace and run the model in: the mesh and the logical axis rules, so that the
    model's activation constraints (mta_jax.layers.constrain) take effect."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(spmd.logical_axis_rules(LOGICAL_AXIS_RULES))
    return stack


def param_shardings(abstract_params, mesh: Mesh):
    """NamedShardings for a tree of nnx Variables (from nnx.eval_shape) by LOGICAL_AXIS_RULES."""
    with spmd.logical_axis_rules(LOGICAL_AXIS_RULES):
        specs = nnx.get_partition_spec(abstract_params)
    specs = nnx.to_pure_dict(specs)
    shapes = nnx.to_pure_dict(abstract_params)
    paths = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
    flat_specs, treedef = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    shardings = []
    for path, spec in flat_specs:
        where = jax.tree_util.keystr(path)
        shardings.append(NamedSharding(mesh, _fit(spec, paths[where].shape, mesh, where)))
    return jax.tree_util.tree_unflatten(treedef, shardings)
