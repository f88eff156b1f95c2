"""Compiling for TPUs and GPUs without the chip (deviceless ahead-of-time compilation).

    device = compile_only_device(get_chip("h200"))          # or "v5e", ...
    with target_mesh(device):                                 # the kernels see the device kind
        compiled = jax.jit(f).trace(*abstract_args(device, ...)).lower().compile()
    devices = pod_devices(get_pod("v5p-64"), num_slices=2)  # every chip of whole slices

TPUs: libtpu's compile-only topologies (the `compile` extra installs libtpu). GPUs: the CUDA PJRT
plugin with an XLA GPU target description from kernels/targets/ (the plugin without the nvidia-*
wheels: nothing runs, XLA's Triton and ptxas still check shared memory and registers).
`triton_kernels` and `ptxas_report` read each Triton kernel of a lowered computation and what ptxas
says of it. Importing this module sets the environment both plugins need on a host without chips.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# Several processes (pytest-xdist workers) may load libtpu at once; and the CUDA plugin's version
# check needs a CUDA runtime, which a compile-only host lacks.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kernels.chips import Chip, Pod  # noqa: E402

TARGETS_DIR = Path(__file__).parent / "targets"


class CompilerUnavailable(RuntimeError):
    """The compiler for a target is not installed here (libtpu, or the CUDA plugin)."""


def _ensure_cuda_plugin() -> None:
    """Register the CUDA plugin's topology factory if jax's start-up skipped it (its version check
    fails without a CUDA runtime unless JAX_SKIP_CUDA_CONSTRAINTS_CHECK was set before jax started)."""
    from jax._src import xla_bridge

    xla_bridge._discover_and_register_pjrt_plugins()
    if "cuda" in xla_bridge._topology_factories:
        return
    try:
        import jax_plugins.xla_cuda12 as plugin
    except ImportError as e:
        raise CompilerUnavailable(
            "the CUDA PJRT plugin is not installed: pip install -e '.[compile]' (see README, Kernels)"
        ) from e
    plugin.initialize()


def _require_libtpu() -> None:
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise CompilerUnavailable(
            "libtpu is not installed: pip install -e '.[compile]' (see README, Kernels)"
        ) from e


def _tpu_devices(topology_name: str, chip_config: str, per_host, num_slices: int, wrap) -> list[jax.Device]:
    from jax.experimental import topologies

    _require_libtpu()
    topology = topologies.get_topology_desc(
        topology_name=topology_name,
        platform="tpu",
        chip_config_name=chip_config,
        chips_per_host_bounds=tuple(per_host),
        num_slices=num_slices,
        wrap=list(wrap),
    )
    return list(topology.devices)


@functools.cache
def compile_only_device(chip: Chip) -> jax.Device:
    """A device of `chip` that compiles but cannot run (one chip of the smallest slice for TPUs)."""
    from jax.experimental import topologies

    if chip.platform == "tpu":
        dims = chip.topology.split(":")[1].split("x")
        per_host = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
        return _tpu_devices(chip.topology, chip.chip_config, per_host, 1, (False,) * 3)[0]
    _ensure_cuda_plugin()
    topology = topologies.get_topology_desc(
        topology_name="",
        platform="cuda",
        target_config=(TARGETS_DIR / chip.target_config).read_text(),
        topology="1x1x1",
    )
    return topology.devices[0]


@functools.cache
def pod_devices(pod: Pod, num_slices: int = 1) -> tuple[jax.Device, ...]:
    """Every compile-only chip of `num_slices` slices of `pod` (kernels.chips.get_pod("v5p-64")):
    pod.chips x num_slices devices; with several slices each has its slice_index."""
    if num_slices < 1:
        raise ValueError(f"num_slices={num_slices!r} is invalid: must be >= 1")
    chip = pod.chip
    if chip.platform == "cuda":
        if num_slices != 1:
            raise ValueError(f"num_slices={num_slices} is invalid for GPUs: give the GPU count ({pod.name})")
        from jax.experimental import topologies

        _ensure_cuda_plugin()
        target = (TARGETS_DIR / chip.target_config).read_text()
        return tuple(
            topologies.get_topology_desc(
                topology_name="", platform="cuda", target_config=target, topology=pod.topology
            ).devices
        )
    return tuple(_tpu_devices(pod.topology, chip.chip_config, pod.chips_per_host_bounds, num_slices, pod.wrap))


@contextlib.contextmanager
def target_mesh(device: jax.Device):
    """A one-device mesh over `device`, set as the current mesh: code traced inside sees the device's
    platform and kind (kernels/platform.py), as it does in a training step under its mesh."""
    mesh = jax.sharding.Mesh(np.array([device]), ("target",))
    with jax.set_mesh(mesh):
        yield mesh


def sharding(device: jax.Device) -> jax.sharding.NamedSharding:
    """Replicated over the one-device target mesh (so that avals carry the device kind)."""
    mesh = jax.sharding.Mesh(np.array([device]), ("target",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract(device: jax.Device, shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding(device))


# ----------------------------------------------------------------------------------------------------------
# Triton kernels of a lowered computation


def triton_kernels(lowered) -> list[dict]:
    """Each Triton kernel in a lowered GPU computation: name, Triton IR (bytecode), num_warps, num_stages."""
    from jax._src.lib.mlir import ir

    found = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.custom_call":
                        target = ir.StringAttr(inner.attributes["call_target_name"]).value
                        if "triton" in target:
                            config = ir.DictAttr(inner.attributes["mhlo.backend_config"])
                            found.append(
                                {
                                    "name": ir.StringAttr(config["name"]).value,
                                    "ir": ir.StringAttr(config["ir"]).value_bytes,
                                    "num_warps": ir.IntegerAttr(config["num_warps"]).value,
                                    "num_stages": ir.IntegerAttr(config["num_stages"]).value,
                                }
                            )
                    walk(inner.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    return found


def compile_triton(kernel: dict, arch: str = "9.0") -> dict:
    """Compile one kernel with XLA's Triton: {"smem_bytes", "ptx"} (raises the compiler's error)."""
    from jax._src.lib import triton

    result = triton.compile(
        "CUDA", kernel["ir"], arch, num_warps=kernel["num_warps"], num_ctas=1, num_stages=kernel["num_stages"]
    )
    return {"smem_bytes": int(result.smem_bytes), "ptx": result.asm}


def ptxas_report(ptx: str, arch: str = "sm_90a") -> dict | None:
    """Registers, spill bytes and stack frame from `ptxas -v`, or None when ptxas is not on PATH."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        out = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", str(path), "-o", os.devnull], capture_output=True, text=True
        )
    text = out.stderr + out.stdout
    if out.returncode:
        return {"error": text.strip()[-2000:]}

    def number(pattern: str) -> int:
        match = re.search(pattern, text)
        return int(match.group(1)) if match else 0

    # ptxas warns when Hopper's asynchronous warpgroup MMAs cannot overlap (a speed cost, not an error)
    reason = re.search(r"wgmma\.mma_async instructions are serialized due to ([^\n]*)", text)
    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
        "stack_frame_bytes": number(r"(\d+) bytes stack frame"),
        "wgmma_serialized": "wgmma.mma_async instructions are serialized" in text,
        "wgmma_serialized_reason": (reason.group(1).strip() if reason else None),
    }
