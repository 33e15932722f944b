"""The official HotpotQA metric (answer, supporting-fact and joint EM/F1), re-implemented.

Mirrors `hotpot_evaluate_v1.py` of hotpotqa/hotpot:

* `normalize_answer` is SQuAD's: lowercase, ASCII punctuation *deleted*
  ("rock-n-roll" -> "rocknroll"), articles a/an/the removed as whole words,
  whitespace collapsed.
* answer F1 is token F1, except that when either side normalises to "yes",
  "no" or "noanswer" and the two differ, F1, precision and recall are all 0;
  answer EM compares the normalised strings. One gold answer per question.
* supporting facts are compared as sets of `(title, sentence index)`: EM is 1
  when the sets are equal, precision/recall/F1 from true and false positives
  (0 where a denominator would be 0, so an empty prediction of a non-empty
  gold set scores 0, and two empty sets score EM 1 and F1 0).
* joint precision = answer precision x sp precision, joint recall likewise,
  joint F1 from those two, joint EM = answer EM x sp EM; only for questions
  with both an answer and a supporting-fact prediction.
* every metric is averaged over *all* gold questions (`len(gold)`): a missing
  answer or sp prediction scores 0 there (and is counted and logged here),
  predictions for unknown ids are ignored (and counted).

Returned values are percentages (the official script prints fractions).
The prediction file is the official submission format,
`{"answer": {_id: text}, "sp": {_id: [[title, sentence index], ...]}}`.
"""

from __future__ import annotations

import collections
import logging
import re
import string
from collections.abc import Mapping, Sequence

_LOG = logging.getLogger(__name__)

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SPECIAL = ("yes", "no", "noanswer")

METRIC_NAMES = (
    "em", "f1", "prec", "recall",
    "sp_em", "sp_f1", "sp_prec", "sp_recall",
    "joint_em", "joint_f1", "joint_prec", "joint_recall",
)  # fmt: skip


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation, as the official HotpotQA script applies it."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer: expected a str, got {type(text).__name__} {text!r}")
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_scores(prediction: str, gold: str) -> tuple[float, float, float, float]:
    """`(em, f1, precision, recall)` of one answer against the one gold answer, as fractions."""
    guess, truth = normalize_answer(prediction), normalize_answer(gold)
    em = float(guess == truth)
    if (guess in _SPECIAL or truth in _SPECIAL) and guess != truth:
        return em, 0.0, 0.0, 0.0
    guess_tokens, truth_tokens = guess.split(), truth.split()
    shared = sum((collections.Counter(guess_tokens) & collections.Counter(truth_tokens)).values())
    if shared == 0:
        return em, 0.0, 0.0, 0.0
    precision, recall = shared / len(guess_tokens), shared / len(truth_tokens)
    return em, 2 * precision * recall / (precision + recall), precision, recall


def _facts(facts, name: str) -> set[tuple[str, int]]:
    out = set()
    for fact in facts:
        if not (isinstance(fact, (list, tuple)) and len(fact) == 2 and isinstance(fact[0], str) and isinstance(fact[1], int)):
            raise ValueError(f"{name}: expected [title, sentence index] pairs, got {fact!r}")
        out.add((fact[0], fact[1]))
    return out


def supporting_fact_scores(prediction: Sequence, gold: Sequence) -> tuple[float, float, float, float]:
    """`(em, f1, precision, recall)` of predicted `[title, sentence index]` facts against the gold ones, as fractions."""
    guess, truth = _facts(prediction, "prediction"), _facts(gold, "gold")
    true_positives = len(guess & truth)
    false_positives, false_negatives = len(guess - truth), len(truth - guess)
    precision = true_positives / (true_positives + false_positives) if guess else 0.0
    recall = true_positives / (true_positives + false_negatives) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    em = 1.0 if false_positives + false_negatives == 0 else 0.0
    return em, f1, precision, recall


def evaluate(predictions: Mapping, gold: Sequence[Mapping]) -> dict[str, float | int]:
    """The official scores of a submission, in percent.

    Args:
      predictions: `{"answer": {_id: text}, "sp": {_id: [[title, index], ...]}}`.
      gold: the dev records (each with `_id`, `answer`, `supporting_facts`).

    Returns:
      the twelve `METRIC_NAMES` in percent, plus `count` (gold questions),
      `missing_answer`, `missing_sp` and `extra` (predicted ids not in gold).

    Raises:
      ValueError if `gold` is empty, `predictions` lacks the two sections, or
      a record lacks a field; TypeError if a predicted answer is not a string.
    """
    if not gold:
        raise ValueError("gold: empty; nothing to evaluate")
    if not isinstance(predictions, Mapping) or not all(isinstance(predictions.get(k), Mapping) for k in ("answer", "sp")):
        raise ValueError("predictions: expected {'answer': {_id: text}, 'sp': {_id: [[title, index], ...]}}")
    totals = dict.fromkeys(METRIC_NAMES, 0.0)
    missing_answer, missing_sp = [], []
    ids = set()
    for record in gold:
        try:
            qid, gold_answer, gold_facts = record["_id"], record["answer"], record["supporting_facts"]
        except KeyError as error:
            raise ValueError(f"gold record {record.get('_id', '?')!r}: missing field {error}") from None
        ids.add(qid)
        answer = sp = None
        if qid in predictions["answer"]:
            text = predictions["answer"][qid]
            if not isinstance(text, str):
                raise TypeError(f"predictions['answer'][{qid!r}]: expected a str, got {type(text).__name__} {text!r}")
            answer = answer_scores(text, gold_answer)
            for name, value in zip(("em", "f1", "prec", "recall"), answer):
                totals[name] += value
        else:
            missing_answer.append(qid)
        if qid in predictions["sp"]:
            try:
                sp = supporting_fact_scores(predictions["sp"][qid], gold_facts)
            except ValueError as error:
                raise ValueError(f"question {qid!r}: {error}") from None
            for name, value in zip(("sp_em", "sp_f1", "sp_prec", "sp_recall"), sp):
                totals[name] += value
        else:
            missing_sp.append(qid)
        if answer is not None and sp is not None:
            precision, recall = answer[2] * sp[2], answer[3] * sp[3]
            totals["joint_prec"] += precision
            totals["joint_recall"] += recall
            totals["joint_f1"] += 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
            totals["joint_em"] += answer[0] * sp[0]
    for what, missing in (("an answer", missing_answer), ("supporting facts", missing_sp)):
        if missing:
            _LOG.warning("%d of %d questions have no predicted %s and score 0 there (first: %s)",
                         len(missing), len(gold), what, missing[0])
    count = len(gold)
    out: dict[str, float | int] = {name: 100.0 * total / count for name, total in totals.items()}
    out["count"] = count
    out["missing_answer"] = len(missing_answer)
    out["missing_sp"] = len(missing_sp)
    out["extra"] = len((set(predictions["answer"]) | set(predictions["sp"])) - ids)
    return out
