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
