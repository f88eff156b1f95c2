"""The accelerators the kernels are tuned and compiled for: published peaks and on-chip memories.

VMEM sizes are what libtpu's compiler enforces (a larger scoped allocation is refused with
"would exceed memory (size=...)"): 16 MiB on v4, 64 MiB on v5p, 128 MiB on v5e and v6e.

One table serves the kernels' tile defaults (VMEM of a TPU core, shared memory of a GPU block), the
deviceless compile check (how to make a compile-only device: a libtpu topology or an XLA GPU target
description in kernels/targets/) and roofline estimates (peak bf16 FLOP/s and HBM bandwidth, dense,
from the vendors' data sheets; estimates, never measurements).
"""

from __future__ import annotations

import dataclasses
import math
import re

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator as jax sees it (one jax device)."""

    name: str  # short name used on the command line: "v5e", "h200"
    platform: str  # "tpu" or "cuda"
    device_kind: str  # jax's device.device_kind
    peak_flops: float  # dense bf16 FLOP/s of one jax device
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: int
    vmem_bytes: int = 0  # TPU: VMEM of one TensorCore
    smem_per_block: int = 0  # GPU: opt-in shared memory of one thread block
    registers_per_block: int = 0  # GPU: 32-bit registers of one thread block
    topology: str = ""  # TPU: libtpu topology name of the smallest slice ("v5e:2x2")
    chip_config: str = ""  # TPU: libtpu chip_config_name ("default", "megacore")
    target_config: str = ""  # GPU: file in kernels/targets/

    @property
    def generation(self) -> int:
        """TPU generation number (4, 5, 6); 0 for GPUs."""
        match = re.match(r"v(\d+)", self.name)
        return int(match.group(1)) if match and self.platform == "tpu" else 0


CHIPS: dict[str, Chip] = {
    chip.name: chip
    for chip in (
        # TPU v4: one jax device per chip (megacore: 2 TensorCores), 16 MiB VMEM per core.
        Chip("v4", "tpu", "TPU v4", 275e12, 1.2e12, 32 * 2**30, vmem_bytes=16 * MiB,
             topology="v4:2x2x1", chip_config="megacore"),
        Chip("v5e", "tpu", "TPU v5 lite", 197e12, 819e9, 16 * 2**30, vmem_bytes=128 * MiB,
             topology="v5e:2x2", chip_config="default"),
        Chip("v5p", "tpu", "TPU v5", 459e12, 2765e9, 95 * 2**30, vmem_bytes=64 * MiB,
             topology="v5p:2x2x1", chip_config="megacore"),
        Chip("v6e", "tpu", "TPU v6 lite", 918e12, 1640e9, 32 * 2**30, vmem_bytes=128 * MiB,
             topology="v6e:2x2", chip_config="default"),
        Chip("h100", "cuda", "NVIDIA H100 80GB HBM3", 989e12, 3.35e12, 80 * 10**9,
             smem_per_block=232448, registers_per_block=65536, target_config="h100.txtpb"),
        Chip("h200", "cuda", "NVIDIA H200", 989e12, 4.8e12, 141 * 10**9,
             smem_per_block=232448, registers_per_block=65536, target_config="h200.txtpb"),
    )
}  # fmt: skip

# jax device_kind spellings -> table entry (first match wins).
_KIND_PATTERNS = (
    (r"^tpu v4", "v4"),
    (r"^tpu v5 ?(lite|e)\b", "v5e"),
    (r"^tpu v5", "v5p"),
    (r"^tpu v6", "v6e"),
    (r"\bh200\b", "h200"),
    (r"\bh100\b", "h100"),
)


def chip_for_kind(device_kind: str | None) -> Chip | None:
    """The table entry for a jax device_kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3"), or None."""
    if not device_kind:
        return None
    kind = device_kind.lower()
    for pattern, name in _KIND_PATTERNS:
        if re.search(pattern, kind):
            return CHIPS[name]
    return None


def get_chip(name: str) -> Chip:
    """CHIPS[name] with a clear error for an unknown name."""
    if name not in CHIPS:
        raise ValueError(f"target={name!r} is invalid: must be one of {sorted(CHIPS)}")
    return CHIPS[name]


