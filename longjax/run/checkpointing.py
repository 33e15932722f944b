"""Orbax checkpoints of a training run: train state, data-iterator state, and meta (step, phase, config).

One `CheckpointManager` under `<workdir>/checkpoints` keeps the last N steps,
saving asynchronously. Orbax writes each step into a temporary directory and
renames it when complete, so a checkpoint a crash left half-written is never
listed; a listed checkpoint that still fails to restore is reported, set aside,
and the next older one is used (see `Checkpointer.restore_latest`).

`read_params` reads only the parameters of another run's newest checkpoint,
for `init_from`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from longjax import sections
from longjax.run.errors import CheckpointError, InitFromError, brief

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
# Fields that say where to find things, not what the experiment is.
# The mesh says where the run is placed: a checkpoint restores onto any mesh shape.
_RESUME_IGNORED_FIELDS = (
    "allow_config_change", "data.dir", "data.download", "mesh.data", "mesh.fsdp", "mesh.sequence",
    "mesh.distributed", "mesh.coordinator_address", "mesh.num_processes", "mesh.process_id",
)


class Restored:
    """A restored checkpoint: `state`, `data_state` (iterator JSON), `meta` (step, phase, config, ...)."""

    def __init__(self, step: int, state, data_state: dict, meta: dict):
        self.step, self.state, self.data_state, self.meta = step, state, data_state, meta


def _silence_abandoned_reads() -> None:
    """Keeps the late complaints of a failed restore's abandoned reads off stderr (installed before restoring).

    When one array of a checkpoint fails to read, orbax raises that error, closes
    its event loop and abandons the other reads still in flight. Each of them
    complains later, from a storage thread or when it is garbage collected
    ("Task exception was never retrieved", "Exception ignored in: <coroutine>",
    "RuntimeError: Event loop is closed"): hundreds of lines, each with a page
    of storage spec, that repeat the error already reported and bury the one
    line that matters. Only those reports are dropped (asyncio's "never
    retrieved" records and "never awaited" warnings, and unraisable errors of
    orbax coroutines or of a closed event loop); anything else still reaches
    Python's hooks.
    """
    if getattr(sys.unraisablehook, "_longjax_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        from_orbax = (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename) or _raised_in_orbax(
            unraisable.exc_value
        )
        closed_loop = unraisable.object is None and str(unraisable.exc_value) == "Event loop is closed"
        if not (from_orbax or closed_loop):
            previous(unraisable)

    def keep(record: logging.LogRecord) -> bool:
        # longjax runs no asyncio of its own: the event loops are orbax's and TensorStore's.
        return "exception was never retrieved" not in record.getMessage()

    hook._longjax_filter = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(keep)
    # Not narrowed by module: Python attributes a "never awaited" warning to whatever frame
    # runs when the coroutine is collected, which may be anywhere (seen: a stray line after
    # the error line, once in a full suite run on a loaded machine).
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)


def _raised_in_orbax(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, passed through orbax's code."""
    while error is not None:
        tb = error.__traceback__
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        error = error.__cause__ or error.__context__
    return False


def _options(keep: int | None, async_save: bool, read_only: bool) -> ocp.CheckpointManagerOptions:
    # Reading only: nothing is created, and a manager that never saves deletes nothing. (Orbax's own
    # read_only option warns on every use.)
    return ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save and not read_only,
        create=not read_only,
    )


