"""`wikihop`: WikiHop multi-hop reading comprehension with a long encoder (the Longformer paper's Table 7).

* Input (`longjax.data.wikihop`): `<s> [q] question [/q] [ent] candidate [/ent]
  ... </s>` followed by the supports, each ended by `</s>`; the four task
  tokens are added to the tokenizer and to the embeddings (each new row the
  mean of the rows its spelling had; the paper draws them at random). A document longer than `seq_len` is
  cut into chunks, each prefixed by the question and candidates, every
  support token in exactly one chunk; global attention on the question and
  the candidates.
* Model: `EncoderWithHead(head='token_scoring')`, a linear score on every
  token; a candidate's score is the score of its `[ent]` token, averaged over
  the example's chunks.
* Loss: cross entropy over the candidates. Metric: accuracy.
* Evaluation writes `predictions_<split>_<step>.json`: `{id: predicted candidate}`.

Config sections:

    data.dir             the qangaroo WikiHop directory ('' = $LONGJAX_DATA_DIR/qangaroo_v1.1/wikihop)
    data.train_file, data.validation_file, data.test_file   file names in data.dir (test optional)
    data.max_chunks      chunks per example (an example needing more is an error unless data.truncate)
    data.max_candidates  candidates per example (79 at most in WikiHop)
    data.truncate        drop chunks beyond max_chunks (the count is logged) instead of failing
    data.skip_malformed  skip malformed records (their count is logged) instead of failing
    data.tokenizer       tokenizer directory ('' = init_from's), before the task tokens are added
    model.vocab_size     the tokenizer's vocabulary plus the 4 task tokens
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

from longjax import sections
from longjax.data import examples
from longjax.data import wikihop as hop
from longjax.tasks import encoder_base

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_FEATURE_KEYS = ("input_ids", "padding_mask", "global_mask", "chunk_mask", "candidate_positions", "candidate_mask")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """`config.data` of WikiHop (see the module docstring)."""

    dir: str = ""
    train_file: str = "train.json"
    validation_file: str = "dev.json"
    test_file: str = ""
    max_chunks: int = 8
    max_candidates: int = 79
    truncate: bool = False
    skip_malformed: bool = False
    tokenizer: str = ""

    def __post_init__(self):
        sections.positive_int("data.max_chunks", self.max_chunks)
        sections.positive_int("data.max_candidates", self.max_candidates)


@dataclasses.dataclass
class WikiHopData:
    """Per split: the examples and their feature tables."""

    examples: dict[str, list]
    tables: dict[str, dict[str, np.ndarray]]
    fingerprint: str

    def features(self, split: str) -> dict[str, np.ndarray]:
        if split not in self.tables:
            raise FileNotFoundError(f"WikiHop: no {split!r} split was given (data.{split}_file)")
        return self.tables[split]


def candidate_scores(task, model, params, batch, *, dropout_key):
    """Each candidate's score, its `[ent]` token's score averaged over the example's chunks: float32 `[batch, K]`."""
    b, c, length = batch["input_ids"].shape
    flat = {key: batch[key].reshape(b * c, length) for key in ("input_ids", "padding_mask", "global_mask")}
    scores = task.forward(model, params, flat, dropout_key=dropout_key)["token_scores"].reshape(b, c, length)
    positions = jnp.maximum(batch["candidate_positions"], 0)[:, None, :]  # [b, 1, K], the same in every chunk
    per_chunk = jnp.take_along_axis(scores, jnp.broadcast_to(positions, (b, c, positions.shape[-1])), axis=2)
    chunks = batch["chunk_mask"].astype(jnp.float32)[:, :, None]
    mean = (per_chunk * chunks).sum(1) / jnp.maximum(chunks.sum(1), 1.0)
    return jnp.where(batch["candidate_mask"], mean, -1e30)


class WikiHopEvaluator:
    """Accuracy over a split; keeps the last call's predicted candidates for `write_predictions`."""

    def __init__(self, task, model, plan, data: WikiHopData, mesh):
        self._data = data
        self._last = None

        def scores(params, batch):
            return {"scores": candidate_scores(task, model, params, batch, dropout_key=None)}

        self._run = encoder_base.BatchedOutputs(scores, mesh, plan.eval.batch_size)

    def __call__(self, params, split: str, *, trained_steps: int, limit: int | None = None) -> dict:
        table = encoder_base.limited(self._data.features(split), limit)
        n = examples.table_length(table)
        if n == 0:
            raise ValueError(f"the WikiHop {split} split holds no example")
        scores = self._run(params, table, _FEATURE_KEYS)["scores"]
        chosen = np.where(table["candidate_mask"], scores, -np.inf).argmax(-1)
        self._last = {ex.id: ex.candidates[int(k)] for ex, k in zip(self._data.examples[split][:n], chosen)}
        metrics = {"examples": n}
        labels = table["labels"]
        if np.all(labels >= 0):
            metrics["accuracy"] = hop.accuracy(scores, table["candidate_mask"], labels)
            log_probs = scores - np.logaddexp.reduce(np.where(table["candidate_mask"], scores, -np.inf), axis=-1,
                                                     keepdims=True)
            metrics["loss"] = float(-np.take_along_axis(log_probs, labels[:, None], axis=-1).mean())
        return metrics

    def write_predictions(self, stem: Path) -> Path:
        """`<stem>.json`: `{id: predicted candidate}` of the last call."""
        return encoder_base.write_json_predictions(stem, self._last)


class WikiHopTask(encoder_base.EncoderTask):
    """WikiHop; see the module docstring."""

    head = "token_scoring"
    task_tokens = hop.TASK_TOKENS
    data_section = DataSection
    splits = SPLITS
    curve_metric = "accuracy"

    def load_data(self, plan) -> WikiHopData:
        tokenizer = self.checked_tokenizer(plan)
        root = encoder_base.data_directory(plan.data.dir, "qangaroo_v1.1/wikihop")
        loaded, tables = {}, {}
        for split in SPLITS:
            name = getattr(plan.data, f"{split}_file")
            if not name:
                continue
            loaded[split] = hop.read_qangaroo(root / name, skip_malformed=plan.data.skip_malformed)
            built = hop.build_features(
                loaded[split], tokenizer, seq_len=plan.phases[0].seq_len, max_chunks=plan.data.max_chunks,
                max_candidates=plan.data.max_candidates, truncate=plan.data.truncate,
            )
            tables[split] = built.arrays()
            encoder_base.check_global_tokens(plan, tables[split]["global_mask"], split, "question and candidates")
            log.info("WikiHop %s: %d examples", split, len(loaded[split]))
        for split in ("train", "validation"):
            if split not in loaded:
                raise FileNotFoundError(f"WikiHop: data.{split}_file is needed")
        fingerprint = "-".join(examples.fingerprint(tables[s]) for s in sorted(tables))
        return WikiHopData(loaded, tables, fingerprint)

    def loss(self, model, params, batch, *, step, dropout_key):
        scores = candidate_scores(self, model, params, batch, dropout_key=dropout_key)
        loss = optax.softmax_cross_entropy_with_integer_labels(scores, batch["labels"]).mean()
        accuracy = (scores.argmax(-1) == batch["labels"]).astype(jnp.float32).mean()
        return loss, {"accuracy": accuracy}

    def evaluator(self, plan, data, phase, mesh) -> WikiHopEvaluator:
        return WikiHopEvaluator(self, self.build_model(phase.model), plan, data, mesh)

    def summary(self, split: str, metrics) -> str:
        return encoder_base.summary_line(split, metrics, ("accuracy", "loss", "examples"))


TASK = WikiHopTask()
