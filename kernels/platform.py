"""Which platform and chip a computation is being compiled for, as far as trace time can tell.

jax.default_backend() names the host, not the target: compiling for a TPU or a GPU from a CPU host
(or exporting for several platforms) must not pick the CPU's kernels. So:
- `traced_target(x)`: the platform and device kind of the current mesh (jax.set_mesh, as the training
  step and kernels/aot.py's target_mesh set it) or of x's sharding; None when neither names a device.
- `per_platform(args, tpu=, cuda=, cpu=)`: when the target is known, calls that platform's function;
  otherwise stages all of them with jax.lax.platform_dependent, and the lowering keeps only the
  branch of the platform it lowers for.
- `chip_of(platform, device_kind)`: the chips.py entry the kernels tune for, falling back to the
  local device of that platform, then to the platform's smallest chip (chips.FALLBACK).
"""

from __future__ import annotations

import dataclasses
import os

import jax

from kernels.chips import CHIPS, FALLBACK, Chip, chip_for_kind

PLATFORMS = ("tpu", "cuda", "cpu")


@dataclasses.dataclass(frozen=True)
class Target:
    platform: str  # "tpu", "cuda" or "cpu"
    device_kind: str | None


def _platform_name(platform: str) -> str:
    return "cuda" if platform in ("gpu", "cuda") else platform


def traced_target(x: jax.Array | None = None) -> Target | None:
    """The target named by the current mesh or by x's sharding, else by $MTA_TARGET_PLATFORM ("tpu",
    "cuda" or "cpu": what to compile for when nothing else says), else None."""
    candidates = [jax.sharding.get_abstract_mesh()]
    if x is not None:
        sharding = getattr(jax.typeof(x), "sharding", None)
        candidates.append(getattr(sharding, "mesh", None))
    for mesh in candidates:
        device = getattr(mesh, "abstract_device", None)
        if device is not None:
            return Target(_platform_name(device.platform), device.device_kind)
    forced = os.environ.get("MTA_TARGET_PLATFORM")
    if forced:
        platform = _platform_name(forced.lower())
        if platform not in PLATFORMS:
            raise ValueError(f"MTA_TARGET_PLATFORM={forced!r} is invalid: must be one of {PLATFORMS}")
        return Target(platform, local_device_kind(platform) if platform != "cpu" else None)
    return None


def local_device_kind(platform: str) -> str | None:
    """device_kind of this host's first device of `platform`, or None if it has none."""
    try:
        devices = jax.devices("gpu" if platform == "cuda" else platform)
    except RuntimeError:
        return None
    return devices[0].device_kind if devices else None


def known_chip(platform: str, device_kind: str | None = None) -> Chip | None:
    """The chip of the named device kind, else of this host's device of the platform; None when
    neither names a known chip (and for the CPU)."""
    if platform == "cpu":
        return None
    return chip_for_kind(device_kind) or chip_for_kind(local_device_kind(platform))


def chip_of(platform: str, device_kind: str | None = None) -> Chip | None:
    """The chip to tune for: known_chip, else the platform's smallest chip. None for the CPU."""
    if platform == "cpu":
        return None
    return known_chip(platform, device_kind) or CHIPS[FALLBACK[platform]]


def per_platform(args: tuple, x: jax.Array | None = None, **branches):
    """branches[platform](*args) for the platform compiled for. branches: tpu, cuda, cpu; each is
    called as f(*args, target=Target(platform, device_kind or None))."""
    target = traced_target(x)
    if target is not None:
        return branches[target.platform if target.platform in branches else "cpu"](*args, target=target)

    def branch(platform):
        return lambda *a: branches[platform](*a, target=Target(platform, None))

    return jax.lax.platform_dependent(*args, tpu=branch("tpu"), cuda=branch("cuda"), default=branch("cpu"))
