"""`triviaqa`: TriviaQA (Wikipedia) reading comprehension with a long encoder (the Longformer paper's Table 7).

* Input: `<s> question </s></s> document </s>`, the document truncated to fit
  `seq_len` (4,096 in the paper); global attention on `<s>` and the question.
  One example per (question, evidence document) pair.
* Model: `EncoderWithHead(head='question_answering')`: start and end logits.
* Loss: for start and end separately, the log-sum-exp of the logits over
  every occurrence of any answer alias in the kept document, against the
  log-sum-exp over all tokens (the paper's loss over all answer occurrences).
  A pair whose kept document holds no alias adds no loss (it weighs 0 in the
  batch mean; their number is logged at load).
* Evaluation: the best span of each pair among the n-best starts and ends
  (`eval.n_best`, at most `eval.max_answer_len` tokens), the answer of a
  question the best-scoring span over its documents, scored with the
  official TriviaQA exact match and F1 (`longjax.data.triviaqa_eval`).
  Writes the official prediction file, `predictions_<split>_<step>.json`:
  `{QuestionId: answer}`.
* Data (`longjax.data.triviaqa`): `data.format='raw'`: the TriviaQA release
  (`qa/wikipedia-*.json` and `evidence/wikipedia/`) under `data.dir`;
  `'squad'`: allenai's SQuAD-style conversion files in `data.dir`. Aliases
  are matched as literal text.

Config sections:

    data.format         'raw' | 'squad'
    data.dir            the TriviaQA directory (raw) or the converted files' one (squad); '' = $LONGJAX_DATA_DIR/triviaqa
    data.train_file, data.validation_file, data.test_file
                        files under data.dir ('' = the format's default name; test optional)
    data.max_answer_spans  answer occurrences kept per pair
    data.tokenizer      tokenizer directory ('' = init_from's)
    eval.n_best, eval.max_answer_len   span search (20 and 30 in the paper's code)
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from longjax import sections
from longjax.data import examples
from longjax.data import triviaqa as qa
from longjax.data import triviaqa_eval
from longjax.models.config import SlidingWindowAttention
from longjax.tasks import encoder_base

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
DEFAULT_FILES = {
    "raw": {"train": "qa/wikipedia-train.json", "validation": "qa/wikipedia-dev.json",
            "test": "qa/wikipedia-test-without-answers.json"},
    "squad": {"train": "squad-wikipedia-train-4096.json", "validation": "squad-wikipedia-dev-4096.json",
              "test": ""},
}
_FEATURE_KEYS = ("input_ids", "padding_mask", "global_mask")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """`config.data` of TriviaQA (see the module docstring)."""

    format: str = "raw"
    dir: str = ""
    train_file: str = ""
    validation_file: str = ""
    test_file: str = ""
    max_answer_spans: int = 64
    tokenizer: str = ""

    def __post_init__(self):
        sections.one_of("data.format", self.format, tuple(DEFAULT_FILES))
        sections.positive_int("data.max_answer_spans", self.max_answer_spans)

    def file(self, split: str) -> str:
        return getattr(self, f"{split}_file") or DEFAULT_FILES[self.format][split]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection(encoder_base.EvalSection):
    """`config.eval` of TriviaQA: the encoder tasks' fields plus the span search."""

    n_best: int = 20
    max_answer_len: int = 30

    def __post_init__(self):
        super().__post_init__()
        sections.positive_int("eval.n_best", self.n_best)
        sections.positive_int("eval.max_answer_len", self.max_answer_len)


@dataclasses.dataclass
class TriviaQAData:
    """Per split: the (question, document) examples and their features."""

    examples: dict[str, list]
    built: dict[str, object]
    fingerprint: str

    def features(self, split: str) -> dict[str, np.ndarray]:
        if split not in self.built:
            raise FileNotFoundError(f"TriviaQA: no {split!r} split was given (data.{split}_file)")
        table = self.built[split].arrays()
        return {key: table[key] for key in (*_FEATURE_KEYS, "answer_starts", "answer_ends")}


def occurrence_loss(logits, positions, valid):
    """`logsumexp(all logits) - logsumexp(logits at the distinct positions)` per row, float32 `[batch]`.

    Minus the log of the probability that the start (or end) is one of the
    answer's tokens. Distinct answers may share a start or an end token (the
    pairs are kept aligned); each token counts once, so a shared one is not
    weighed twice (allenai blanks such duplicates in its data instead).

    Args:
      logits: float32 `[batch, seq]`.
      positions: int `[batch, spans]` token indices, -1 padding.
      valid: bool `[batch, seq]`, the tokens a span may start (or end) at.
    """
    masked = jnp.where(valid, logits, -1e30)
    gold = jnp.take_along_axis(masked, jnp.maximum(positions, 0), axis=1)
    k = positions.shape[1]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [k, j]: j < k
    repeated = ((positions[:, :, None] == positions[:, None, :]) & earlier[None]).any(-1)
    gold = jnp.where((positions >= 0) & ~repeated, gold, -1e30)
    return jax.nn.logsumexp(masked, axis=-1) - jax.nn.logsumexp(gold, axis=-1)


