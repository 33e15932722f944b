"""`hotpotqa`: HotpotQA (distractor) in two stages with a long encoder (the Longformer paper's Table 7).

The paper's HotpotQA code was never released; the choices below (and those
of the input layout, in `longjax.data.hotpotqa`) are this library's.

* Input (`longjax.data.hotpotqa`): `<s> [q] question [/q] <t> title </t>
  sentence [s] sentence [s] ... </s>`, the five task tokens added to the
  tokenizer and the embeddings (each new row the mean of its spelling's
  rows); global attention on `<s>`, the question and every marker.
* Model, both stages: `EncoderWithHead(head='span_type_and_tokens')`: span
  start/end logits, three answer-type logits (span / yes / no) from `<s>`,
  and a score per token. Both stages build the same model, so stage 2 may
  start from the stage-1 run (`init_from` its workdir) as well as from a
  Hugging Face checkpoint.
* `data.stage='select'` (stage 1): all paragraphs; a paragraph's score is its
  `<t>` token's; loss: binary cross-entropy against "is a gold paragraph".
  Evaluation: `paragraph_em` (the two best paragraphs are the two gold ones)
  and `paragraph_recall` (gold paragraphs among the best `data.keep_paragraphs`),
  and writes `predictions_<split>_<step>.json`, the ranking
  `{_id: [[title, score], ...]}` stage 2 reads. Run `python -m longjax.evaluate
  --workdir=STAGE1 --split=train` (and validation, test) to write it per split.
* `data.stage='answer'` (stage 2): the best `data.keep_paragraphs` of
  `data.<split>_selection` (stage 1's file), for training plus the gold
  paragraphs stage 1 missed (a training split without a file takes the gold
  paragraphs alone); `data.oracle_paragraphs` evaluates on the gold
  paragraphs instead (an upper bound, logged). Loss: the sum of the span loss
  (log-sum-exp over every occurrence of the answer, as for TriviaQA; only for
  span answers found in the kept text), the answer-type cross-entropy, and
  the supporting-fact binary cross-entropy on each `[s]` (mean over sentences).
  With `optimizer.grad_accumulation` the micro-batches weigh equally: the
  three losses are means over different counts (answered spans, typed
  questions, sentences), which no one weight per micro-batch can make equal
  to the whole batch's mean, so the step is the mean of the micro-batches'.
  Evaluation: the answer is "yes" or "no" when the type head says so, else the
  best span of at most `eval.max_answer_len` tokens inside one paragraph among
  the `eval.n_best` best starts and ends; supporting facts are the sentences of
  probability above `eval.sp_threshold`; scored with the official answer,
  supporting-fact and joint EM/F1 (`longjax.data.hotpotqa_eval`). Writes the
  official submission `{"answer": {_id: text}, "sp": {_id: [[title, index], ...]}}`.

Config sections:

    data.stage               'select' | 'answer'
    data.dir, data.train_file, data.validation_file, data.test_file
                             the HotpotQA JSON files ('' dir = $LONGJAX_DATA_DIR/hotpotqa; test optional)
    data.keep_paragraphs     stage 2: ranked paragraphs kept (stage 1: the recall cut-off reported)
    data.train_selection, data.validation_selection, data.test_selection
                             stage 2: stage 1's ranking file of each split
    data.oracle_paragraphs   stage 2: evaluate on the gold paragraphs (no selection file)
    data.max_paragraphs, data.max_sentences, data.max_answer_spans, data.max_question_tokens
                             feature table sizes (a larger example is an error naming the field)
    data.tokenizer           tokenizer directory ('' = init_from's), before the task tokens are added
    eval.n_best, eval.max_answer_len, eval.sp_threshold
    model.vocab_size         the tokenizer's vocabulary plus the 5 task tokens
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

from longjax import sections
from longjax.data import examples
from longjax.data import hotpotqa as hotpot
from longjax.data import hotpotqa_eval
from longjax.data import hotpotqa_selection as selection
from longjax.tasks import encoder_base, triviaqa

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
STAGES = ("select", "answer")
_INPUT_KEYS = ("input_ids", "padding_mask", "global_mask")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """`config.data` of HotpotQA (see the module docstring)."""

    stage: str
    dir: str = ""
    train_file: str = "hotpot_train_v1.1.json"
    validation_file: str = "hotpot_dev_distractor_v1.json"
    test_file: str = ""
    keep_paragraphs: int = 3
    train_selection: str = ""
    validation_selection: str = ""
    test_selection: str = ""
    oracle_paragraphs: bool = False
    max_paragraphs: int = 10
    max_sentences: int = 96
    max_answer_spans: int = 64
    max_question_tokens: int = 64
    tokenizer: str = ""

    def __post_init__(self):
        sections.one_of("data.stage", self.stage, STAGES)
        for name in ("keep_paragraphs", "max_paragraphs", "max_sentences", "max_answer_spans", "max_question_tokens"):
            sections.positive_int(f"data.{name}", getattr(self, name))
        if self.stage == "select":
            for name in ("train_selection", "validation_selection", "test_selection"):
                sections.require(not getattr(self, name), f"data.{name}", getattr(self, name),
                                 "'' for data.stage='select' (selection files are stage 2's input)")
            sections.require(not self.oracle_paragraphs, "data.oracle_paragraphs", self.oracle_paragraphs,
                             "False for data.stage='select'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection(triviaqa.EvalSection):
    """`config.eval` of HotpotQA: TriviaQA's span search (n_best, max_answer_len) and the supporting-fact threshold."""

    sp_threshold: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        sections.require(0 < self.sp_threshold < 1, "eval.sp_threshold", self.sp_threshold, "in (0, 1)")


