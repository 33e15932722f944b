"""TriviaQA (Wikipedia): readers, answer occurrences, fixed-length features and span decoding, in NumPy.

The Longformer paper's set-up (allenai/longformer `scripts/triviaqa.py`):
one feature per (question, evidence document) pair,
`<s> question </s></s> document </s>` truncated to `seq_len` tokens (4096 in
the paper), every occurrence of every
answer alias in the kept document as a target (the paper's "OR" loss), and
global attention on every position before the first `</s>` (`<s>` and the
question: allenai's `_get_question_end_index` slice, the same as Hugging
Face's `LongformerForQuestionAnswering` default), and
at test time, for the Wikipedia domain, one answer per question: the
highest-scoring span over its documents.

Where this module differs from allenai's script, on purpose:

* the separator is RoBERTa's pair form `</s></s>` (as Hugging Face's
  `LongformerForQuestionAnswering` is fed), not allenai's single `</s>`;
* aliases are matched as literal text (allenai passes them to `re.finditer`
  unescaped, so "c++" raises and "(film)" matches "film");
* the token of each character comes from the tokenizer's offsets, not from
  re-tokenising whitespace-split words;
* an answer is a (start, end) pair kept aligned in `answer_starts` /
  `answer_ends` (allenai blanks duplicate starts and ends independently);
  distinct answers may share a start or an end token.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from longjax.data import json_files
from longjax.data.triviaqa_eval import normalize_answer, official_ground_truths


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One (question, evidence document) pair.

    Attributes:
      id: `"<QuestionId>--<Filename>"`, as allenai's SQuAD-style conversion names it.
      question_id: the TriviaQA `QuestionId` (the key of the Wikipedia prediction file).
      question: the question text.
      context: the whole evidence document.
      aliases: the official ground truth (`NormalizedAliases` plus normalised
        `HumanAnswers`); empty for test-without-answers.
    """

    id: str
    question_id: str
    question: str
    context: str
    aliases: tuple[str, ...]


# ---------------------------------------------------------------- readers