def max_question_tokens(model) -> int | None:
    """Question tokens that fit the model's global-token bound (`<s>` is global too)."""
    bounds = [a.max_global_tokens for a in model.attention
              if isinstance(a, SlidingWindowAttention) and a.max_global_tokens is not None]
    return min(bounds) - 1 if bounds else None


class TriviaQAEvaluator:
    """Official EM/F1 of a split's questions; keeps the last call's answers for `write_predictions`."""

    def __init__(self, task, model, plan, data: TriviaQAData, mesh):
        self._data, self._eval = data, plan.eval
        self._last = None

        def logits(params, batch):
            out = task.forward(model, params, batch, dropout_key=None)
            return {"start_logits": out["start_logits"], "end_logits": out["end_logits"]}

        self._run = encoder_base.BatchedOutputs(logits, mesh, plan.eval.batch_size)

    def __call__(self, params, split: str, *, trained_steps: int, limit: int | None = None) -> dict:
        table = encoder_base.limited(self._data.features(split), limit)
        n = examples.table_length(table)
        if n == 0:
            raise ValueError(f"the TriviaQA {split} split holds no example")
        out = self._run(params, table, _FEATURE_KEYS)
        built = self._data.built[split]
        results = [
            qa.best_spans(out["start_logits"][i], out["end_logits"][i], i, built, n_best=self._eval.n_best,
                          max_answer_len=self._eval.max_answer_len)
            for i in range(n)
        ]
        pairs = self._data.examples[split][:n]
        answers = qa.predictions(results, pairs)
        self._last = answers
        metrics = {"questions": len(answers), "pairs": n}
        truth = {q: aliases for q, aliases in qa.ground_truth(pairs).items() if aliases}
        if truth:
            scores = triviaqa_eval.evaluate(answers, truth)
            metrics.update(exact_match=float(scores["exact_match"]), f1=float(scores["f1"]))
        return metrics

    def write_predictions(self, stem: Path) -> Path:
        """`<stem>.json`: the official TriviaQA prediction file of the last call, `{QuestionId: answer}`."""
        return encoder_base.write_json_predictions(stem, self._last)


class TriviaQATask(encoder_base.EncoderTask):
    """TriviaQA; see the module docstring."""

    head = "question_answering"
    data_section = DataSection
    eval_section = EvalSection
    splits = SPLITS
    curve_metric = "f1"

    def load_data(self, plan) -> TriviaQAData:
        tokenizer = encoder_base.load_tokenizer(plan)
        root = encoder_base.data_directory(plan.data.dir, "triviaqa")
        loaded, built = {}, {}
        for split in SPLITS:
            name = plan.data.file(split)
            if not name:
                continue
            path = root / name
            if split == "test" and not path.exists() and not plan.data.test_file:
                continue  # the default test file is optional; a named one must exist
            if plan.data.format == "raw":
                pairs = qa.read_raw(path, root / "evidence" / "wikipedia")
            else:
                pairs = qa.read_squad_style(path)
            if not pairs:
                raise ValueError(f"{path}: holds no question")
            loaded[split] = pairs
            built[split] = qa.build_features(
                pairs, tokenizer, seq_len=plan.phases[0].seq_len, max_question_tokens=max_question_tokens(plan.model),
                max_answer_spans=plan.data.max_answer_spans,
            )
            unanswerable = int((built[split].num_answers == 0).sum())
            log.info("TriviaQA %s: %d question-document pairs, %d without an alias in the kept document",
                     split, len(pairs), unanswerable)
        for split in ("train", "validation"):
            if split not in loaded:
                raise FileNotFoundError(f"TriviaQA: data.{split}_file is needed")
        data = TriviaQAData(loaded, built, "")
        data.fingerprint = "-".join(examples.fingerprint(data.features(s)) for s in sorted(built))
        return data

    def loss(self, model, params, batch, *, step, dropout_key):
        out = self.forward(model, params, batch, dropout_key=dropout_key)
        valid = batch["padding_mask"]
        start = occurrence_loss(out["start_logits"], batch["answer_starts"], valid)
        end = occurrence_loss(out["end_logits"], batch["answer_ends"], valid)
        answered = batch["answer_starts"][:, 0] >= 0
        count = answered.sum().astype(jnp.float32)
        loss = jnp.where(answered, (start + end) / 2, 0.0).sum() / jnp.maximum(count, 1.0)
        return loss, {"answered": count}

    def loss_weight(self, batch):
        return (batch["answer_starts"][:, 0] >= 0).sum()

    def evaluator(self, plan, data, phase, mesh) -> TriviaQAEvaluator:
        return TriviaQAEvaluator(self, self.build_model(phase.model), plan, data, mesh)

    def summary(self, split: str, metrics) -> str:
        return encoder_base.summary_line(split, metrics, ("exact_match", "f1", "questions"))


TASK = TriviaQATask()
