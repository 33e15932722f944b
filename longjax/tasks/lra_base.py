"""What the Long Range Arena tasks share (`lra_listops`, `lra_text`, `lra_retrieval`, `lra_image`, `lra_pathfinder`).

LRA (Tay et al. 2021) compares efficient Transformers on five classification
tasks, every model trained from scratch. Its own code no longer runs (it needs
`flax.deprecated.nn` and `flax.optim`) and its "Longformer" is a dense mask;
these tasks run its experiments on longjax's sparse ops.

* Model: `longjax.models.LRAClassifier` of `config.model` (an encoder config
  plus `num_labels`, `pooling`, `classifier_dim`, `global_first_token`; `pair`
  is the task's): the encoder, the pooled sequence, a ReLU MLP.
* Data: each task's reader (`longjax.data.lra_listops`, `lra_pathfinder`,
  `lra_files`) gives per split a table `{"inputs": int32 [n, seq] ([n, 2, seq]
  for Retrieval), "labels": int32 [n]}`, id 0 padding, at the phases' length.
  `data.dir` is the directory of the task's files ('' = `$LONGJAX_DATA_DIR/<name>`).
* Loss: cross entropy. Metrics: accuracy and loss; the run's training records
  add steps per second and peak memory (`longjax.run.hooks.TrainLog`), LRA's
  efficiency numbers (its Table 2).
* Evaluation writes `predictions_<split>_<step>.jsonl`, one `{"index", "label",
  "prediction"}` per example.

Config sections:

    data.dir                  the task's files ('' = $LONGJAX_DATA_DIR/<task's directory>)
    data.validation_fraction  lra_text only: IMDB has no validation split; this fraction of train, by id
    model.num_labels          must be the task's classes
    model.pooling             'cls' | 'mean'
    model.classifier_dim      the classifier's hidden width (LRA's mlp_dim)
    model.global_first_token  global attention on the first (pooled) token

With CLS pooling the model prepends its CLS token, so the encoder sees
`phases.seq_len + 1` positions (LRA's `max_len += 1`).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from longjax import models, sections
from longjax.data import examples
from longjax.models.lra import LRAClassifier, LRAConfig
from longjax.tasks import base, encoder_base

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """`config.data` of the LRA tasks: `dir`, the task's files (see the module docstring)."""

    dir: str = ""


@dataclasses.dataclass
class LRAData:
    """Per split the feature table; `fingerprint` names the content in checkpoints."""

    tables: dict[str, dict[str, np.ndarray]]
    fingerprint: str

    def features(self, split: str) -> dict[str, np.ndarray]:
        return self.tables[split]


class LRAEvaluator:
    """Accuracy and loss of a split; keeps the last call's predictions for `write_predictions`."""

    def __init__(self, model, plan, data: LRAData, mesh):
        self._data = data
        self._last = None

        def logits(params, batch):
            return {"logits": model.apply(params, batch["inputs"], deterministic=True)}

        self._run = encoder_base.BatchedOutputs(logits, mesh, plan.eval.batch_size)

    def __call__(self, params, split: str, *, trained_steps: int, limit: int | None = None) -> dict:
        table = encoder_base.limited(self._data.features(split), limit)
        if examples.table_length(table) == 0:
            raise ValueError(f"the {split} split holds no example")
        logits = self._run(params, table, ("inputs",))["logits"]
        labels = table["labels"]
        predictions = logits.argmax(-1)
        log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        self._last = (labels, predictions)
        return {
            "accuracy": float(np.mean(predictions == labels)),
            "loss": float(-np.take_along_axis(log_probs, labels[:, None], axis=-1).mean()),
            "examples": int(len(labels)),
        }

    def write_predictions(self, stem: Path) -> Path:
        """`<stem>.jsonl`: one `{"index", "label", "prediction"}` per example of the last call."""
        if self._last is None:
            raise RuntimeError("write_predictions: the evaluator has not scored a split yet")
        path = stem.with_suffix(".jsonl")
        with path.open("w") as f:
            for index, (label, prediction) in enumerate(zip(*self._last)):
                f.write(json.dumps({"index": index, "label": int(label), "prediction": int(prediction)}) + "\n")
        return path