def _str_field(record: Mapping, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string {key!r}, got {value!r}")
    return value


def read_raw(qa_file: str | os.PathLike, evidence_dir: str | os.PathLike) -> list[QAExample]:
    """The examples of a raw TriviaQA Wikipedia question file.

    Args:
      qa_file: `qa/wikipedia-{train,dev,test-without-answers}.json` (or a
        `verified-wikipedia-dev.json`): `{"Data": [{"Question", "QuestionId",
        "Answer": {"NormalizedAliases", "HumanAnswers"?, ...}, "EntityPages":
        [{"Filename", "Title", "DocSource", ...}]}], "Domain": "Wikipedia",
        "Split", "VerifiedEval", "Version"}`. A record may lack "Answer" only
        when `Split` is neither "train" nor "dev". Where `VerifiedEval` is
        true, only the questions (and pages) marked `QuestionPartOfVerifiedEval`
        (`DocPartOfVerifiedEval`) are read, as the official evaluation does.
      evidence_dir: the `evidence/wikipedia` directory holding each page's `Filename`.

    Returns:
      One `QAExample` per (question, entity page), in file order; a page
      listed twice for one question gives one example.

    Raises:
      FileNotFoundError naming the evidence file and the question when a page is missing;
      ValueError naming the file and the record index when a record is malformed
      or a QuestionId repeats.
    """
    qa_file, evidence_dir = pathlib.Path(qa_file), pathlib.Path(evidence_dir)
    data = json_files.read_json(qa_file)
    if not isinstance(data, dict) or not isinstance(data.get("Data"), list):
        raise ValueError(f"{qa_file}: expected a JSON object with a 'Data' list (raw TriviaQA)")
    if data.get("Domain") != "Wikipedia":
        raise ValueError(f"{qa_file}: expected 'Domain': 'Wikipedia', got {data.get('Domain')!r}")
    verified = bool(data.get("VerifiedEval", False))
    examples, seen_questions = [], set()
    for index, record in enumerate(data["Data"]):
        where = f"{qa_file}: record {index}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        if verified and not record.get("QuestionPartOfVerifiedEval", False):
            continue
        question_id = _str_field(record, "QuestionId", where)
        question = _str_field(record, "Question", where)
        if question_id in seen_questions:
            raise ValueError(f"{where}: QuestionId {question_id!r} repeats an earlier record")
        seen_questions.add(question_id)
        if "Answer" in record:
            try:
                aliases = tuple(official_ground_truths(record["Answer"]))
            except (ValueError, TypeError) as error:
                raise ValueError(f"{where} ({question_id}): {error}") from None
        elif data.get("Split") in ("train", "dev"):
            raise ValueError(f"{where} ({question_id}): no 'Answer' in a {data['Split']!r} file")
        else:
            aliases = ()
        pages = record.get("EntityPages")
        if not isinstance(pages, list):
            raise ValueError(f"{where} ({question_id}): expected an 'EntityPages' list, got {pages!r}")
        seen_files = set()
        for page_index, page in enumerate(pages):
            page_where = f"{where} ({question_id}) EntityPages[{page_index}]"
            if not isinstance(page, dict):
                raise ValueError(f"{page_where}: expected an object, got {page!r}")
            if verified and not page.get("DocPartOfVerifiedEval", False):
                continue
            filename = _str_field(page, "Filename", page_where)
            if filename in seen_files:
                continue
            seen_files.add(filename)
            path = evidence_dir / filename
            if not path.is_file():
                raise FileNotFoundError(f"{path}: evidence file of question {question_id} ({where}) not found")
            context = path.read_text(encoding="utf-8")
            examples.append(QAExample(f"{question_id}--{filename}", question_id, question, context, aliases))
    return examples


def read_squad_style(path: str | os.PathLike) -> list[QAExample]:
    """The examples of allenai's SQuAD-style conversion (`scripts/triviaqa_utils/convert_to_squad_format.py`).

    Args:
      path: `{"data": [{"paragraphs": [{"context", "qas": [{"id":
        "<QuestionId>--<Filename>", "qid"?, "question", "answers": [{"text",
        "answer_start"}], "aliases": [NormalizedAliases]}]}]}], "version"}`.
        `answers` is not used: `build_features` finds the occurrences of the
        aliases itself (allenai's were found by an unescaped regex). Note that
        the conversion keeps only the first 800 NLTK tokens of each document.

    Returns:
      One `QAExample` per entry of `qas`, in file order; `question_id` is the
      part of `id` before the first '--'.

    Raises:
      ValueError naming the file and the (data, paragraph, qa) index of a malformed record,
      of a "qid" that disagrees with the id, or of a repeated id.
    """
    path = pathlib.Path(path)
    data = json_files.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'data' list (SQuAD style)")
    examples, seen = [], set()
    for d_index, entry in enumerate(data["data"]):
        paragraphs = entry.get("paragraphs") if isinstance(entry, dict) else None
        if not isinstance(paragraphs, list):
            raise ValueError(f"{path}: data[{d_index}]: expected an object with a 'paragraphs' list")
        for p_index, paragraph in enumerate(paragraphs):
            where = f"{path}: data[{d_index}].paragraphs[{p_index}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise ValueError(f"{where}: expected an object with a 'qas' list")
            context = _str_field(paragraph, "context", where)
            for q_index, qa in enumerate(paragraph["qas"]):
                qa_where = f"{where}.qas[{q_index}]"
                if not isinstance(qa, dict):
                    raise ValueError(f"{qa_where}: expected an object, got {qa!r}")
                example_id = _str_field(qa, "id", qa_where)
                question = _str_field(qa, "question", qa_where)
                aliases = qa.get("aliases")
                if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                    raise ValueError(f"{qa_where} ({example_id}): expected an 'aliases' list of strings, got {aliases!r}")
                question_id = example_id.partition("--")[0]
                if "qid" in qa and qa["qid"] != question_id:
                    raise ValueError(f"{qa_where}: 'qid' {qa['qid']!r} disagrees with id {example_id!r}")
                if example_id in seen:
                    raise ValueError(f"{qa_where}: id {example_id!r} repeats an earlier entry")
                seen.add(example_id)
                examples.append(QAExample(example_id, question_id, question, context, tuple(aliases)))
    return examples


def ground_truth(examples: Sequence[QAExample]) -> dict[str, list[str]]:
    """`{question_id: aliases}` for `triviaqa_eval.evaluate` (one entry per question)."""
    return {example.question_id: list(example.aliases) for example in examples}


# ---------------------------------------------------------------- answer occurrences


def find_occurrences(context: str, aliases: Sequence[str], *, word_boundaries: bool = False) -> list[tuple[int, int]]:
    """Every occurrence of every alias in `context`, as `(start_char, end_char)` (end exclusive).

    Each alias (stripped of surrounding whitespace; empty ones are skipped,
    as they would match everywhere) is matched as literal text: it is
    escaped, so "c++" and "(film)" mean themselves. Matching is
    case-insensitive, character by character (Python's simple case folding,
    which keeps character offsets; `str.lower` may not), as allenai's
    `re.IGNORECASE`. Overlapping occurrences are all found.

    Args:
      word_boundaries: when True, an occurrence must not be preceded or
        followed by an alphanumeric character ("art" is not found in
        "party"). allenai's conversion does not ask for this (False).

    Returns:
      The distinct spans, sorted.
    """
    if isinstance(aliases, str):
        raise TypeError(f"aliases: expected a sequence of strings, got the string {aliases!r}")
    spans = set()
    for alias in aliases:
        alias = alias.strip()
        if not alias:
            continue
        pattern = re.compile(f"(?=({re.escape(alias)}))", re.IGNORECASE)
        for match in pattern.finditer(context):
            start, end = match.span(1)
            if word_boundaries and (
                (start > 0 and context[start - 1].isalnum()) or (end < len(context) and context[end].isalnum())
            ):
                continue
            spans.add((start, end))
    return sorted(spans)


# ---------------------------------------------------------------- features


@dataclasses.dataclass(frozen=True)
class Features:
    """Fixed-length features, one per example, stacked (n features of `seq_len` tokens, K = max_answer_spans).

    Arrays:
      input_ids: int32 `[n, seq_len]`, `<s> question </s></s> context </s> <pad>...`.
      padding_mask: bool `[n, seq_len]`, True at real tokens.
      global_mask: bool `[n, seq_len]`, True before the first `</s>` (`<s>` and the question).
      answer_starts, answer_ends: int32 `[n, K]`, token index of the first and
        last (inclusive) token of each answer occurrence inside the kept
        context, in text order, distinct pairs; -1 after the last.
      num_answers: int32 `[n]`, answers stored.
      num_truncated: int32 `[n]`, occurrences lost because the context was truncated.
      num_overflow: int32 `[n]`, occurrences in the kept context beyond K.
      context_offset: int32 `[n]`, token index of the first context token.
      num_context_tokens: int32 `[n]`, context tokens kept.
      token_char_spans: int32 `[n, seq_len, 2]`, each context token's
        `(start, end)` characters in the context (the tokenizer's offsets;
        byte-level BPE's lone 'Ġ' tokens have start == end); -1 elsewhere.
      example_index: int32 `[n]`, the row's example in the list given.

    Metadata (tuples of n strings): ids, question_ids, contexts.
    """

    input_ids: np.ndarray
    padding_mask: np.ndarray
    global_mask: np.ndarray
    answer_starts: np.ndarray
    answer_ends: np.ndarray
    num_answers: np.ndarray
    num_truncated: np.ndarray
    num_overflow: np.ndarray
    context_offset: np.ndarray
    num_context_tokens: np.ndarray
    token_char_spans: np.ndarray
    example_index: np.ndarray
    ids: tuple[str, ...]
    question_ids: tuple[str, ...]
    contexts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by name (a feature table for `longjax.data.examples`: every array has leading length n)."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if isinstance(getattr(self, field.name), np.ndarray)
        }


