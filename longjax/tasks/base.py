"""What a task is: the part of an experiment that differs from every other.

The training run (`longjax.run`) is the same for every experiment: phases,
optimizer, checkpoints, logging, evaluation schedule, preemption. A task
supplies the rest, as a subclass of `Task` in a module of `longjax.tasks`
(or any importable module) named by `config.task`:

* its config sections: `config.model` through `model_config`, and the
  dataclasses `data_section` and `eval_section` for `config.data` and
  `config.eval` (see `longjax.sections`), plus `check` for rules that span
  sections;
* its model: `build_model` and `init_params`;
* its data: `load_data` (once per run; its `fingerprint` is recorded with
  every checkpoint) and `train_batches` (one checkpointable iterator per phase);
* its per-batch loss and metrics: `loss`, pure, for `jax.jit`;
* its evaluators: `evaluator`, and `summary` for the run's last line.

The module exposes the instance as `TASK`. Adding a task is a module and a
config; the run needs no edit.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Protocol

import jax

from jax.sharding import NamedSharding, PartitionSpec

from longjax import models, sections

# The mesh axes a batch splits over; the training run's mesh (`run.plan.MESH_AXES`) starts with them.
BATCH_AXES = ("data", "fsdp")


def eval_rows_sharding(mesh, batch_size: int) -> NamedSharding:
    """Where an evaluation batch of `batch_size` rows goes: split over the mesh's batch axes when
    they divide it, else whole on every device."""
    axes = tuple(name for name in BATCH_AXES if name in mesh.axis_names)
    split = 1
    for name in axes:
        split *= mesh.shape[name]
    if axes and batch_size % split == 0:
        return NamedSharding(mesh, PartitionSpec(axes))
    return NamedSharding(mesh, PartitionSpec())


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection:
    """The `eval` fields every task has; tasks extend it with their own.

    Attributes:
      every_steps: evaluate the validation split every N training steps
        (None: only at the end of each phase).
    """

    every_steps: int | None = None

    def __post_init__(self):
        if self.every_steps is not None:
            sections.positive_int("eval.every_steps", self.every_steps)

    @property
    def training_limit(self) -> int | None:
        """How much of the validation split evaluations during training score (None: all)."""
        return None


class TrainBatches(Protocol):
    """A phase's training batches: dicts of NumPy arrays `[local_batch, ...]`, resumable."""

    def __next__(self) -> dict[str, Any]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...

    def close(self) -> None: ...


class Evaluator(Protocol):
    """Scores a split with the model of one phase.

    An evaluator may also have `write_predictions(stem: pathlib.Path) -> pathlib.Path`:
    it writes the predictions of its last call to `stem` plus the extension
    of the task's prediction format and returns the file (`longjax.evaluate` calls it).
    """

    def __call__(self, params, split: str, *, trained_steps: int, limit: int | None = None) -> dict[str, float]:
        """Metrics of `split` (its first `limit` units when given) under `params` after `trained_steps` steps."""
        ...


class Task(abc.ABC):
    """Base class of tasks; see the module docstring.

    Class attributes:
      data_section, eval_section: frozen dataclasses of `config.data` and `config.eval`.
      extra_sections: further top-level sections the task reads (e.g. summarization's `decode`).
      splits: the data's split names, for `longjax.evaluate --split`.
      validation_split: the split evaluated during training.
      curve_metric: the metric `curves.png` draws.
    """

    data_section: type
    eval_section: type = EvalSection
    # Top-level config sections of the task's own, name -> frozen dataclass (parsed into `plan.extra`;
    # optional in a config: an absent one takes its defaults).
    extra_sections: Mapping[str, type] = {}
    splits: tuple[str, ...] = ("train", "validation", "test")
    validation_split: str = "validation"
    curve_metric: str = "loss"

    # --- config ---------------------------------------------------------------------------------

    def model_config(self, section) -> models.TransformerConfig:
        """The typed model config of `config.model`; ValueErrors name the field."""
        return models.transformer_config(section)

    def check(self, plan) -> None:
        """Rules that span sections of a parsed `ExperimentPlan`; raises `sections.ConfigError`."""

    def phase_model(self, model, *, window_scale: int, seq_len: int):
        """The model config of a phase: every sliding window times `window_scale`, clipped to `seq_len`."""
        if window_scale != 1 and not any(isinstance(a, models.SlidingWindowAttention) for a in model.attention):
            raise sections.ConfigError(
                "phases.window_scale scales sliding-window layers, but model.attention has none: set it to 1s"
            )
        layers = []
        for attention in model.attention:
            if isinstance(attention, models.SlidingWindowAttention):
                window = attention.window
                if isinstance(window, tuple):
                    window = tuple(min(w * window_scale, seq_len) for w in window)
                else:
                    window = min(window * window_scale, seq_len)
                attention = dataclasses.replace(attention, window=window)
            layers.append(attention)
        return dataclasses.replace(model, attention=tuple(layers))

    def describe_model(self, model) -> str:
        """A few words on a phase's model for its start line: the windows, or the attention type."""
        windows = [getattr(a, "window", None) for a in model.attention]
        if all(w is None for w in windows):
            return f"attention {type(model.attention[0]).__name__}"
        return f"windows {json.dumps(windows)}"

    # --- model ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def build_model(self, model_config):
        """The Flax module of a (phase's) model config."""

    @abc.abstractmethod
    def init_params(self, model, key: jax.Array):
        """Initial parameters (the variables dict) of `model` from `key`."""

    def params_from_pretrained(self, plan, directory):
        """`init_from` a Hugging Face checkpoint directory: (variables dict in this model's layout, what it was).

        The run merges the result into its fresh parameters by path, as for a
        run's checkpoint (shapes must agree; paths it lacks stay fresh).

        Raises:
          InitFromError: this task cannot start from such a checkpoint, or it does not fit the model.
        """
        from longjax.run.errors import InitFromError

        raise InitFromError(
            f"init_from: {directory} is a Hugging Face checkpoint, which the {type(self).__name__} task does not "
            "read; give a longjax run's workdir or checkpoint directory"
        )

    # --- data -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def load_data(self, plan):
        """The run's data, loaded once; it has a `fingerprint` attribute (str) naming its content."""

    @abc.abstractmethod
    def train_batches(self, plan, data, phase, *, seed: int) -> TrainBatches:
        """This process's share of the phase's global training batches, a pure function of `seed`."""

    def tokens_per_batch(self, phase) -> int:
        """Tokens in one global batch of `phase`, for the tokens-per-second metric."""
        return phase.batch_size * phase.seq_len

    # --- loss and evaluation --------------------------------------------------------------------

    @abc.abstractmethod
    def loss(self, model, params, batch: Mapping[str, jax.Array], *, step, dropout_key) -> tuple[jax.Array, dict]:
        """(mean loss, metrics) of one batch; dropout is on when `dropout_key` is not None. Pure."""

    def loss_weight(self, batch: Mapping[str, jax.Array]) -> jax.Array | None:
        """What `loss` averages over in `batch` (e.g. its masked tokens), for gradient accumulation.

        With `optimizer.grad_accumulation` > 1 the micro-batches' losses and
        gradients are combined as means weighted by this. None (the default):
        the loss is a mean over rows, and equal micro-batches weigh the same.
        """
        return None

    @abc.abstractmethod
    def evaluator(self, plan, data, phase, mesh) -> Evaluator:
        """The evaluator of `phase`'s model, built once per phase."""

    def summary(self, split: str, metrics: Mapping[str, float]) -> str:
        """The last line of a run or an evaluation."""
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in numbers.items())
