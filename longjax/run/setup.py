"""One set-up for training and evaluation: devices, mesh, optimizer, data, and the state to start from.

Initialisation order (the one place it is decided):

1. resume: this workdir's own newest checkpoint that restores (evaluation: the
   checkpoint asked for, the newest by default);
2. else `init_from`: parameters from another run's checkpoint (or a converted
   one in the same layout), or from a Hugging Face checkpoint directory
   (config.json plus weights, read by the task's `params_from_pretrained`),
   the optimizer fresh, step 0;
3. else from scratch: parameters from `key(seed)`, step 0.

Training reads everything it needs (devices, data, the workdir's checkpoints,
`init_from`) before it writes anything, so a run that cannot start leaves the
workdir as it found it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from longjax import tasks
from longjax.hf import checkpoint_files
from longjax.run import checkpointing, steps
from longjax.run.errors import ConfigChangedError, DeviceError, InitFromError
from longjax.run.plan import MESH_AXES, ExperimentPlan

# Batches are split over both; the data axis alone keeps whole parameter copies.
BATCH_AXES = MESH_AXES[:2]
FSDP_AXIS = MESH_AXES[1]


@dataclasses.dataclass
class Run:
    """What `setup` prepared; a context manager that closes the checkpointer.

    Attributes:
      plan, task: the experiment and its task.
      workdir: the run's directory.
      mesh: the device mesh (axes `MESH_AXES`); `replicated`, `batch_sharding`
        (leading axis over `data` and `fsdp`) and `state_sharding` (a tree
        like the train state: each array sharded over `fsdp` along one
        dimension, `fsdp_spec`) are its shardings. Entering the run makes the
        mesh the context's (`jax.set_mesh`), which sequence-parallel
        attention needs.
      tx: the optimizer.
      data: the task's data (`task.load_data`).
      checkpointer: the workdir's checkpoints.
      state: the train state to start from, placed with `state_sharding`.
      step: its step.
      restored: the checkpoint it came from when resumed (None otherwise).
      origin: 'resumed', 'init_from' or 'scratch'.
      notes: lines to report once the run's log is open (what came from where).
    """

    plan: ExperimentPlan
    task: tasks.Task
    workdir: Path
    mesh: Mesh
    replicated: NamedSharding
    batch_sharding: NamedSharding
    state_sharding: Any
    tx: Any
    data: Any
    checkpointer: checkpointing.Checkpointer
    state: steps.TrainState
    step: int
    restored: checkpointing.Restored | None
    origin: str
    notes: list[str]

    def close(self) -> None:
        self.checkpointer.close()

    def __enter__(self) -> Run:
        self._mesh_context = jax.set_mesh(self.mesh)
        self._mesh_context.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self.close()
        finally:
            self._mesh_context.__exit__(*exc_info)


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """Where an array of `shape` is split over the fsdp axis of size `fsdp`: its largest dimension
    that `fsdp` divides (the last of equals), or nowhere (replicated) when none does."""
    if fsdp == 1:
        return PartitionSpec()
    divisible = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible)[1]
    return PartitionSpec(*([None] * axis + [FSDP_AXIS]))


def placement_note(mesh: Mesh, state) -> str:
    """A line on the mesh and what the train state costs each device."""
    leaves = jax.tree_util.tree_leaves(state)
    whole = sum(x.size * x.dtype.itemsize for x in leaves)
    # Every device holds the same amount: its shard of each split array, a copy of the others.
    per_device = sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves
    )
    axes = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
    return (
        f"mesh {axes}: parameters and optimizer state {per_device / 2**20:.2f} MiB per device "
        f"of {whole / 2**20:.2f} MiB"
    )


def state_shardings(abstract_state, mesh: Mesh):
    """A tree like `abstract_state` of its leaves' shardings over the fsdp axis (`fsdp_spec`)."""
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), abstract_state)


