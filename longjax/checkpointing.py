"""Orbax checkpoints of a training run: train state, data-iterator state, config, phase and step.

One `CheckpointManager` under `<workdir>/checkpoints` keeps the last N steps,
saving asynchronously. Orbax writes each step into a temporary directory and
renames it when complete, so a checkpoint a crash left half-written is never
listed; a listed checkpoint that still fails to restore is reported, set aside,
and the next older one is used (see `Checkpointer.restore_latest`).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from longjax import experiment

# Fields that say where to find things, not what the experiment is.
_RESUME_IGNORED_FIELDS = ("allow_config_change", "data.dir", "data.download")


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be restored."""


class Restored:
    """A restored checkpoint: `state`, `data_state` (iterator JSON), `meta` (step, phase, config)."""

    def __init__(self, step: int, state, data_state: dict, meta: dict):
        self.step, self.state, self.data_state, self.meta = step, state, data_state, meta


class Checkpointer:
    """Saves and restores `(TrainState, iterator state, meta)` under `<workdir>/checkpoints`."""

    def __init__(self, workdir, *, keep: int, async_save: bool):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def steps(self) -> list[int]:
        """Steps of complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        """Starts saving (asynchronously when configured); `wait()` blocks until it is on disk."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore_latest(self, abstract_state, check_meta: Callable[[dict], None]) -> Restored | None:
        """The newest checkpoint that restores, or None when the directory holds none.

        Each candidate's meta is read and passed to `check_meta` before any array
        is restored, so a config check (which may raise) sees every run, whatever
        its shapes. A checkpoint that does not restore is reported and the next
        older one is tried; when an older one restores, the newer unreadable ones
        are moved to `<workdir>/checkpoints_unreadable/` (kept for inspection, and
        so that the resumed run can save those steps again). When checkpoints exist
        but none restores, nothing is moved and `CheckpointError` is raised: a run
        never silently restarts from scratch over an existing one.

        Args:
          abstract_state: the train state's structure with shapes, dtypes and
            shardings (`jax.ShapeDtypeStruct` leaves) to restore onto.
          check_meta: called with each candidate's meta; raises to refuse it.
        """
        unreadable = []
        for step in reversed(self.steps()):
            try:
                meta = self.restore_meta(step)
            except Exception as e:  # noqa: BLE001 - reported, and the run stops if nothing restores
                unreadable.append((step, e))
                continue
            check_meta(meta)
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # noqa: BLE001 - as above
                unreadable.append((step, e))
                continue
            for bad_step, error in unreadable:
                self._quarantine(bad_step, error)
            return Restored(step, restored["state"], restored["data"], meta)
        if unreadable:
            raise CheckpointError(
                f"{self.directory} holds checkpoints but none restores: "
                + "; ".join(f"step {step}: {type(e).__name__}: {e}" for step, e in unreadable)
            )
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        destination = self.directory.parent / "checkpoints_unreadable" / f"{step}-{time.time_ns()}"
        if jax.process_index() == 0:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), destination)
        print(
            f"checkpoint {step} does not restore ({type(error).__name__}: {error}); "
            f"moved to {destination}, resuming from an older one",
            file=sys.stderr, flush=True,
        )
        self.manager.reload()

    def restore_meta(self, step: int) -> dict:
        """Only the meta of checkpoint `step` (for tools that rebuild the model from it)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_state(self, step: int, abstract_state):
        """The train state (parameters and optimizer state) of checkpoint `step`."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def config_json(config) -> str:
    """The config as JSON (tuples as lists), for the checkpoint meta and the workdir."""
    return config.to_json(sort_keys=True)


def config_differences(saved_json: str, config) -> list[str]:
    """`'field: saved -> now'` for every field that differs between a saved config and `config`."""
    saved = experiment.flatten(json.loads(saved_json))
    current = experiment.flatten(json.loads(config_json(config)))
    fields = sorted(set(saved) | set(current))
    return [
        f"{field}: {saved.get(field, '<absent>')!r} -> {current.get(field, '<absent>')!r}"
        for field in fields
        if field not in _RESUME_IGNORED_FIELDS and saved.get(field) != current.get(field)
    ]


def abstract(tree: Any, sharding) -> Any:
    """ShapeDtypeStructs of `tree` placed with `sharding`, for `restore_latest`."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