class LRATask(base.Task):
    """Base of the LRA tasks: a subclass names its data and reads it (`read_tables`).

    Class attributes:
      directory_name: the default directory under `$LONGJAX_DATA_DIR`.
      vocab_size, num_labels: the task's token ids (padding included) and classes.
      fixed_length: the one sequence length the data has (images), or None.
      pair: examples are document pairs (Retrieval).
    """

    data_section = DataSection
    eval_section = encoder_base.EvalSection
    splits = SPLITS
    curve_metric = "accuracy"
    directory_name: str
    vocab_size: int
    num_labels: int
    fixed_length: int | None = None
    pair: bool = False

    # --- config ---------------------------------------------------------------------------------

    def model_config(self, section) -> LRAConfig:
        fields = dict(sections.plain(section))
        extra = {name: fields.pop(name) for name in ("num_labels", "pooling", "classifier_dim", "global_first_token")
                 if name in fields}
        if "pair" in fields:
            raise ValueError("model.pair is the task's (Retrieval's), not a config field")
        encoder = models.transformer_config(fields)
        return LRAConfig(**{f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)}, **extra,
                         pair=self.pair)

    def check(self, plan) -> None:
        lengths = sorted({p.seq_len for p in plan.phases})
        if len(lengths) > 1:
            raise sections.ConfigError(f"phases.seq_len: {plan.task} reads its data once, at one length; got {lengths}")
        if self.fixed_length is not None and lengths[0] != self.fixed_length:
            raise sections.ConfigError(
                f"phases.seq_len must be {self.fixed_length} for {plan.task} (its images' pixels), got {lengths[0]}"
            )
        model = plan.model
        if model.vocab_size != self.vocab_size:
            raise sections.ConfigError(f"model.vocab_size must be {self.vocab_size} for {plan.task}, "
                                       f"got {model.vocab_size}")
        if model.num_labels != self.num_labels:
            raise sections.ConfigError(f"model.num_labels must be {self.num_labels} for {plan.task}, "
                                       f"got {model.num_labels}")
        if model.position == "txl_relative":
            raise sections.ConfigError("model.position: LRA's encoders take 'sinusoidal', 'learned', 'rope' or "
                                       "'none' positions, not 'txl_relative'")
        length = lengths[0] + (1 if LRAClassifier(model).adds_cls_token else 0)
        if model.position == "learned" and length + model.position_offset >= model.max_positions:
            raise sections.ConfigError(
                f"model.max_positions ({model.max_positions}) must exceed the encoder's length ({length}: "
                f"phases.seq_len {lengths[0]}, plus 1 for the CLS token with CLS pooling) plus "
                f"model.position_offset ({model.position_offset})"
            )

    # --- model ----------------------------------------------------------------------------------

    def build_model(self, model_config) -> LRAClassifier:
        return LRAClassifier(model_config)

    def init_params(self, model, key):
        cfg = model.config
        # Long enough for every layer's pattern (a BigBird layer's blocks, the global-token bound),
        # within the position table; the parameters do not depend on the length.
        length = 8
        for attention in cfg.attention:
            length = max(length, getattr(attention, "max_global_tokens", None) or 0)
            if isinstance(attention, models.BlockSparseAttention):
                blocks = attention.num_window_blocks + len(attention.global_blocks) + attention.num_random_blocks
                length = max(length, attention.block_size * blocks)
        if cfg.position == "learned":
            length = min(length, cfg.max_positions - 1 - cfg.position_offset - int(model.adds_cls_token))
        shape = (1, 2, length) if cfg.pair else (1, length)
        return model.init(key, jnp.ones(shape, jnp.int32))

    # --- data -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def read_tables(self, section: DataSection, directory: Path, seq_len: int) -> dict[str, dict[str, np.ndarray]]:
        """The task's tables per split (see the module docstring), read from `directory`."""

    def load_data(self, plan) -> LRAData:
        directory = encoder_base.data_directory(plan.data.dir, self.directory_name)
        seq_len = plan.phases[0].seq_len
        tables = self.read_tables(plan.data, directory, seq_len)
        for split in SPLITS:
            table = tables[split]
            n = examples.table_length(table, f"{plan.task} {split}")
            if n == 0:
                raise ValueError(f"data: the {plan.task} {split} split in {directory} holds no example")
            if table["inputs"].shape[-1] != seq_len:
                raise ValueError(f"data: the {plan.task} {split} inputs have length {table['inputs'].shape[-1]}, "
                                 f"not phases.seq_len {seq_len}")
            labels = table["labels"]
            if labels.min() < 0 or labels.max() >= self.num_labels:
                raise ValueError(f"data: {plan.task} {split} labels must lie in [0, {self.num_labels}), "
                                 f"got [{labels.min()}, {labels.max()}]")
            counts = np.bincount(labels, minlength=self.num_labels)
            log.info("%s %s: %d examples, majority class %.1f%%", plan.task, split, n, 100 * counts.max() / n)
        fingerprint = "-".join(examples.fingerprint(tables[s]) for s in SPLITS)
        return LRAData(tables, fingerprint)

    def train_batches(self, plan, data, phase, *, seed: int):
        return examples.make_example_iterator(data.features("train"), global_batch_size=phase.batch_size, seed=seed)

    def tokens_per_batch(self, phase) -> int:
        return phase.batch_size * phase.seq_len * (2 if self.pair else 1)

    # --- loss and evaluation --------------------------------------------------------------------

    def loss(self, model, params, batch, *, step, dropout_key):
        rngs = None if dropout_key is None else {"dropout": dropout_key}
        logits = model.apply(params, batch["inputs"], deterministic=dropout_key is None, rngs=rngs, step=step)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        accuracy = (logits.argmax(-1) == batch["labels"]).astype(jnp.float32).mean()
        return loss, {"accuracy": accuracy}

    def evaluator(self, plan, data, phase, mesh) -> LRAEvaluator:
        return LRAEvaluator(self.build_model(phase.model), plan, data, mesh)

    def summary(self, split: str, metrics) -> str:
        return encoder_base.summary_line(split, metrics, ("accuracy", "loss", "examples"))