@dataclasses.dataclass
class HotpotData:
    """Per split: the examples and their features (`SelectorFeatures` or `AnswerFeatures`)."""

    examples: dict[str, list]
    built: dict[str, object]
    fingerprint: str

    def features(self, split: str) -> dict[str, np.ndarray]:
        if split not in self.built:
            raise FileNotFoundError(f"HotpotQA: no {split!r} split was given (data.{split}_file)")
        return self.built[split].arrays()


def _binary_cross_entropy(logits, labels):
    """Mean binary cross-entropy of `logits` at slots with `labels` >= 0 (0 when there is none)."""
    valid = labels >= 0
    losses = optax.sigmoid_binary_cross_entropy(logits, jnp.maximum(labels, 0).astype(jnp.float32))
    return jnp.where(valid, losses, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def _at(scores, positions):
    """`scores[b, positions[b, k]]` for float `[batch, seq]` scores and int `[batch, K]` positions (-1 read as 0)."""
    return jnp.take_along_axis(scores, jnp.maximum(positions, 0), axis=1)


def best_answer_span(start_logits, end_logits, context_mask, paragraph_of_token, *, n_best: int,
                     max_answer_len: int) -> tuple[int, int] | None:
    """The best `(start, end)` token span of one row, or None when no pair qualifies.

    Pairs of the `n_best` best starts and ends among the context tokens, with
    start <= end, at most `max_answer_len` tokens, both in one paragraph;
    best by start + end logit, ties by position.
    """
    positions = np.flatnonzero(context_mask)
    if not len(positions):
        return None
    starts = positions[np.argsort(-start_logits[positions], kind="stable")[:n_best]]
    ends = positions[np.argsort(-end_logits[positions], kind="stable")[:n_best]]
    best, best_score = None, -np.inf
    for s in starts:
        for e in ends:
            if e < s or e - s + 1 > max_answer_len or paragraph_of_token[s] != paragraph_of_token[e]:
                continue
            score = float(start_logits[s]) + float(end_logits[e])
            if score > best_score or (score == best_score and (s, e) < best):
                best, best_score = (int(s), int(e)), score
    return best


class SelectorEvaluator:
    """Stage 1: paragraph EM and recall of a split; keeps the last call's ranking for `write_predictions`."""

    def __init__(self, task, model, plan, data: HotpotData, mesh):
        self._data, self._keep = data, plan.data.keep_paragraphs
        self._last = None

        def scores(params, batch):
            out = task.forward(model, params, batch, dropout_key=None)
            return {"scores": _at(out["token_scores"], batch["paragraph_positions"])}

        self._run = encoder_base.BatchedOutputs(scores, mesh, plan.eval.batch_size)

    def __call__(self, params, split: str, *, trained_steps: int, limit: int | None = None) -> dict:
        table = encoder_base.limited(self._data.features(split), limit)
        n = examples.table_length(table)
        if n == 0:
            raise ValueError(f"the HotpotQA {split} split holds no example")
        scores = self._run(params, table, (*_INPUT_KEYS, "paragraph_positions"))["scores"]
        built = self._data.built[split]
        rankings = {built.ids[i]: hotpot.paragraph_ranking(built, i, scores[i]) for i in range(n)}
        self._last = rankings
        metrics: dict = {"examples": n}
        labels = table["paragraph_labels"]
        labelled = (labels >= 0).any(-1)
        if labelled.any():
            exact, recall = [], []
            split_examples = self._data.examples[split]
            for i in np.flatnonzero(labelled):
                # The example's gold paragraphs, also those cut from the input (ranked nowhere, so missed).
                gold = hotpot.gold_titles(split_examples[i])
                ranked = [title for title, _ in rankings[built.ids[i]]]
                exact.append(set(ranked[:2]) == gold)
                recall.append(len(gold & set(ranked[: self._keep])) / max(len(gold), 1))
            valid = labels >= 0
            metrics["paragraph_em"] = 100.0 * float(np.mean(exact))
            metrics["paragraph_recall"] = 100.0 * float(np.mean(recall))
            losses = optax.sigmoid_binary_cross_entropy(scores, np.maximum(labels, 0).astype(np.float32))
            metrics["loss"] = float(np.asarray(losses)[valid].mean())
        return metrics

    def write_predictions(self, stem: Path) -> Path:
        """`<stem>.json`: `{_id: [[title, score], ...]}` best first, the stage-2 selection file."""
        if self._last is None:
            raise RuntimeError("write_predictions: the evaluator has not scored a split yet")
        path = stem.with_suffix(".json")
        selection.write_selection(path, self._last)
        return path


class AnswerEvaluator:
    """Stage 2: the official answer, supporting-fact and joint EM/F1; keeps the last submission."""

    def __init__(self, task, model, plan, data: HotpotData, tokenizer, mesh):
        self._data, self._eval = data, plan.eval
        self._title_id = tokenizer.token_to_id("<t>")
        self._last = None

        def outputs(params, batch):
            out = task.forward(model, params, batch, dropout_key=None)
            return {"start_logits": out["start_logits"], "end_logits": out["end_logits"],
                    "type_logits": out["type_logits"],
                    "sentence_scores": _at(out["token_scores"], batch["sentence_positions"])}

        self._run = encoder_base.BatchedOutputs(outputs, mesh, plan.eval.batch_size)

    def __call__(self, params, split: str, *, trained_steps: int, limit: int | None = None) -> dict:
        table = encoder_base.limited(self._data.features(split), limit)
        n = examples.table_length(table)
        if n == 0:
            raise ValueError(f"the HotpotQA {split} split holds no example")
        out = self._run(params, table, (*_INPUT_KEYS, "sentence_positions"))
        built = self._data.built[split]
        answers, facts = {}, {}
        paragraph_of_token = np.cumsum(table["input_ids"] == self._title_id, axis=-1)
        for i in range(n):
            kind = int(np.argmax(out["type_logits"][i]))
            if kind > 0:
                answers[built.ids[i]] = hotpot.ANSWER_TYPES[kind]
            else:
                span = best_answer_span(out["start_logits"][i], out["end_logits"][i], table["context_mask"][i],
                                        paragraph_of_token[i], n_best=self._eval.n_best,
                                        max_answer_len=self._eval.max_answer_len)
                answers[built.ids[i]] = "" if span is None else hotpot.answer_text(built, i, *span)
            probabilities = 1.0 / (1.0 + np.exp(-out["sentence_scores"][i]))
            facts[built.ids[i]] = hotpot.supporting_facts_of(built, i, probabilities, self._eval.sp_threshold)
        self._last = {"answer": answers, "sp": facts}
        metrics: dict = {"examples": n}
        gold = [{"_id": e.id, "answer": e.answer, "supporting_facts": [list(f) for f in e.supporting_facts]}
                for e in self._data.examples[split][:n] if e.answer is not None and e.supporting_facts is not None]
        if gold:
            scores = hotpotqa_eval.evaluate(self._last, gold)
            metrics.update({name: float(scores[name]) for name in hotpotqa_eval.METRIC_NAMES})
        return metrics

    def write_predictions(self, stem: Path) -> Path:
        """`<stem>.json`: the official submission of the last call, `{"answer": {...}, "sp": {...}}`."""
        if self._last is None:
            raise RuntimeError("write_predictions: the evaluator has not scored a split yet")
        path = stem.with_suffix(".json")
        path.write_text(json.dumps(self._last, indent=1, ensure_ascii=False, sort_keys=True))
        return path


class HotpotQATask(encoder_base.EncoderTask):
    """HotpotQA, either stage; see the module docstring."""

    head = "span_type_and_tokens"
    task_tokens = hotpot.TASK_TOKENS
    data_section = DataSection
    eval_section = EvalSection
    splits = SPLITS
    curve_metric = "loss"

    def num_labels(self, model_config) -> int:
        return len(hotpot.ANSWER_TYPES)

    def load_data(self, plan) -> HotpotData:
        tokenizer = self.checked_tokenizer(plan)
        section, seq_len = plan.data, plan.phases[0].seq_len
        root = encoder_base.data_directory(section.dir, "hotpotqa")
        loaded, built = {}, {}
        for split in SPLITS:
            name = getattr(section, f"{split}_file")
            if not name:
                continue
            loaded[split] = hotpot.read_hotpotqa(root / name)
            if section.stage == "select":
                built[split] = hotpot.build_selector_features(
                    loaded[split], tokenizer, seq_len=seq_len, max_question_tokens=section.max_question_tokens,
                    max_paragraphs=section.max_paragraphs,
                )
            else:
                built[split] = hotpot.build_answer_features(
                    loaded[split], tokenizer, seq_len=seq_len,
                    selections=self._selections(section, split, loaded[split]),
                    max_question_tokens=section.max_question_tokens, max_sentences=section.max_sentences,
                    max_answer_spans=section.max_answer_spans,
                )
            encoder_base.check_global_tokens(plan, built[split].arrays()["global_mask"], split, "question and markers")
            log.info("HotpotQA %s (stage %s): %d examples, %d truncated", split, section.stage, len(loaded[split]),
                     built[split].truncated)
        for split in ("train", "validation"):
            if split not in loaded:
                raise FileNotFoundError(f"HotpotQA: data.{split}_file is needed")
        data = HotpotData(loaded, built, "")
        data.fingerprint = "-".join(examples.fingerprint(data.features(s)) for s in sorted(built))
        return data

    @staticmethod
    def _selections(section: DataSection, split: str, split_examples) -> dict[str, list[int]]:
        """Stage 2's paragraphs of a split (see the module docstring)."""
        file = getattr(section, f"{split}_selection")
        training = split == "train"
        if section.oracle_paragraphs and not training:
            if file:
                raise sections.ConfigError(f"data.{split}_selection: give it or data.oracle_paragraphs, not both")
            log.warning("HotpotQA %s: evaluated on the gold paragraphs (data.oracle_paragraphs), an upper bound", split)
            return selection.selections_for(split_examples, None, keep=section.keep_paragraphs, add_gold=True)
        if not file and not training:
            raise sections.ConfigError(
                f"data.{split}_selection: stage 2 needs stage 1's ranking of the {split} split (its predictions "
                f"file), or data.oracle_paragraphs=True for the gold paragraphs"
            )
        ranking = selection.read_selection(Path(file).expanduser()) if file else None
        if ranking is None:
            log.warning("HotpotQA train: no data.train_selection, so stage 2 trains on the gold paragraphs alone, "
                        "without the distractors stage 1 lets through at evaluation")
        return selection.selections_for(split_examples, ranking, keep=section.keep_paragraphs, add_gold=training,
                                     source=f"data.{split}_selection ({file})")

    def loss(self, model, params, batch, *, step, dropout_key):
        out = self.forward(model, params, batch, dropout_key=dropout_key)
        if "paragraph_positions" in batch:
            loss = _binary_cross_entropy(_at(out["token_scores"], batch["paragraph_positions"]),
                                         batch["paragraph_labels"])
            return loss, {}
        valid = batch["context_mask"]
        start = triviaqa.occurrence_loss(out["start_logits"], batch["answer_starts"], valid)
        end = triviaqa.occurrence_loss(out["end_logits"], batch["answer_ends"], valid)
        has_span = (batch["answer_type"] == 0) & (batch["answer_starts"][:, 0] >= 0)
        span_loss = jnp.where(has_span, (start + end) / 2, 0.0).sum() / jnp.maximum(has_span.sum(), 1)
        typed = batch["answer_type"] >= 0
        type_losses = optax.softmax_cross_entropy_with_integer_labels(out["type_logits"],
                                                                      jnp.maximum(batch["answer_type"], 0))
        type_loss = jnp.where(typed, type_losses, 0.0).sum() / jnp.maximum(typed.sum(), 1)
        sp_loss = _binary_cross_entropy(_at(out["token_scores"], batch["sentence_positions"]),
                                        batch["sentence_labels"])
        return span_loss + type_loss + sp_loss, {"span_loss": span_loss, "type_loss": type_loss, "sp_loss": sp_loss}

    def evaluator(self, plan, data, phase, mesh):
        model = self.build_model(phase.model)
        if plan.data.stage == "select":
            return SelectorEvaluator(self, model, plan, data, mesh)
        tokenizer, _ = self.task_tokenizer(plan)
        return AnswerEvaluator(self, model, plan, data, tokenizer, mesh)

    def summary(self, split: str, metrics) -> str:
        names = ("paragraph_em", "paragraph_recall", "em", "f1", "sp_em", "sp_f1", "joint_em", "joint_f1",
                 "examples")
        return encoder_base.summary_line(split, metrics, names)


TASK = HotpotQATask()