def make_mesh(plan: ExperimentPlan) -> Mesh:
    """The mesh `plan.mesh` describes over every device, after checking that the phases' batches divide over it.

    Raises:
      DeviceError: naming the field that does not fit the devices.
    """
    devices = np.array(jax.devices())
    try:
        shape = plan.mesh.shape(devices.size)
    except ValueError as e:
        raise DeviceError(str(e)) from e
    batch_split = shape[0] * shape[1]
    if jax.process_count() > 1 and jax.local_device_count() % shape[2]:
        # Each process loads its own rows of a batch; a sequence split across processes would need
        # the same rows on several of them.
        raise DeviceError(
            f"mesh.sequence ({shape[2]}) must divide the {jax.local_device_count()} devices of each process"
        )
    for phase in plan.phases:
        for count, what in ((batch_split, "devices of mesh.data x mesh.fsdp"), (jax.process_count(), "processes")):
            if phase.batch_size % count:
                raise DeviceError(
                    f"phases.batch_size[{phase.index}] ({phase.batch_size}) must be a multiple of the "
                    f"{count} {what}"
                )
        accumulation = plan.optimizer.grad_accumulation
        if accumulation > 1 and phase.batch_size % (batch_split * accumulation):
            raise DeviceError(
                f"phases.batch_size[{phase.index}] ({phase.batch_size}) must be a multiple of the {batch_split} "
                f"devices of mesh.data x mesh.fsdp times optimizer.grad_accumulation ({accumulation}), so that "
                "every micro-batch splits evenly over them"
            )
    # Auto axes: the compiler places what the run does not pin (the ops shard_map their own axis).
    return Mesh(devices.reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def setup(plan: ExperimentPlan, workdir, *, evaluate: bool = False, step: int | None = None) -> Run:
    """Devices, data, optimizer and the starting state of `plan` in `workdir`.

    Args:
      plan: the experiment.
      workdir: the run's directory.
      evaluate: set up to evaluate checkpoint `step` of the workdir (the
        newest when None), reading only. Otherwise set up to train.

    Raises:
      DeviceError, data errors of the task, ConfigChangedError, CheckpointError, InitFromError.
    """
    if plan.mesh.distributed:
        plan.mesh.initialize_distributed()
    task = tasks.get(plan.task)
    mesh = make_mesh(plan)
    replicated = NamedSharding(mesh, PartitionSpec())
    data = task.load_data(plan)
    tx = steps.optimizer(plan.optimizer)
    model = task.build_model(plan.phases[0].model)

    def fresh_state():
        return steps.init_state(task.init_params(model, jax.random.key(plan.seed)), tx)

    with jax.set_mesh(mesh):
        shapes = jax.eval_shape(fresh_state)
    state_sharding = state_shardings(shapes, mesh)
    abstract_state = checkpointing.abstract(shapes, state_sharding)
    workdir = Path(workdir)
    parts = dict(
        plan=plan, task=task, workdir=workdir, mesh=mesh, replicated=replicated,
        batch_sharding=NamedSharding(mesh, PartitionSpec(BATCH_AXES)), state_sharding=state_sharding,
        tx=tx, data=data,
    )
    if evaluate:
        return _evaluation_run(parts, abstract_state, step)

    checkpoints = workdir / checkpointing.CHECKPOINT_DIR
    checkpointer = None
    restored = None
    try:
        if checkpoints.is_dir():
            checkpointer = _checkpointer(plan, workdir)
            restored = checkpointer.restore_latest(
                abstract_state, lambda meta: _check_resumable(meta, plan, data, workdir)
            )
        notes = []
        if restored is not None:
            state, start_step, origin = restored.state, restored.step, "resumed"
            notes.append(f"resumed from the checkpoint at step {start_step} in {checkpointer.directory}")
            if plan.init_from:
                notes.append(f"init_from ({plan.init_from}) not used: the run's own checkpoint comes first")
        else:
            with jax.set_mesh(mesh):
                state = jax.jit(fresh_state, out_shardings=state_sharding)()
            start_step, origin = 0, "scratch"
            if plan.init_from:
                # Read whole, then placed like the fresh parameters.
                params, note = _params_from(plan, task, state.params, replicated)
                state = state.replace(params=jax.device_put(params, state_sharding.params))
                origin = "init_from"
                notes.append(note)
        if mesh.size > 1:
            notes.insert(0, placement_note(mesh, state))
        if checkpointer is None:
            checkpointer = _checkpointer(plan, workdir)
    except BaseException:
        if checkpointer is not None:
            checkpointer.close()
        raise
    return Run(**parts, checkpointer=checkpointer, state=state, step=start_step, restored=restored,
               origin=origin, notes=notes)


def _checkpointer(plan, workdir) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(workdir, keep=plan.checkpoint.keep, async_save=plan.checkpoint.async_save)


def _check_resumable(meta: dict, plan: ExperimentPlan, data, workdir) -> None:
    """Refuses to resume a checkpoint written with another config or other data (unless allowed)."""
    if plan.allow_config_change:
        return
    differences = checkpointing.config_differences(meta["config"], plan.config_json)
    if differences:
        raise ConfigChangedError(
            f"{workdir} holds a run with another config; differing fields (saved -> now): "
            + "; ".join(differences)
            + ". Use another --workdir, or pass --config.allow_config_change=True to resume anyway."
        )
    if meta["data"] != data.fingerprint:
        raise ConfigChangedError(
            f"{workdir} was trained on data with fingerprint {meta['data']}, this data has {data.fingerprint}. "
            "Use another --workdir, or pass --config.allow_config_change=True to resume anyway."
        )


def _evaluation_run(parts: dict, abstract_state, step: int | None) -> Run:
    plan, workdir, data = parts["plan"], parts["workdir"], parts["data"]
    checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
    try:
        step = checkpointer.resolve_step(step)
        restored = checkpointer.restore(step, abstract_state)
        if restored.meta["data"] != data.fingerprint:
            raise ConfigChangedError(
                f"checkpoint {step} was trained on data with fingerprint {restored.meta['data']}, "
                f"the data here has {data.fingerprint}"
            )
    except BaseException:
        checkpointer.close()
        raise
    return Run(**parts, checkpointer=checkpointer, state=restored.state, step=step, restored=restored,
               origin="resumed", notes=[])


def is_hf_checkpoint(directory) -> bool:
    """Whether `directory` is a Hugging Face checkpoint (config.json beside weights), not a run's workdir."""
    directory = Path(directory).expanduser()
    return (directory / "config.json").is_file() and any(
        (directory / name).is_file() for name in checkpoint_files.WEIGHT_FILES
    )


def _params_from(plan: ExperimentPlan, task, fresh_params, sharding) -> tuple[Any, str]:
    """`fresh_params` with every leaf that `plan.init_from` holds taken from it, and a note.

    `init_from` is a run's workdir or checkpoint directory (its newest
    checkpoint), or a Hugging Face checkpoint directory, which the task reads
    into its own model's parameter layout (`Task.params_from_pretrained`).
    """
    directory = plan.init_from
    if is_hf_checkpoint(directory):
        tree, what = task.params_from_pretrained(plan, Path(directory).expanduser())
        flat_tree = traverse_util.flatten_dict(tree)
        saved_paths = set(flat_tree)
        flat_fresh_keys = set(traverse_util.flatten_dict(fresh_params))
        loaded = traverse_util.unflatten_dict({
            path: jax.device_put(np.asarray(x), sharding) for path, x in flat_tree.items() if path in flat_fresh_keys
        })
        origin = what
    else:
        loaded, saved_paths, step, source = checkpointing.read_params(
            directory, checkpointing.abstract(fresh_params, sharding), sharding
        )
        origin = f"checkpoint {step} in {source}"
    flat_fresh = traverse_util.flatten_dict(fresh_params)
    flat_loaded = traverse_util.flatten_dict(loaded) if loaded else {}
    mismatched = [
        f"{'/'.join(path)}: {tuple(flat_loaded[path].shape)} there, {tuple(x.shape)} here"
        for path, x in flat_fresh.items()
        if path in flat_loaded and flat_loaded[path].shape != x.shape
    ]
    if mismatched:
        raise InitFromError(
            f"init_from: {len(mismatched)} parameter(s) of {origin} have other shapes than "
            f"this model's ({'; '.join(mismatched[:5])}{'; ...' if len(mismatched) > 5 else ''}): "
            "the model config differs from the one that checkpoint was trained with"
        )
    if not flat_loaded:
        raise InitFromError(
            f"init_from: {origin} holds none of this model's {len(flat_fresh)} parameters "
            "(another model family?)"
        )
    merged = {
        path: flat_loaded[path].astype(x.dtype) if path in flat_loaded else x for path, x in flat_fresh.items()
    }
    fresh = sorted("/".join(p) for p in flat_fresh if p not in flat_loaded)
    unused = sorted("/".join(p) for p in saved_paths if p not in flat_fresh)
    note = f"init_from: {len(flat_loaded)} of {len(flat_fresh)} parameter arrays from {origin}"
    if fresh:
        note += f"; initialised fresh: {_listing(fresh)}"
    if unused:
        note += f"; not used: {_listing(unused)}"
    return traverse_util.unflatten_dict(merged), note


def _listing(names: list[str], most: int = 6) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
