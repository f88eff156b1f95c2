"""Mesh shapes and the logical axis rules (the sharded runs themselves are in test_train_step.py)."""

from __future__ import annotations

import pytest

from mta_jax.layers import ACTIVATION_AXES, LOGICAL_AXES
from train.mesh import LOGICAL_AXIS_RULES, MESH_AXES, MeshConfig, make_mesh


@pytest.mark.parametrize(
    "cfg, devices, shape",
    [
        (MeshConfig(), 8, (8, 1, 1)),
        (MeshConfig(data=-1, fsdp=2, tensor=2), 8, (2, 2, 2)),
        (MeshConfig(data=1, fsdp=-1, tensor=4), 16, (1, 4, 4)),
        (MeshConfig(data=2, fsdp=3, tensor=1), 6, (2, 3, 1)),
    ],
)
def test_minus_one_fills_what_the_other_axes_leave(cfg, devices, shape):
    assert cfg.shape(devices) == shape


@pytest.mark.parametrize(
    "kwargs, devices, message",
    [
        (dict(data=-1, fsdp=3), 8, r"the fixed axes \(3 devices\) must divide the 8 devices"),
        (dict(data=2, fsdp=2, tensor=1), 8, "it needs 4 devices and there are 8"),
    ],
)
def test_meshes_that_do_not_fit_the_devices_are_named(kwargs, devices, message):
    with pytest.raises(ValueError, match=message):
        MeshConfig(**kwargs).shape(devices)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(data=-1, fsdp=-1), "at most one axis may be -1"),
        (dict(tensor=0), r"mesh.tensor=0 is invalid: must be >= 1, or -1 to fill"),
        (dict(num_slices=0), r"mesh.num_slices=0 is invalid"),
    ],
)
def test_bad_mesh_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MeshConfig(**kwargs)


def test_slices_must_divide_the_data_axis():
    with pytest.raises(ValueError, match=r"mesh.num_slices=3 is invalid: must divide the data axis \(1\)"):
        make_mesh(MeshConfig(num_slices=3))


def test_every_logical_axis_of_the_model_has_a_rule_onto_mesh_axes():
    rules = dict(LOGICAL_AXIS_RULES)
    assert set(LOGICAL_AXES) | set(ACTIVATION_AXES) <= set(rules)
    for target in rules.values():
        names = () if target is None else (target,) if isinstance(target, str) else target
        assert set(names) <= set(MESH_AXES)
