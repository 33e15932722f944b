"""`classification`: long-document classification, IMDB and Hyperpartisan (the Longformer paper's Table 7).

* Model: `EncoderWithHead(head='classification')`, RoBERTa's classifier on the
  first token, which has global attention; `model.num_labels` classes.
* Input: `<s> text </s>`, the text truncated to fit `seq_len` tokens.
* Loss: cross entropy. Metrics: accuracy; F1 of label 1 (hyperpartisan /
  positive) and macro F1; loss.
* Data (`longjax.data.text_classification`):
  - `data.name='imdb'`: `data.format='aclimdb'` reads the raw
    `aclImdb/{train,test}/{pos,neg}/*.txt` under `data.dir`; `'tfds'` reads
    `imdb_reviews` prepared by tensorflow-datasets in `data.dir`. IMDB has no
    validation split: `data.validation_fraction` of the training reviews,
    chosen by id, is held out for it.
  - `data.name='hyperpartisan'`: the JSON lines of allenai's preprocessing,
    `data.dir/<data.file>`; split by `data.split_file` (allenai's
    hp-splits.json, for comparability: it warns that its test ids leak into
    train) or, when '', a clean split by id.
* Evaluation writes `predictions_<split>_<step>.jsonl`: one
  `{"id", "label", "prediction", "probabilities"}` per document.

Config sections:

    data.name                 'imdb' | 'hyperpartisan'
    data.dir                  the dataset's directory ('' = $LONGJAX_DATA_DIR/aclImdb or .../hyperpartisan)
    data.format               IMDB: 'aclimdb' (raw directory) | 'tfds'
    data.file                 Hyperpartisan: the JSON-lines file in data.dir
    data.split_file           Hyperpartisan: allenai's split file ('' = clean split by id)
    data.validation_fraction  IMDB: training reviews held out for validation
    data.skip_malformed       skip malformed records (their count is logged) instead of failing
    data.tokenizer            tokenizer directory ('' = init_from's)
    model.num_labels          classes
"""

