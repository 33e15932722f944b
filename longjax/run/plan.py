"""The experiment plan: a config parsed once into frozen, typed sections, validated as it is built.

An experiment config (`configs/*.py`, `get_config()` -> `ml_collections.ConfigDict`)
has these top-level fields; `parse(config)` turns it into an `ExperimentPlan`:

    task                 the task module (`longjax.tasks.<task>`): model, data, loss, evaluators
    seed                 every random choice of the run derives from it
    init_from            None, or a run's workdir (or checkpoint directory) whose newest
                         parameters initialise a new run (optimizer fresh)
    model                the task's model config (`longjax.models.transformer_config` fields)
    data                 the task's data section
    eval                 the task's evaluation section (every task: every_steps)
    phases               lists, one entry per phase: seq_len, batch_size, steps,
                         learning_rate, window_scale
    optimizer            AdamW: b1, b2, eps, weight_decay, grad_clip_norm,
                         warmup_fraction, max_warmup_steps, decay, decay_power,
                         grad_accumulation
    checkpoint           every_steps, keep, async_save
    mesh                 data, fsdp, sequence (devices on each axis; data -1 = the rest),
                         distributed (call jax.distributed.initialize() first: multi-host),
                         coordinator_address, num_processes, process_id (None: found by JAX)
    log_every_steps      console / TensorBoard / JSONL interval
    allow_config_change  resume even if the saved config differs
    (the task's own)     sections a task declares in `Task.extra_sections`
                         (summarization's `decode`), in `plan.extra`

Parsing touches nothing: no file, device or JAX backend. Every error is a
`ConfigError` naming the field, the value and what is allowed. Each phase
carries its own model config (the task scales the sliding windows by the
phase's `window_scale`, clipped to its length).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from longjax import models, sections, tasks
from longjax.sections import ConfigError
from longjax.tasks import base as tasks_base

PHASE_FIELDS = ("seq_len", "batch_size", "steps", "learning_rate", "window_scale")
TOP_LEVEL = (
    "task", "seed", "init_from", "model", "data", "eval", "phases", "optimizer", "checkpoint", "mesh",
    "log_every_steps", "allow_config_change",
)


# The mesh's axis names, in order: batches split over the first two (the tasks' evaluators split
# theirs the same way), the sequence over the last.
MESH_AXES = (*tasks_base.BATCH_AXES, "sequence")


# The learning-rate shapes after the warmup (`optimizer.decay`, `longjax.run.steps.learning_rate`).
DECAYS = ("constant", "polynomial", "cosine", "rsqrt")


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    """AdamW after global-norm clipping; a linear warmup restarts at every phase, then a constant or decaying rate.

    Attributes:
      b1, b2, eps: Adam's moment decays and epsilon.
      weight_decay: decoupled (AdamW) decay, on weight matrices and embeddings only.
      grad_clip_norm: global gradient-norm clip.
      warmup_fraction, max_warmup_steps: a phase warms up over
        min(warmup_fraction * its steps, max_warmup_steps) steps.
      decay, decay_power: after the warmup the rate stays constant
        ('constant'), or decays to 0 at the phase's end as
        (steps left / decay steps) ** decay_power ('polynomial'; power 1 is linear)
        or as a half cosine ('cosine'), or falls as the inverse square root of the
        steps since the phase start ('rsqrt'; `longjax.run.steps.learning_rate`).
      grad_accumulation: micro-batches per optimizer step: each phase's
        global batch is split into this many, their gradients accumulated
        (weighted by the task's `loss_weight`) before one update, so a paper's
        batch fits in memory. 1: the whole batch at once.
      head_learning_rate_scale: the learning rate of the parameters under
        'head' (a task head) is the phase's times this, so a fresh head can
        learn faster than a pretrained encoder (Joshi et al.'s coreference:
        2e-4 for the head, 1e-5 for BERT, a scale of 20). 1: one rate for all.
    """

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    warmup_fraction: float = 0.0
    max_warmup_steps: int = 0
    decay: str = "constant"
    decay_power: float = 1.0
    grad_accumulation: int = 1
    head_learning_rate_scale: float = 1.0

    def __post_init__(self):
        for name in ("b1", "b2"):
            value = getattr(self, name)
            sections.require(0 <= value < 1, f"optimizer.{name}", value, "in [0, 1)")
        sections.positive_number("optimizer.eps", self.eps)
        sections.require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, ">= 0")
        sections.positive_number("optimizer.grad_clip_norm", self.grad_clip_norm)
        sections.require(
            0 <= self.warmup_fraction <= 1, "optimizer.warmup_fraction", self.warmup_fraction, "in [0, 1]"
        )
        sections.non_negative_int("optimizer.max_warmup_steps", self.max_warmup_steps)
        sections.one_of("optimizer.decay", self.decay, DECAYS)
        sections.positive_number("optimizer.decay_power", self.decay_power)
        sections.positive_int("optimizer.grad_accumulation", self.grad_accumulation)
        sections.positive_number("optimizer.head_learning_rate_scale", self.head_learning_rate_scale)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Orbax checkpoints: every N steps (and at phase ends and SIGTERM), the last `keep`, written asynchronously."""

    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        sections.positive_int("checkpoint.every_steps", self.every_steps)
        sections.positive_int("checkpoint.keep", self.keep)


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """The device mesh: axes `data`, `fsdp` and `sequence` (`MESH_AXES`), their sizes' product the device count.

    Attributes:
      data: devices on the data axis (batches split over it); -1 takes every device the other
        axes leave.
      fsdp: devices on the fsdp axis: batches split over it too, and parameters and optimizer
        state sharded over it (each array along one dimension it divides), gathered by the
        compiler where a step uses them (MaxText's FSDP).
      sequence: devices on the sequence axis: each sequence split over it, the attention ops
        exchanging only what their pattern needs (sliding-window, block-sparse and Performer
        layers; not full attention).
      distributed: call `jax.distributed.initialize()` before touching devices (multi-host runs).
      coordinator_address, num_processes, process_id: passed to `jax.distributed.initialize`
        when given (all three or none); None lets JAX find them, as it does on Cloud TPU pod
        slices, SLURM, Open MPI and Kubernetes. Each process gets its own `process_id`
        (`--config.mesh.process_id=1`).
    """

    data: int = -1
    fsdp: int = 1
    sequence: int = 1
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        sections.require(self.data == -1 or self.data >= 1, "mesh.data", self.data, "-1 (all devices left) or >= 1")
        sections.positive_int("mesh.fsdp", self.fsdp)
        sections.positive_int("mesh.sequence", self.sequence)
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        if any(x is not None for x in explicit):
            sections.require(
                all(x is not None for x in explicit) and self.distributed, "mesh.coordinator_address",
                self.coordinator_address, "given with mesh.num_processes and mesh.process_id, and mesh.distributed=True",
            )
            sections.positive_int("mesh.num_processes", self.num_processes)
            sections.require(
                0 <= self.process_id < self.num_processes, "mesh.process_id", self.process_id,
                f"in [0, mesh.num_processes = {self.num_processes})",
            )

    def initialize_distributed(self) -> None:
        """`jax.distributed.initialize` with this section's settings (JAX's detection where None)."""
        import jax  # parsing a plan touches no backend; this runs only when a run starts

        if self.coordinator_address is None:
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(
                coordinator_address=self.coordinator_address, num_processes=self.num_processes,
                process_id=self.process_id,
            )

    def shape(self, device_count: int) -> tuple[int, int, int]:
        """The sizes of `MESH_AXES` on `device_count` devices.

        Raises:
          ValueError: naming the fields when their product is not the device count.
        """
        others = self.fsdp * self.sequence
        data = device_count // others if self.data == -1 else self.data
        if data < 1 or data * others != device_count:
            raise ValueError(
                f"mesh.data ({self.data}) x mesh.fsdp ({self.fsdp}) x mesh.sequence ({self.sequence}) must be "
                f"the number of devices ({device_count}); mesh.data = -1 takes what the other axes leave"
            )
        return data, self.fsdp, self.sequence


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training phase.

    Attributes:
      index: 0-based phase number.
      start_step, end_step: global steps `[start_step, end_step)` of the phase.
      seq_len, batch_size, learning_rate: the phase's settings (batch is global).
      warmup_steps: linear warmup at the phase start; then `optimizer.decay` applies.
      window_scale: the phase's sliding windows are the base windows times this.
      model: the phase's model config (windows scaled and clipped).
    """

    index: int
    start_step: int
    end_step: int
    seq_len: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    window_scale: int
    model: Any

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
    """A parsed, validated experiment config; see the module docstring for the fields.

    `config_json` is the config as JSON (sorted keys), recorded with every
    checkpoint so that a resumed or evaluated run is rebuilt from it.
    """

    task: str
    seed: int
    init_from: str | None
    model: Any
    data: Any
    eval: Any
    phases: tuple[Phase, ...]
    optimizer: OptimizerSection
    checkpoint: CheckpointSection
    mesh: MeshSection
    log_every_steps: int
    allow_config_change: bool
    config_json: str
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the task's own sections (Task.extra_sections)

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end_step

    @property
    def phase_starts(self) -> tuple[int, ...]:
        return tuple(p.start_step for p in self.phases)


def parse(config) -> ExperimentPlan:
    """The `ExperimentPlan` of an experiment config (a ConfigDict or a nested dict).

    Raises:
      ConfigError: naming the first wrong field.
    """
    fields = sections.plain(config)
    if not isinstance(fields, dict):
        raise ConfigError(f"an experiment config must be a ConfigDict or dict, got {type(config).__name__}")
    if "task" not in fields:
        raise ConfigError("missing top-level field(s) ['task']")
    task = tasks.get(fields["task"])
    extra_names = tuple(task.extra_sections)
    unknown = sorted(set(fields) - set(TOP_LEVEL) - set(extra_names))
    if unknown:
        raise ConfigError(f"unknown top-level field(s) {unknown}; the fields are {sorted(TOP_LEVEL + extra_names)}")
    missing = sorted(set(TOP_LEVEL) - set(fields))
    if missing:
        raise ConfigError(f"missing top-level field(s) {missing}")
    sections.non_negative_int("seed", fields["seed"])
    init_from = fields["init_from"]
    sections.require(init_from is None or (isinstance(init_from, str) and init_from), "init_from", init_from,
                     "None or a directory")
    sections.positive_int("log_every_steps", fields["log_every_steps"])
    sections.require(isinstance(fields["allow_config_change"], bool), "allow_config_change",
                     fields["allow_config_change"], "a bool (True/False)")
    try:
        model = task.model_config(fields["model"])
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e
    optimizer = sections.parse_section(OptimizerSection, fields["optimizer"], "optimizer")
    mesh = sections.parse_section(MeshSection, fields["mesh"], "mesh")
    plan = ExperimentPlan(
        task=fields["task"],
        seed=fields["seed"],
        init_from=init_from,
        model=model,
        data=sections.parse_section(task.data_section, fields["data"], "data"),
        eval=sections.parse_section(task.eval_section, fields["eval"], "eval"),
        phases=_phases(fields["phases"], optimizer, model, task, mesh),
        optimizer=optimizer,
        checkpoint=sections.parse_section(CheckpointSection, fields["checkpoint"], "checkpoint"),
        mesh=mesh,
        log_every_steps=fields["log_every_steps"],
        allow_config_change=fields["allow_config_change"],
        config_json=config_json(config),
        extra={name: _extra_section(cls, fields.get(name, {}), name) for name, cls in task.extra_sections.items()},
    )
    eval_len = getattr(plan.eval, "seq_len", None)
    if mesh.sequence > 1 and isinstance(eval_len, int):
        multiple, why = _shard_multiple(model, mesh)
        if eval_len % multiple:
            raise ConfigError(f"eval.seq_len ({eval_len}) must be a multiple of {why}: evaluation shards it too")
    task.check(plan)
    return plan


def _extra_section(cls: type, value, name: str):
    try:
        return sections.parse_section(cls, value, name)
    except ValueError as e:
        raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from e


def config_json(config) -> str:
    """The config as JSON (tuples as lists, sorted keys), for checkpoint meta and the workdir."""
    if hasattr(config, "to_json"):
        return config.to_json(sort_keys=True)
    return json.dumps(config, sort_keys=True)


def _phases(section, optimizer: OptimizerSection, model, task, mesh: MeshSection) -> tuple[Phase, ...]:
    if not isinstance(section, dict):
        raise ConfigError(f"phases must be a section of per-phase lists, got {section!r}")
    unknown = sorted(set(section) - set(PHASE_FIELDS))
    if unknown:
        raise ConfigError(f"phases: unknown field(s) {unknown}; the fields are {list(PHASE_FIELDS)}")
    lists = {}
    for field in PHASE_FIELDS:
        if field not in section:
            raise ConfigError(f"phases.{field} is missing: give one value per phase")
        value = section[field]
        if not isinstance(value, tuple) or not value:
            raise ConfigError(f"phases.{field} must be a non-empty list (one value per phase), got {value!r}")
        lists[field] = value
    lengths = {field: len(values) for field, values in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"phases lists must have equal lengths (one value per phase), got {lengths}")
    phases, start = [], 0
    for p in range(lengths["seq_len"]):
        for field in ("seq_len", "batch_size", "steps", "window_scale"):
            sections.positive_int(f"phases.{field}[{p}]", lists[field][p])
        sections.positive_number(f"phases.learning_rate[{p}]", lists["learning_rate"][p])
        if lists["batch_size"][p] % optimizer.grad_accumulation:
            raise ConfigError(
                f"phases.batch_size[{p}] ({lists['batch_size'][p]}) must be a multiple of "
                f"optimizer.grad_accumulation ({optimizer.grad_accumulation})"
            )
        steps, seq_len, scale = lists["steps"][p], lists["seq_len"][p], lists["window_scale"][p]
        phase_model = task.phase_model(model, window_scale=scale, seq_len=seq_len)
        if mesh.sequence > 1:
            phase_model = _sequence_parallel(phase_model, mesh, seq_len, p)
        phases.append(
            Phase(
                index=p,
                start_step=start,
                end_step=start + steps,
                seq_len=seq_len,
                batch_size=lists["batch_size"][p],
                learning_rate=float(lists["learning_rate"][p]),
                warmup_steps=min(int(optimizer.warmup_fraction * steps), optimizer.max_warmup_steps),
                window_scale=scale,
                model=phase_model,
            )
        )
        start += steps
    return tuple(phases)


def _shard_multiple(model, mesh: MeshSection) -> tuple[int, str]:
    """What a sequence length must be a multiple of to shard over `mesh.sequence`, and why."""
    blocks = sorted({a.block_size for a in getattr(model, "attention", ()) if isinstance(a, models.BlockSparseAttention)})
    if not blocks:
        return mesh.sequence, f"mesh.sequence ({mesh.sequence})"
    multiple = mesh.sequence * math.lcm(*blocks)
    return multiple, f"mesh.sequence ({mesh.sequence}) x the block-sparse block_size ({math.lcm(*blocks)})"


def _sequence_parallel(model, mesh: MeshSection, seq_len: int, phase: int):
    """A phase's model config with its sequence sharded over the mesh's `sequence` axis."""
    multiple, why = _shard_multiple(model, mesh)
    if seq_len % multiple:
        raise ConfigError(f"phases.seq_len[{phase}] ({seq_len}) must be a multiple of {why}")
    if not any(f.name == "sequence_axis" for f in dataclasses.fields(model)):
        raise ConfigError(
            f"mesh.sequence ({mesh.sequence}) > 1 needs a model that shards its sequence; "
            f"{type(model).__name__} does not (only the char LM and the long encoders do)"
        )
    try:
        return dataclasses.replace(model, sequence_axis=MESH_AXES[2])
    except ValueError as e:
        raise ConfigError(f"mesh.sequence ({mesh.sequence}): {e}") from e
