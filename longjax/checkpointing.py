"""Orbax checkpoints of a training run: train state, data-iterator state, config, phase and step.

One `CheckpointManager` under `<workdir>/checkpoints` keeps the last N steps,
saving asynchronously. Orbax writes each step into a temporary directory and
renames it when complete, so a checkpoint a crash left half-written is never
listed; a listed checkpoint that still fails to restore is reported and the
next older one is used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from longjax import experiment

# Fields that say where to find things, not what the experiment is.
_RESUME_IGNORED_FIELDS = ("allow_config_change", "data.dir", "data.download")


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

    def restore_latest(self, abstract_state) -> Restored | None:
        """The newest checkpoint that restores, or None when there is none.

        Args:
          abstract_state: the train state's structure with shapes, dtypes and
            shardings (`jax.ShapeDtypeStruct` leaves) to restore onto.
        """
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, loudly
                print(
                    f"checkpoint {step} in {self.directory} does not restore ({type(e).__name__}: {e}); "
                    "trying an older one",
                    file=sys.stderr, flush=True,
                )
                continue
            return Restored(step, restored["state"], restored["data"], restored["meta"])
        return None

    def restore_meta(self, step: int) -> dict:
        """Only the meta of checkpoint `step` (for tools that rebuild the model from it)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_params(self, step: int, abstract_state):
        """The train state of checkpoint `step`."""
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