class Checkpointer:
    """Saves and restores `(TrainState, iterator state, meta)` under `<workdir>/checkpoints`.

    Args:
      workdir: the run's directory.
      keep: the number of newest checkpoints kept.
      async_save: save in a background thread (`wait()` blocks until written).
      read_only: never create, write or move anything (evaluation).
    """

    def __init__(self, workdir, *, keep: int = 3, async_save: bool = False, read_only: bool = False):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        self.read_only = read_only
        self.manager = ocp.CheckpointManager(self.directory, options=_options(keep, async_save, read_only))
        self._metas: dict[int, dict] = {}

    def steps(self) -> list[int]:
        """Steps of complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def resolve_step(self, step: int | None) -> int:
        """`step`, or the newest step when None, checked to be a complete checkpoint.

        Raises:
          CheckpointError: there is no such checkpoint (or none at all).
        """
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}: is it a training run's workdir?")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"{self.directory} has no checkpoint at step {step}; it has {steps}")
        return step

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        """Starts saving (asynchronously when configured); `wait()` blocks until it is on disk."""
        if self.read_only:
            raise RuntimeError(f"this Checkpointer of {self.directory} is read-only")
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def meta(self, step: int) -> dict:
        """The meta of checkpoint `step` (read once, then remembered)."""
        if step not in self._metas:
            self._metas[step] = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return self._metas[step]

    def restore(self, step: int, abstract_state) -> Restored:
        """Checkpoint `step` onto `abstract_state` (shapes, dtypes, shardings).

        Raises:
          CheckpointError: it does not restore (the message is one line).
        """
        restored = self._try_restore(step, abstract_state)
        if isinstance(restored, str):
            raise CheckpointError(f"checkpoint {step} in {self.directory} does not restore ({restored})")
        return restored

    def _try_restore(self, step: int, abstract_state) -> Restored | str:
        """The restored checkpoint, or why it does not restore."""
        _silence_abandoned_reads()
        try:
            meta = self.meta(step)
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
            )
        except Exception as e:  # noqa: BLE001 - storage and structure errors alike; reported in one line
            return brief(e)
        return Restored(step, restored["state"], restored["data"], meta)

    def restore_latest(self, abstract_state, check_meta: Callable[[dict], None]) -> Restored | None:
        """The newest checkpoint that restores, or None when the directory holds none.

        Each candidate's meta is read and passed to `check_meta` before any array
        is restored, so a config check (which may raise) sees every run, whatever
        its shapes. A checkpoint that does not restore is reported and the next
        older one is tried; when an older one restores, the newer unreadable ones
        are moved to `<workdir>/checkpoints_unreadable/` (kept for inspection, and
        so that the resumed run can save those steps again). When checkpoints exist
        but none restores, nothing is moved and `CheckpointError` is raised, in one
        line: a run never silently restarts from scratch over an existing one.

        Args:
          abstract_state: the train state's structure with shapes, dtypes and
            shardings (`jax.ShapeDtypeStruct` leaves) to restore onto.
          check_meta: called with each candidate's meta; raises to refuse it.
        """
        unreadable = []
        for step in reversed(self.steps()):
            try:
                meta = self.meta(step)
            except Exception as e:  # noqa: BLE001 - reported, and the run stops if nothing restores
                unreadable.append((step, f"its meta does not read ({brief(e)})"))
                continue
            check_meta(meta)
            restored = self._try_restore(step, abstract_state)
            if isinstance(restored, str):
                unreadable.append((step, restored))
                continue
            for bad_step, reason in unreadable:
                if not self.read_only:
                    self._quarantine(bad_step, reason)
            return restored
        if unreadable:
            raise CheckpointError(
                f"{self.directory} holds checkpoints but none restores ("
                + "; ".join(f"step {step}: {reason}" for step, reason in unreadable)
                + f"). Nothing was changed: move the damaged step directories out of {self.directory} "
                "to start that run again, or use another --workdir"
            )
        return None

    def _quarantine(self, step: int, reason: str) -> None:
        destination = self.directory.parent / UNREADABLE_DIR / f"{step}-{time.time_ns()}"
        if jax.process_index() == 0:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), destination)
        print(
            f"checkpoint {step} does not restore ({reason}); "
            f"moved to {destination}, resuming from an older one",
            file=sys.stderr, flush=True,
        )
        self._metas.pop(step, None)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for a pending save and stops orbax's background machinery; safe on any path."""
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()


def read_params(directory, abstract_params, sharding) -> tuple[dict, set, int, Path]:
    """The parameters of the newest checkpoint that restores under `directory`, for `init_from`.

    Args:
      directory: a run's workdir (holding `checkpoints/`) or a checkpoint directory itself.
      abstract_params: the parameters this run's model has (`ShapeDtypeStruct`
        leaves); only these are read, each where the checkpoint has a leaf at
        the same path, onto `sharding`.
      sharding: where the read arrays go.

    Returns:
      (the read parameters, every parameter path the checkpoint holds, its step, the checkpoint directory).

    Raises:
      InitFromError: no checkpoint there, or none restores.
    """
    directory = Path(directory).expanduser().absolute()
    if (directory / CHECKPOINT_DIR).is_dir():
        directory = directory / CHECKPOINT_DIR
    if not directory.is_dir():
        raise InitFromError(f"init_from: {directory} is not a directory; give a run's workdir or its checkpoints")
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={
            "state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
        options=_options(None, False, True),
    )
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise InitFromError(f"init_from: {directory} holds no checkpoint")
        errors = []
        _silence_abandoned_reads()
        for step in reversed(steps):
            try:
                saved = jax.tree_util.tree_map(
                    lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), manager.item_metadata(step)["state"]
                )["params"]
                saved_leaves = traverse_util.flatten_dict(saved)
                wanted = traverse_util.unflatten_dict({
                    path: saved_leaves[path] for path in traverse_util.flatten_dict(abstract_params)
                    if path in saved_leaves
                })
                if not wanted:  # nothing in common: the caller says so
                    return {}, set(saved_leaves), step, directory
                restore_args = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), wanted)
                restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item={"params": wanted}, restore_args={"params": restore_args}, partial_restore=True,
                )))
                return restored["state"]["params"], set(saved_leaves), step, directory
            except Exception as e:  # noqa: BLE001 - storage and structure errors alike, in one line
                errors.append(f"step {step}: {brief(e)}")
        raise InitFromError(f"init_from: no checkpoint in {directory} restores ({'; '.join(errors)})")
    finally:
        manager.close()


def config_differences(saved_json: str, config_json: str) -> list[str]:
    """`'field: saved -> now'` for every field that differs between two configs' JSON."""
    saved = sections.flatten(json.loads(saved_json))
    current = sections.flatten(json.loads(config_json))
    fields = sorted(set(saved) | set(current))
    return [
        f"{field}: {saved.get(field, '<absent>')!r} -> {current.get(field, '<absent>')!r}"
        for field in fields
        if field not in _RESUME_IGNORED_FIELDS and saved.get(field) != current.get(field)
    ]


def abstract(tree: Any, sharding) -> Any:
    """ShapeDtypeStructs of `tree` placed with `sharding` (one for every leaf, or a tree like `tree`),
    for restoring onto."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding
    )