# The chip a platform's kernels are tuned for when the device kind is not known at trace time:
# the one with the least on-chip memory, so the tiles fit every chip of that platform.
FALLBACK = {"tpu": "v4", "cuda": "h100"}


# ----------------------------------------------------------------------------------------------------------
# TPU slices by their Cloud names


@dataclasses.dataclass(frozen=True)
class Pod:
    """A TPU slice by its Cloud accelerator name: "v5p-64" (v4, v5p: the count is TensorCores, two
    per chip, so 32 chips), "v6e-64" (v5e, v6e: the count is chips)."""

    name: str
    chip: Chip
    shape: tuple[int, ...]  # chips along each axis of the slice: (2, 4, 4), (8, 8)

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology(self) -> str:
        """libtpu's topology name: "v5p:2x4x4"; for GPU nodes, the CUDA plugin's "1x<hosts>x<GPUs a host>"."""
        if self.chip.platform == "cuda":
            return "1x" + "x".join(map(str, self.shape))
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Four chips a host (2x2), as on v4, v5p and the v5e/v6e hosts of 4 chips."""
        dims = self.shape + (1,) * (3 - len(self.shape))
        return (min(dims[0], 2), min(dims[1], 2), 1)

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus wrap-around links: v4 and v5p slices of whole 4x4x4 cubes."""
        cube = len(self.shape) == 3 and all(d >= 4 and d % 4 == 0 for d in self.shape)
        return (cube,) * 3


# Cores counted by the Cloud name per chip, the slice's rank (0: GPUs, 8 a host), the largest count.
_POD_RULES = {"v4": (2, 3, 4096), "v5p": (2, 3, 8192), "v5e": (1, 2, 256), "v6e": (1, 2, 256),
              "h100": (1, 0, 1024), "h200": (1, 0, 1024)}  # fmt: skip
GPUS_PER_HOST = 8
_POD_ALIASES = {"v5litepod": "v5e"}


def _slice_shape(chips: int, rank: int) -> tuple[int, ...]:
    """Google's slice shapes: double the smallest axis (the last of equal ones) from 2x2x1 or 1x1:
    8 chips -> 2x2x2 / 2x4, 32 -> 2x4x4 / 4x8, 64 -> 4x4x4 / 8x8. GPUs (rank 0): (hosts, GPUs a host)."""
    if rank == 0:
        return (max(chips // GPUS_PER_HOST, 1), min(chips, GPUS_PER_HOST))
    shape = [2, 2, 1] if rank == 3 else [1, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        index = max(i for i, d in enumerate(shape) if d == smallest)
        shape[index] *= 2
    return tuple(shape)


def get_pod(name: str) -> Pod:
    """The slice named `name` ("v5p-64", "v4-32", "v5e-16", "v6e-256"; "h200-8": a node of 8 GPUs,
    "h100-16": two), with a clear error otherwise."""
    match = re.fullmatch(r"([a-z]+\d+[a-z]*)-(\d+)", name.strip().lower())
    kind = match and _POD_ALIASES.get(match.group(1), match.group(1))
    if not match or kind not in _POD_RULES:
        raise ValueError(
            f"topology={name!r} is invalid: must be <chip>-<count> with chip one of {sorted(_POD_RULES)} "
            "(e.g. v5p-64: 64 TensorCores = 32 chips; v6e-64: 64 chips; h200-8: 8 GPUs)"
        )
    per_chip, rank, largest = _POD_RULES[kind]
    count = int(match.group(2))
    chips = count // per_chip
    smallest = 4 if rank == 3 else 1
    power_of_two = chips & (chips - 1) == 0
    shaped = (power_of_two or chips % GPUS_PER_HOST == 0) if rank == 0 else power_of_two
    if count % per_chip or chips < smallest or count > largest or not shaped:
        unit = "TensorCores (2 a chip)" if per_chip == 2 else "GPUs" if rank == 0 else "chips"
        whole = " (or whole hosts of 8)" if rank == 0 else ""
        raise ValueError(
            f"topology={name!r} is invalid: {kind} slices count {unit}, a power of two{whole} from "
            f"{smallest * per_chip} to {largest}"
        )
    return Pod(f"{kind}-{count}", CHIPS[kind], _slice_shape(chips, rank))
