"""Orbax checkpoints of the training state together with the Grain data iterator.

Layout: ``<directory>/<step>/{state,data}`` where ``state`` is an Orbax StandardSave pytree (OCDBT, sharded
arrays written per shard) and ``data`` holds one JSON file per process with that process's Grain iterator
state. Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when it is complete
(on GCS it writes in place and adds ``commit_success.txt`` last); steps without that signal are never listed,
and leftovers of an interrupted save are deleted when a Checkpointer is created.

Semantics the training loop can rely on:

* Saving a step that is already saved (or being saved), e.g. ``save(step, force=True)`` at the end after a
  periodic save of the same step, does nothing and returns False.
* Async saving: ``save`` returns after the arrays were copied to host memory and the iterator state was
  taken; the writing goes on in a background thread. The state's buffers may therefore be donated to the
  next jitted step, and the iterator advanced, right after ``save`` returns. A new ``save`` first waits for
  the previous one; ``wait``/``close`` block until everything is on disk and re-raise a failed write.
* SIGTERM: let the handler only set a flag; at the next step boundary the loop calls
  ``save(step, force=True)`` and ``close()``. A kill during the write leaves a temporary directory that is
  ignored (and removed next time), so the previous checkpoint stays the latest.
* Multi-process: every process calls every method with the same arguments (Orbax adds the barriers; call
  only from the main thread). Each process saves and restores its own iterator state, so restoring needs
  the same process count. Saves also happen at JAX's preemption sync point when ``jax.distributed`` runs
  the preemption service, which is why ``save`` should be called every step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import grain.checkpoint as grain_ckpt
import orbax.checkpoint as ocp

PyTree = Any
log = logging.getLogger(__name__)


class CheckpointRestoreError(RuntimeError):
    """Checkpoints exist but none of them could be restored."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and how many checkpoints to keep."""

    every: int = 1000  # save every N steps (>= 1)
    keep: int = 3  # keep the last K checkpoints (>= 1)
    async_save: bool = True  # write in a background thread

    def __post_init__(self) -> None:
        for field in ("every", "keep"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} is invalid: must be an integer >= 1")
        if not isinstance(self.async_save, bool):
            raise ValueError(f"async_save={self.async_save!r} is invalid: must be a bool")


class Checkpointer:
    """Saves {state pytree, data iterator state} together under ``directory/<step>``."""

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig) -> None:
        path = os.fspath(directory)
        if "://" not in path:
            path = os.path.abspath(path)  # Orbax's tensorstore specs need absolute local paths
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(cfg.every), policies.PreemptionCheckpointingPolicy()]
            ),
            enable_async_checkpointing=cfg.async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.cfg = cfg
        self._manager = ocp.CheckpointManager(path, options=options)
        self._unreadable: list[int] = []  # newer steps skipped by the last restore_latest

    @property
    def directory(self) -> str:
        return os.fspath(self._manager.directory)

    def save(self, step: int, state: PyTree, data_iterator: Any = None, *, force: bool = False) -> bool:
        """Saves when ``step % every == 0`` or ``force``; returns whether it saved (see module doc).

        ``state``: pytree of jax.Arrays (any sharding), containers and scalars. ``data_iterator``: a Grain
        DatasetIterator (or DataLoaderIterator) whose state is saved alongside, or None.
        """
        self._drop_unreadable()
        if step in self._manager.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain_ckpt.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, abstract_state: PyTree, data_iterator: Any = None) -> tuple[int, PyTree] | None:
        """Restores the newest readable checkpoint as ``(step, state)``; None if there is none at all.

        ``abstract_state`` has jax.ShapeDtypeStruct leaves carrying the target shardings (any mesh). The
        iterator's state is set in place. A checkpoint that fails to restore is logged as a warning and the
        next older one is tried; those newer unreadable steps are deleted at the next ``save`` so that the
        run can write those step numbers again. Raises CheckpointRestoreError if none can be restored.
        """
        self.wait()
        errors: list[tuple[int, Exception]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = grain_ckpt.CheckpointRestore(data_iterator)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as error:  # corrupt, truncated or missing files all surface differently
                log.warning(
                    "checkpoint step %d in %s cannot be restored (%s: %s); trying an older one",
                    step,
                    self.directory,
                    type(error).__name__,
                    error,
                )
                errors.append((step, error))
                continue
            self._unreadable = [bad for bad, _ in errors]
            return step, restored["state"]
        if not errors:
            return None
        details = "; ".join(f"step {step}: {type(error).__name__}: {error}" for step, error in errors)
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} could be restored ({details})"
        ) from errors[-1][1]

    def latest_step(self) -> int | None:
        """The newest step on disk or being saved, or None."""
        return self._manager.latest_step()

    def wait(self) -> None:
        """Blocks until asynchronous saves are finished; re-raises a failed one."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _drop_unreadable(self) -> None:
        steps, self._unreadable = self._unreadable, []
        for step in steps:
            if step in self._manager.all_steps():
                log.warning("deleting unreadable checkpoint step %d in %s", step, self.directory)
                self._manager.delete(step)