def _special_id(tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer: has no {token!r} token (a RoBERTa-style vocabulary is expected)")
    return token_id


def _char_to_token_spans(offsets: np.ndarray, occurrences: list[tuple[int, int]], where: str) -> np.ndarray:
    """int64 `[m, 2]`: the first and last context token (indices into `offsets`) covering each `[start, end)`."""
    chars = np.asarray(occurrences, np.int64).reshape(-1, 2)
    nonempty = np.flatnonzero(offsets[:, 1] > offsets[:, 0])
    starts, ends = offsets[nonempty, 0], offsets[nonempty, 1]
    first = np.searchsorted(ends, chars[:, 0], side="right")  # first token ending after the start
    last = np.searchsorted(starts, chars[:, 1], side="left") - 1  # last token starting before the end
    bad = (first >= len(nonempty)) | (last < first)
    if np.any(bad):
        start, end = chars[np.argmax(bad)]
        raise ValueError(f"{where}: no token covers characters [{start}, {end})")
    return np.stack([nonempty[first], nonempty[last]], axis=1)


def build_features(
    examples: Sequence[QAExample],
    tokenizer,
    *,
    seq_len: int,
    max_question_tokens: int | None = None,
    max_answer_spans: int = 64,
    word_boundaries: bool = False,
) -> Features:
    """Tokenises, truncates and pads each example into one fixed-length feature.

    The question and the context are encoded separately with
    `add_special_tokens=False`; the question is cut to `max_question_tokens`
    (if given) and the context to what fits in `seq_len` beside it and the
    four special tokens. The answers are the `find_occurrences` of the
    example's aliases, mapped to tokens through the context encoding's
    offsets: an answer starts at the first non-empty token ending after its
    first character and ends at the last non-empty token starting before its
    end. Two occurrences mapping to the same tokens are one answer.

    Args:
      examples: the examples (features keep their order).
      tokenizer: a `tokenizers.Tokenizer` with `<s>`, `</s>` and `<pad>`.
      seq_len: tokens per feature.
      max_question_tokens: question tokens kept (all if None).
      max_answer_spans: K, answers stored per feature.
      word_boundaries: passed to `find_occurrences`.

    Raises:
      ValueError naming the option or the example when the question leaves no
      room for the context, a question contains `</s>`, or the offsets are
      not in text order.
    """
    if seq_len < 5:
        raise ValueError(f"seq_len: expected at least 5 (four special tokens and one context token), got {seq_len}")
    if max_question_tokens is not None and max_question_tokens < 0:
        raise ValueError(f"max_question_tokens: expected None or >= 0, got {max_question_tokens}")
    if max_answer_spans < 1:
        raise ValueError(f"max_answer_spans: expected >= 1, got {max_answer_spans}")
    if not examples:
        raise ValueError("examples: empty")
    bos, eos, pad = (_special_id(tokenizer, t) for t in ("<s>", "</s>", "<pad>"))
    n = len(examples)
    arrays = {
        "input_ids": np.full((n, seq_len), pad, np.int32),
        "padding_mask": np.zeros((n, seq_len), bool),
        "global_mask": np.zeros((n, seq_len), bool),
        "answer_starts": np.full((n, max_answer_spans), -1, np.int32),
        "answer_ends": np.full((n, max_answer_spans), -1, np.int32),
        "num_answers": np.zeros(n, np.int32),
        "num_truncated": np.zeros(n, np.int32),
        "num_overflow": np.zeros(n, np.int32),
        "context_offset": np.zeros(n, np.int32),
        "num_context_tokens": np.zeros(n, np.int32),
        "token_char_spans": np.full((n, seq_len, 2), -1, np.int32),
        "example_index": np.arange(n, dtype=np.int32),
    }
    for row, example in enumerate(examples):
        where = f"examples[{row}] ({example.id})"
        question = tokenizer.encode(example.question, add_special_tokens=False).ids
        if eos in question:
            raise ValueError(f"{where}: the question contains the '</s>' token, which would end the global question early")
        if max_question_tokens is not None:
            question = question[:max_question_tokens]
        budget = seq_len - len(question) - 4
        if budget < 1:
            raise ValueError(
                f"{where}: the question's {len(question)} tokens leave no room for the context in seq_len={seq_len}; "
                "set max_question_tokens"
            )
        encoding = tokenizer.encode(example.context, add_special_tokens=False)
        offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
        if np.any(np.diff(offsets[:, 0]) < 0) or np.any(np.diff(offsets[:, 1]) < 0):
            raise ValueError(f"{where}: the tokenizer's context offsets are not in text order")
        kept = min(budget, len(encoding.ids))
        offset = len(question) + 3
        ids = [bos, *question, eos, eos, *encoding.ids[:kept], eos]
        arrays["input_ids"][row, : len(ids)] = ids
        arrays["padding_mask"][row, : len(ids)] = True
        arrays["global_mask"][row, : len(question) + 1] = True
        arrays["context_offset"][row] = offset
        arrays["num_context_tokens"][row] = kept
        arrays["token_char_spans"][row, offset : offset + kept] = offsets[:kept]

        occurrences = find_occurrences(example.context, example.aliases, word_boundaries=word_boundaries)
        answers, truncated = {}, 0  # an ordered set of (start, end) token pairs
        for first, last in _char_to_token_spans(offsets, occurrences, where).tolist():
            if last >= kept:
                truncated += 1
            else:
                answers.setdefault((first + offset, last + offset), None)
        answers = list(answers)
        stored = answers[:max_answer_spans]
        if stored:
            arrays["answer_starts"][row, : len(stored)], arrays["answer_ends"][row, : len(stored)] = zip(*stored)
        arrays["num_answers"][row] = len(stored)
        arrays["num_truncated"][row] = truncated
        arrays["num_overflow"][row] = len(answers) - len(stored)
    return Features(
        **arrays,
        ids=tuple(e.id for e in examples),
        question_ids=tuple(e.question_id for e in examples),
        contexts=tuple(e.context for e in examples),
    )


# ---------------------------------------------------------------- decoding


class Span(NamedTuple):
    """A decoded answer: `score` = start logit + end logit, tokens inclusive, `text` cut from the context."""

    score: float
    start_tok: int
    end_tok: int
    text: str


def best_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    feature_index: int,
    features: Features,
    *,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> list[Span]:
    """The best answer spans of one feature, best first.

    Candidates are the kept context tokens with a non-empty character span
    (byte-level BPE's lone 'Ġ' tokens never start or end an answer); the
    `n_best` highest start logits and the `n_best` highest end logits among
    them are paired, keeping pairs with start <= end and at most
    `max_answer_len` tokens, as allenai's `decode` does.

    Args:
      start_logits, end_logits: float `[seq_len]`, the feature's logits.
      feature_index: the row of `features`.

    Returns:
      Up to `n_best` `Span`s, sorted by score (descending), ties by position;
      `text = context[start char of start_tok : end char of end_tok]`.
      Empty if no pair qualifies.
    """
    seq_len = features.input_ids.shape[1]
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    for name, logits in (("start_logits", start_logits), ("end_logits", end_logits)):
        if logits.shape != (seq_len,):
            raise ValueError(f"{name}: expected shape ({seq_len},) (one feature), got {logits.shape}")
    if not 0 <= feature_index < len(features):
        raise ValueError(f"feature_index: expected 0 <= index < {len(features)}, got {feature_index}")
    if n_best < 1 or max_answer_len < 1:
        raise ValueError(f"n_best and max_answer_len: expected >= 1, got {n_best} and {max_answer_len}")
    spans = features.token_char_spans[feature_index]
    offset = int(features.context_offset[feature_index])
    positions = offset + np.arange(int(features.num_context_tokens[feature_index]))
    positions = positions[spans[positions, 1] > spans[positions, 0]]
    # Stable sorts of the negated logits: the n best, earlier positions first among equals.
    starts = positions[np.argsort(-start_logits[positions], kind="stable")[:n_best]]
    ends = positions[np.argsort(-end_logits[positions], kind="stable")[:n_best]]
    context = features.contexts[feature_index]
    candidates = []
    for s in starts:
        for e in ends:
            if e < s or e - s + 1 > max_answer_len:
                continue
            text = context[spans[s, 0] : spans[e, 1]]
            candidates.append(Span(float(start_logits[s]) + float(end_logits[e]), int(s), int(e), text))
    candidates.sort(key=lambda span: (-span.score, span.start_tok, span.end_tok))
    return candidates[:n_best]


def all_best_spans(start_logits: np.ndarray, end_logits: np.ndarray, features: Features, **options) -> dict[str, list[Span]]:
    """`{feature id: best_spans(...)}` for logits of every feature, float `[n, seq_len]`; `options` go to `best_spans`."""
    shape = (len(features), features.input_ids.shape[1])
    for name, logits in (("start_logits", start_logits), ("end_logits", end_logits)):
        if np.shape(logits) != shape:
            raise ValueError(f"{name}: expected shape {shape} (one row per feature), got {np.shape(logits)}")
    return {
        features.ids[i]: best_spans(start_logits[i], end_logits[i], i, features, **options) for i in range(len(features))
    }


def feature_predictions(results: Mapping[str, Sequence[Span]]) -> dict[str, str]:
    """`{example id: text of its best span}` ("" where it has none): the per-document prediction."""
    return {example_id: spans[0].text if spans else "" for example_id, spans in results.items()}


def predictions(
    results: Mapping[str, Sequence[Span]] | Sequence[Sequence[Span]], examples: Sequence[QAExample]
) -> dict[str, str]:
    """The Wikipedia prediction file `{QuestionId: answer}`.

    Each question's answer is the best span, by score, over all its
    documents (allenai's `test_end`: the top span of each document, then the
    document whose top span scores highest; the first such document in
    `examples` order on a tie). A question whose documents have results but
    no span gets "" (allenai writes "NoAnswerFound"; both score 0). With a
    mapping, questions none of whose examples has a result are absent (the
    official evaluation then scores them 0).

    Args:
      results: either `{example id: spans, best first}` (e.g. `all_best_spans`),
        or a list with one entry (spans, best first) per example, in
        `examples` order (e.g. `[best_spans(..., i, features) for i in ...]`).
      examples: the examples the results belong to.

    Raises:
      ValueError naming an id of a mapping that is not among `examples`, or
      when a list's length differs from that of `examples`.
    """
    if isinstance(results, Mapping):
        question_of = {example.id: example.question_id for example in examples}
        unknown = [example_id for example_id in results if example_id not in question_of]
        if unknown:
            raise ValueError(f"results: {len(unknown)} ids are not among the examples (first: {unknown[0]!r})")
        pairs = [(example, results[example.id]) for example in examples if example.id in results]
    else:
        if len(results) != len(examples):
            raise ValueError(
                f"results: a list needs one entry per example ({len(examples)}), got {len(results)}; "
                "pass {example id: spans} for a subset"
            )
        pairs = list(zip(examples, results))
    best: dict[str, Span | None] = {}
    for example, spans in pairs:
        top = spans[0] if spans else None
        current = best.get(example.question_id)
        if example.question_id not in best or (top is not None and (current is None or top.score > current.score)):
            best[example.question_id] = top
    return {question_id: span.text if span is not None else "" for question_id, span in best.items()}