from __future__ import annotations

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
from longjax.data import text_classification as texts
from longjax.tasks import encoder_base

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(models.TransformerConfig):
    """The encoder's config plus the classes of its classification head."""

    num_labels: int = 2

    def __post_init__(self):
        super().__post_init__()
        sections.require(sections.is_int(self.num_labels) and self.num_labels >= 2, "model.num_labels",
                         self.num_labels, "an int >= 2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """`config.data` of text classification (see the module docstring)."""

    name: str
    dir: str = ""
    format: str = "aclimdb"
    file: str = "hp.jsonl"
    split_file: str = ""
    validation_fraction: float = 0.1
    skip_malformed: bool = False
    tokenizer: str = ""

    def __post_init__(self):
        sections.one_of("data.name", self.name, ("imdb", "hyperpartisan"))
        sections.one_of("data.format", self.format, ("aclimdb", "tfds"))
        sections.require(0 < self.validation_fraction < 1, "data.validation_fraction", self.validation_fraction,
                         "in (0, 1)")


@dataclasses.dataclass
class ClassificationData:
    """Per split: the documents and their feature table (input_ids, padding_mask, global_mask, labels)."""

    documents: dict[str, list]
    tables: dict[str, dict[str, np.ndarray]]
    fingerprint: str

    def features(self, split: str) -> dict[str, np.ndarray]:
        return self.tables[split]


def read_splits(section: DataSection) -> dict[str, list]:
    """The dataset's documents (`LabeledText`) per split, as the data section describes."""
    root = encoder_base.data_directory(section.dir, "aclImdb" if section.name == "imdb" else "hyperpartisan")
    if section.name == "imdb":
        read = texts.read_imdb_directory if section.format == "aclimdb" else texts.read_imdb_tfds
        splits = read(root)
        train = splits["train"]
        return {
            "train": [r for r in train if not texts.held_out(r.id, section.validation_fraction)],
            "validation": [r for r in train if texts.held_out(r.id, section.validation_fraction)],
            "test": splits["test"],
        }
    records = texts.read_hyperpartisan_jsonl(root / section.file, skip_malformed=section.skip_malformed)
    split_file = Path(section.split_file).expanduser() if section.split_file else None
    return texts.split_hyperpartisan(records, split_file=split_file)


def build_features(documents, tokenizer, seq_len: int, num_labels: int) -> dict[str, np.ndarray]:
    """`<s> text </s>` of each document, truncated to `seq_len`, padded; global attention on `<s>`.

    Returns:
      input_ids int32 `[n, seq_len]`, padding_mask and global_mask bool `[n, seq_len]`, labels int32 `[n]`.
    """
    bos, eos, pad = (encoder_base.special_id(tokenizer, t) for t in ("<s>", "</s>", "<pad>"))
    n = len(documents)
    input_ids = np.full((n, seq_len), pad, np.int32)
    padding = np.zeros((n, seq_len), bool)
    labels = np.zeros((n,), np.int32)
    encodings = tokenizer.encode_batch([d.text for d in documents], add_special_tokens=False)
    for i, (document, encoding) in enumerate(zip(documents, encodings)):
        if not 0 <= document.label < num_labels:
            raise ValueError(f"document {document.id!r} has label {document.label}, outside model.num_labels "
                             f"({num_labels})")
        ids = [bos, *encoding.ids[: seq_len - 2], eos]
        input_ids[i, : len(ids)] = ids
        padding[i, : len(ids)] = True
        labels[i] = document.label
    glob = np.zeros((n, seq_len), bool)
    glob[:, 0] = True
    return {"input_ids": input_ids, "padding_mask": padding, "global_mask": glob, "labels": labels}


class ClassificationEvaluator:
    """Accuracy, F1 and loss of a split; keeps the last call's predictions for `write_predictions`."""

    def __init__(self, task, model, plan, data: ClassificationData, mesh):
        self._data = data
        self._last = None

        def logits(params, batch):
            return {"logits": task.forward(model, params, batch, dropout_key=None)["logits"]}

        self._run = encoder_base.BatchedOutputs(logits, mesh, plan.eval.batch_size)

    def __call__(self, params, split: str, *, trained_steps: int, limit: int | None = None) -> dict:
        table = encoder_base.limited(self._data.features(split), limit)
        if examples.table_length(table) == 0:
            raise ValueError(f"the {split} split holds no document")
        logits = self._run(params, table, ("input_ids", "padding_mask", "global_mask"))["logits"]
        labels = table["labels"]
        predictions = logits.argmax(-1)
        log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        loss = float(-np.take_along_axis(log_probs, labels[:, None], axis=-1).mean())
        self._last = (split, self._data.documents[split][: len(labels)], predictions, np.exp(log_probs))
        return {
            "accuracy": texts.accuracy(predictions, labels),
            "f1": texts.f1_score(predictions, labels, positive=1),
            "macro_f1": texts.macro_f1(predictions, labels),
            "loss": loss,
            "documents": int(len(labels)),
        }

    def write_predictions(self, stem: Path) -> Path:
        """`<stem>.jsonl`: one `{"id", "label", "prediction", "probabilities"}` per document of the last call."""
        if self._last is None:
            raise RuntimeError("write_predictions: the evaluator has not scored a split yet")
        _, documents, predictions, probabilities = self._last
        path = stem.with_suffix(".jsonl")
        with path.open("w") as f:
            for document, prediction, probs in zip(documents, predictions, probabilities):
                f.write(json.dumps({"id": document.id, "label": int(document.label), "prediction": int(prediction),
                                    "probabilities": [round(float(p), 6) for p in probs]}) + "\n")
        return path


class ClassificationTask(encoder_base.EncoderTask):
    """Long-document classification; see the module docstring."""

    head = "classification"
    data_section = DataSection
    splits = SPLITS
    curve_metric = "accuracy"

    def model_config(self, section) -> ClassifierConfig:
        fields = dict(sections.plain(section))
        num_labels = fields.pop("num_labels", 2)
        encoder = models.transformer_config(fields)
        return ClassifierConfig(**{f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)},
                                num_labels=num_labels)

    def num_labels(self, model_config) -> int:
        return model_config.num_labels

    def load_data(self, plan) -> ClassificationData:
        tokenizer = encoder_base.load_tokenizer(plan)
        documents = read_splits(plan.data)
        seq_len = plan.phases[0].seq_len
        tables = {}
        for split in SPLITS:
            if not documents[split]:
                raise ValueError(f"data: the {plan.data.name} {split} split holds no document")
            tables[split] = build_features(documents[split], tokenizer, seq_len, plan.model.num_labels)
            log.info("%s %s: %d documents", plan.data.name, split, len(documents[split]))
        fingerprint = "-".join(examples.fingerprint(tables[s]) for s in SPLITS)
        return ClassificationData(documents, tables, fingerprint)

    def loss(self, model, params, batch, *, step, dropout_key):
        logits = self.forward(model, params, batch, dropout_key=dropout_key)["logits"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        accuracy = (logits.argmax(-1) == batch["labels"]).astype(jnp.float32).mean()
        return loss, {"accuracy": accuracy}

    def evaluator(self, plan, data, phase, mesh) -> ClassificationEvaluator:
        return ClassificationEvaluator(self, self.build_model(phase.model), plan, data, mesh)

    def summary(self, split: str, metrics) -> str:
        return encoder_base.summary_line(split, metrics, ("accuracy", "f1", "macro_f1", "loss", "documents"))


TASK = ClassificationTask()
