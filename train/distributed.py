"""Multi-process start-up: jax.distributed.initialize from the config or the environment.

TPU pods, SLURM and Open MPI are detected by JAX itself. Elsewhere (GPU or CPU clusters, or two
processes on one machine) give the coordinator's host:port, the process count and this process's id,
in the config or as JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax

log = logging.getLogger("train")

MODES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """initialize: "auto" starts jax.distributed when a coordinator is given (config or environment)
    or on a TPU pod; "always" / "never" force it."""

    initialize: str = "auto"
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    cpu_collectives: str = "gloo"  # cross-process collectives between CPU devices

    def __post_init__(self):
        if self.initialize not in MODES:
            raise ValueError(f"distributed.initialize={self.initialize!r} is invalid: must be one of {MODES}")
        for field in ("num_processes", "process_id"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"distributed.{field}={value!r} is invalid: must be an integer >= 0 or null")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"distributed.num_processes={self.num_processes!r} is invalid: must be >= 1")
        if self.cpu_collectives not in ("gloo", "mpi", "none"):
            raise ValueError(
                f"distributed.cpu_collectives={self.cpu_collectives!r} is invalid: must be gloo, mpi or none"
            )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def _on_tpu_pod() -> bool:
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(cfg: DistributedConfig) -> None:
    """Starts jax.distributed when cfg asks for it; a no-op for a single process. Call before any
    other use of jax (it must come before the backends start)."""
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if cfg.initialize == "never" or (cfg.initialize == "auto" and not address and not _on_tpu_pod()):
        return
    if jax.distributed.is_initialized():
        return
    if cfg.cpu_collectives != "none":
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    num_processes = cfg.num_processes if cfg.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = cfg.process_id if cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=process_id
    )
    log.info(
        "jax.distributed: process %d of %d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
