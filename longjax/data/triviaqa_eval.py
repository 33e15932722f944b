"""The official TriviaQA metric (exact match and token F1), re-implemented.

Mirrors `evaluation/triviaqa_evaluation.py` of mandarjoshi90/triviaqa (v1.0):

* `normalize_answer`: underscores become spaces, the text is lowercased,
  every ASCII punctuation character and the four extra characters the
  official script lists (‘ ’ ´ `) become spaces (they are replaced, not
  deleted: "rock-n-roll" -> "rock n roll"), the articles a/an/the are removed where
  they stand between word boundaries (Python's unicode `\\b`, applied after
  the punctuation step, so "“the” end" keeps its curly double quotes, which
  the official script does not treat as punctuation, and loses "the"), and
  whitespace is collapsed. So "U.S.A." -> "u s": its last letter is an article.
* `f1`: token F1 over the normalised tokens, 0 when no token is shared (so
  an empty prediction scores F1 0 even against an empty ground truth).
* both take the maximum over the ground truths (a question's aliases).
* `evaluate`: averages over *every question of the ground truth*, as the
  official `evaluate_triviaqa` does (its denominator is `len(qid_list)`, the
  ground truth's keys): a question without a prediction scores 0 and
  predictions for questions outside the ground truth are ignored. Both are
  counted in the result (and the first is logged), never dropped silently.

The official ground truth of a question is its `NormalizedAliases` plus its
normalised `HumanAnswers` (`official_ground_truths`).
"""

from __future__ import annotations

import collections
import logging
import re
import string
from collections.abc import Mapping, Sequence

_LOG = logging.getLogger(__name__)

# string.punctuation already holds '`' and '_'; the official script adds the typographic single quotes and the acute accent.
_PUNCTUATION = frozenset(string.punctuation) | frozenset("\u2018\u2019\u00b4`")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(text: str) -> str:
    """The official normalisation of an answer string (see the module docstring for the rules and their order)."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer: expected a str, got {type(text).__name__} {text!r}")
    text = text.replace("_", " ").lower()
    text = "".join(" " if char in _PUNCTUATION else char for char in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def official_ground_truths(answer: Mapping) -> list[str]:
    """A raw record's `Answer` as the official script scores it: `NormalizedAliases` + normalised `HumanAnswers`.

    Raises:
      ValueError if `answer` has no `NormalizedAliases` list.
    """
    aliases = answer.get("NormalizedAliases") if isinstance(answer, Mapping) else None
    if not isinstance(aliases, list):
        raise ValueError(f"Answer: expected a dict with a 'NormalizedAliases' list, got {answer!r}")
    return list(aliases) + [normalize_answer(human) for human in answer.get("HumanAnswers", [])]


def _check_ground_truths(ground_truths: Sequence[str]) -> None:
    if isinstance(ground_truths, str):
        raise TypeError(f"ground_truths: expected a sequence of strings, got the string {ground_truths!r}")
    if len(ground_truths) == 0:
        raise ValueError("ground_truths: empty; a question needs at least one alias to be scored")


def _f1_one(prediction_tokens: list[str], truth_tokens: list[str]) -> float:
    shared = sum((collections.Counter(prediction_tokens) & collections.Counter(truth_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(prediction_tokens)
    recall = shared / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, ground_truths: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised ground truth, else 0.0.

    Raises:
      ValueError if `ground_truths` is empty (the official script's `max` of nothing).
    """
    _check_ground_truths(ground_truths)
    guess = normalize_answer(prediction)
    return float(any(guess == normalize_answer(truth) for truth in ground_truths))


def f1(prediction: str, ground_truths: Sequence[str]) -> float:
    """The best token F1 (in [0, 1]) of the normalised prediction against any normalised ground truth.

    Raises:
      ValueError if `ground_truths` is empty.
    """
    _check_ground_truths(ground_truths)
    guess = normalize_answer(prediction).split()
    return max(_f1_one(guess, normalize_answer(truth).split()) for truth in ground_truths)


def evaluate(predictions: Mapping[str, str], ground_truth: Mapping[str, Sequence[str]]) -> dict[str, float | int]:
    """The official scores of a prediction file, in percent.

    Args:
      predictions: `{QuestionId: answer text}` (the official prediction file).
      ground_truth: `{QuestionId: [alias, ...]}`, e.g. `official_ground_truths`
        of each raw record, or `longjax.data.triviaqa.ground_truth(examples)`.

    Returns:
      `{'exact_match': %, 'f1': %, 'count': questions averaged over (all of
      `ground_truth`), 'missing': questions without a prediction (scored 0),
      'extra': predictions for questions not in `ground_truth` (ignored)}`.

    Raises:
      ValueError if `ground_truth` is empty or a question has no alias;
      TypeError if a prediction is not a string.
    """
    if not ground_truth:
        raise ValueError("ground_truth: empty; nothing to evaluate")
    em_total = f1_total = 0.0
    missing = []
    for qid, truths in ground_truth.items():
        if qid not in predictions:
            missing.append(qid)
            continue
        prediction = predictions[qid]
        if not isinstance(prediction, str):
            raise TypeError(f"predictions[{qid!r}]: expected a str, got {type(prediction).__name__} {prediction!r}")
        try:
            em_total += exact_match(prediction, truths)
            f1_total += f1(prediction, truths)
        except ValueError as error:
            raise ValueError(f"ground_truth[{qid!r}]: {error}") from None
    extra = sum(1 for qid in predictions if qid not in ground_truth)
    if missing:
        _LOG.warning("%d of %d questions have no prediction and score 0 (first: %s)", len(missing), len(ground_truth), missing[0])
    count = len(ground_truth)
    return {
        "exact_match": 100.0 * em_total / count,
        "f1": 100.0 * f1_total / count,
        "count": count,
        "missing": len(missing),
        "extra": extra,
    }
