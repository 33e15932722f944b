"""HotpotQA (distractor setting) for a two-stage long encoder: the reader, both stages' features, the stage-1 file.

The Longformer paper (Table 7) answers HotpotQA in two stages: a paragraph
selector, then a model over the selected paragraphs that predicts the answer
span, the answer type (span / yes / no) and the supporting-fact sentences,
with the question, titles and sentences marked by task tokens and the
markers given global attention. Its code was never released; what it leaves
open is decided here as follows.

Input (both stages): `<s> [q] question [/q] <t> title </t> sentence [s]
sentence [s] ... <t> title </t> sentence [s] ... </s>`, then `<pad>` to
`seq_len`. No `</s>` separates the question from the paragraphs (the issue's
layout). The question, every title and every sentence are tokenised on their
own, with `add_special_tokens=False` and their text as given (HotpotQA
sentences after the first usually begin with a space, so their first word
gets byte-level BPE's word-initial form; titles and first sentences do not).
Data text is text: a sentence containing "[s]" or "</s>" is encoded as those
characters (a private copy of the tokenizer with `encode_special_tokens`),
so no example can forge a marker. Global attention: `<s>`, `[q]`, the
question, `[/q]` and every `<t>`, `</t>` and `[s]`; not the words of titles
or sentences, nor the final `</s>`.

Truncation: the question is cut to `max_question_tokens` (if given); then
the paragraphs are laid out as units (a paragraph's `<t> title </t>`, then
each `sentence [s]`) and the input is the longest prefix of whole units that
fits in `seq_len - 1` tokens, before the final `</s>`. Nothing after the
first unit that does not fit is kept, not even a shorter sentence that would
fit: the input stays a prefix of the full layout, the same for both stages.
A paragraph whose title fits but whose first sentence does not is kept as
its title alone. An example that loses anything is counted as truncated and
the count logged.

Stage 1 (`build_selector_features`): all paragraphs in context order; each
is read at its `<t>`; its label is 1 when its title is a supporting fact's
title. A paragraph cut away has position and label -1, so the loss never
sees a label without a position. Its ranking (`paragraph_ranking`,
`hotpotqa_selection.write_selection`) lists only the paragraphs stage 1 saw, best first.

Selection (`longjax.data.hotpotqa_selection.select_paragraphs`): the first `keep` ranked titles, plus, for
training (`add_gold`), the gold paragraphs stage 1 missed, so every training
example holds its answer and facts; so a training input may hold up to two
paragraphs more than `keep`. The chosen paragraphs are laid out in the
context's original order, not in rank order: the position of a paragraph
then says nothing about its stage-1 score or about having been added as
gold, and is the same at training and at test time.

Stage 2 (`build_answer_features`): the answer type is read from the answer
text (`yes` / `no` after lowercasing and stripping, else a span), not from
`type` (a comparison question may have a span answer). Span targets are every
literal occurrence of the answer (`longjax.data.triviaqa.find_occurrences`:
case-insensitive, escaped, here with `word_boundaries=True` by default so
that "US" is not found in "famous" nor "1" in "1990") inside each kept
sentence, mapped to tokens through the offsets as `triviaqa.build_features`
does (the first non-empty token ending after its first character, the last
non-empty token starting before its end). An answer spanning two sentences
is not found. Yes/no answers get no span targets. A span answer with no
occurrence in the kept text keeps its row, with `answer_starts` all -1 (the
task drops its span loss there); such rows are counted and logged.
`context_mask` marks the sentence tokens with a non-empty character span
(byte-level BPE's lone 'Ġ' tokens never start or end an answer, as in
`triviaqa.best_spans`). The decoding context of a row is the concatenation of
its kept sentences in input order, with nothing inserted between
paragraphs: a span that crosses a paragraph decodes glued, so a decoder
should keep spans inside one paragraph. A sentence is predicted supporting
when its probability is strictly above the threshold.

Reader: HotpotQA's train set repeats some paragraphs within a record; an
exact repeat (same title and sentences) is dropped, and the count logged; a
title repeated with different sentences is an error, as titles name
paragraphs in the supporting facts and in the stage-1 file. A supporting
fact whose title is not in the context is an error (the distractor setting
always includes the gold paragraphs; a fullwiki file does not); one whose
sentence index is past its paragraph's end is kept, for the official
metric, but cannot be labelled, and the count is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tokenizers

from longjax.data import json_files
from longjax.data.triviaqa import find_occurrences

log = logging.getLogger(__name__)

TASK_TOKENS = ("[q]", "[/q]", "<t>", "</t>", "[s]")
ANSWER_TYPES = ("span", "yes", "no")  # answer_type 0, 1, 2; -1 unknown
_QUESTION_TYPES = ("comparison", "bridge")


@dataclasses.dataclass(frozen=True)
class HotpotExample:
    """One question with its paragraphs; `answer`, `type`, `level` and `supporting_facts` are None in a test file.

    Attributes:
      supporting_facts: `((title, sentence index), ...)` as in the file.
      context: `((title, (sentence, ...)), ...)`, repeated paragraphs dropped.
    """

    id: str
    question: str
    answer: str | None
    type: str | None
    level: str | None
    supporting_facts: tuple[tuple[str, int], ...] | None
    context: tuple[tuple[str, tuple[str, ...]], ...]


# ---------------------------------------------------------------- reader


def read_hotpotqa(path: str | os.PathLike) -> list[HotpotExample]:
    """The examples of a HotpotQA distractor file (a JSON list of records), in file order.

    Raises:
      FileNotFoundError naming the path; ValueError naming the file, the
      record index, its `_id` and the field of a malformed record, or a
      repeated `_id`.
    """
    path = Path(path)
    records = json_files.read_json(path, "a HotpotQA distractor JSON file")
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    examples, seen, repeats, unlabelled = [], set(), 0, 0
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if isinstance(record, dict) and isinstance(record.get("_id"), str):
            where += f" ({record['_id']})"
        example, dropped, past_end = _example(record, where)
        if example.id in seen:
            raise ValueError(f"{where}: '_id' repeats an earlier record")
        seen.add(example.id)
        examples.append(example)
        repeats += dropped
        unlabelled += past_end
    if repeats:
        log.warning("%s: dropped %d paragraphs repeated exactly within their record", path, repeats)
    if unlabelled:
        log.warning("%s: %d supporting facts point past their paragraph's last sentence and cannot be labelled",
                    path, unlabelled)
    return examples


def _example(record, where: str) -> tuple[HotpotExample, int, int]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("_id", "question"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: field {key!r}: expected a string, got {record.get(key)!r}")
    for key in ("answer", "level"):
        if key in record and not isinstance(record[key], str):
            raise ValueError(f"{where}: field {key!r}: expected a string, got {record[key]!r}")
    if "type" in record and record["type"] not in _QUESTION_TYPES:
        raise ValueError(f"{where}: field 'type': expected one of {_QUESTION_TYPES}, got {record['type']!r}")
    context = record.get("context")
    if not isinstance(context, list):
        raise ValueError(f"{where}: field 'context': expected a list of [title, [sentence, ...]], got {context!r}")
    paragraphs: dict[str, tuple[str, ...]] = {}
    repeats = 0
    for p, paragraph in enumerate(context):
        if not (isinstance(paragraph, list) and len(paragraph) == 2 and isinstance(paragraph[0], str)
                and isinstance(paragraph[1], list) and all(isinstance(s, str) for s in paragraph[1])):
            raise ValueError(f"{where}: field 'context'[{p}]: expected [title, [sentence, ...]], got {paragraph!r}")
        title, sentences = paragraph[0], tuple(paragraph[1])
        if title in paragraphs:
            if paragraphs[title] != sentences:
                raise ValueError(f"{where}: field 'context'[{p}]: title {title!r} repeats with other sentences")
            repeats += 1
            continue
        paragraphs[title] = sentences
    facts, past_end = None, 0
    if "supporting_facts" in record:
        raw = record["supporting_facts"]
        if not isinstance(raw, list):
            raise ValueError(f"{where}: field 'supporting_facts': expected a list of [title, index], got {raw!r}")
        facts = []
        for k, fact in enumerate(raw):
            if not (isinstance(fact, list) and len(fact) == 2 and isinstance(fact[0], str)
                    and isinstance(fact[1], int) and not isinstance(fact[1], bool) and fact[1] >= 0):
                raise ValueError(f"{where}: field 'supporting_facts'[{k}]: expected [title, sentence index >= 0], "
                                 f"got {fact!r}")
            if fact[0] not in paragraphs:
                raise ValueError(f"{where}: field 'supporting_facts'[{k}]: title {fact[0]!r} is not in the context "
                                 "(a distractor-setting file is expected)")
            past_end += fact[1] >= len(paragraphs[fact[0]])
            facts.append((fact[0], fact[1]))
        facts = tuple(facts)
    example = HotpotExample(record["_id"], record["question"], record.get("answer"), record.get("type"),
                            record.get("level"), facts, tuple(paragraphs.items()))
    return example, repeats, past_end


# ---------------------------------------------------------------- the shared input layout


class _Vocab(NamedTuple):
    bos: int
    eos: int
    pad: int
    q: int
    q_end: int
    t: int
    t_end: int
    s: int


def _vocab(tokenizer) -> tuple[_Vocab, tokenizers.Tokenizer]:
    """The marker ids, and a copy of `tokenizer` that encodes special tokens' spellings as plain text."""
    ids = []
    for token in ("<s>", "</s>", "<pad>", *TASK_TOKENS):
        index = tokenizer.token_to_id(token)
        if index is None:
            raise ValueError(f"tokenizer: has no {token!r}: add the task tokens first "
                             "(longjax.hf.tokenizer.add_task_tokens(tokenizer, hotpotqa.TASK_TOKENS))")
        ids.append(index)
    text = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    text.encode_special_tokens = True
    return _Vocab(*ids), text


class _Sentence(NamedTuple):
    paragraph: int  # index into the example's context
    index: int  # the sentence's index in its paragraph
    first: int  # position of its first token
    marker: int  # position of its [s]
    offsets: np.ndarray  # int64 [tokens, 2], characters in the sentence


@dataclasses.dataclass
class _Input:
    ids: list[int]
    global_positions: list[int]
    title_positions: dict[int, int]  # context index -> position of its <t>
    sentences: list[_Sentence]
    truncated: bool


def _layout(example: HotpotExample, paragraphs: Sequence[int], vocab: _Vocab, text: tokenizers.Tokenizer, *,
            seq_len: int, max_question_tokens: int | None, where: str) -> _Input:
    """The input of `example` restricted to `paragraphs` (context indices, in that order), before padding."""
    pieces = [example.question]
    for p in paragraphs:
        pieces += [example.context[p][0], *example.context[p][1]]
    encodings = text.encode_batch(pieces, add_special_tokens=False)
    specials = set(vocab)
    for piece, encoding in zip(pieces, encodings):
        # `text` encodes special tokens' spellings as characters; this holds unless the tokenizers library changes.
        if specials & set(encoding.ids):
            raise ValueError(f"{where}: {piece!r} encodes to a marker or special token")
    encodings = iter(encodings)
    question_ids = next(encodings).ids
    question = question_ids[:max_question_tokens]
    ids = [vocab.bos, vocab.q, *question, vocab.q_end]
    out = _Input(ids, list(range(len(ids))), {}, [], False)
    limit = seq_len - 1  # the final </s> always fits
    if len(ids) >= limit:
        raise ValueError(f"{where}: the question's {len(question)} tokens leave no room for a paragraph in "
                         f"seq_len={seq_len}; set data.max_question_tokens")
    for p in paragraphs:
        title = next(encodings).ids
        sentences = [next(encodings) for _ in example.context[p][1]]
        if out.truncated:
            continue  # the encodings of the paragraphs after the cut are consumed, unused
        if len(ids) + len(title) + 2 > limit:
            out.truncated = True
            continue
        out.title_positions[p] = len(ids)
        out.global_positions += [len(ids), len(ids) + len(title) + 1]
        ids += [vocab.t, *title, vocab.t_end]
        for k, encoding in enumerate(sentences):
            if len(ids) + len(encoding.ids) + 1 > limit:
                out.truncated = True
                break
            offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
            if np.any(np.diff(offsets, axis=0) < 0):
                raise ValueError(f"{where}: the tokenizer's offsets of sentence {k} of {example.context[p][0]!r} "
                                 "are not in text order")
            first = len(ids)
            ids += [*encoding.ids, vocab.s]
            out.sentences.append(_Sentence(p, k, first, len(ids) - 1, offsets))
            out.global_positions.append(len(ids) - 1)
    ids.append(vocab.eos)
    # A cut question counts too, but only now: during the layout `truncated` means "the paragraphs were cut".
    out.truncated = out.truncated or len(question) < len(question_ids)
    return out


def _check_options(examples, seq_len: int, max_question_tokens: int | None) -> None:
    if not examples:
        raise ValueError("examples: empty")
    if seq_len < 5:
        raise ValueError(f"seq_len: expected at least 5 (<s> [q] [/q], a paragraph's first token, </s>), got {seq_len}")
    if max_question_tokens is not None and max_question_tokens < 0:
        raise ValueError(f"max_question_tokens: expected None or >= 0, got {max_question_tokens}")


def _fill(row: int, layout: _Input, input_ids, padding_mask, global_mask) -> None:
    input_ids[row, : len(layout.ids)] = layout.ids
    padding_mask[row, : len(layout.ids)] = True
    global_mask[row, layout.global_positions] = True


def gold_titles(example: HotpotExample) -> set[str] | None:
    """The titles of the example's supporting facts (its gold paragraphs); None in a test file."""
    return None if example.supporting_facts is None else {title for title, _ in example.supporting_facts}


# ---------------------------------------------------------------- stage 1: paragraph selection


@dataclasses.dataclass(frozen=True)
class SelectorFeatures:
    """Stage-1 features, one row per example (P = max_paragraphs).

    Arrays:
      input_ids: int32 `[n, seq_len]`, the layout of the module docstring over all paragraphs.
      padding_mask, global_mask: bool `[n, seq_len]`.
      paragraph_positions: int32 `[n, P]`, the `<t>` of each paragraph in
        context order; -1 for padding and for paragraphs cut away.
      paragraph_labels: int32 `[n, P]`, 1 when the paragraph's title is a
        supporting fact's, 0 when not; -1 for padding, paragraphs cut away,
        and examples without supporting facts.

    Metadata: ids; titles (per example, every paragraph's title in context
    order, cut or not); truncated (examples that lost a unit).
    """

    input_ids: np.ndarray
    padding_mask: np.ndarray
    global_mask: np.ndarray
    paragraph_positions: np.ndarray
    paragraph_labels: np.ndarray
    ids: tuple[str, ...]
    titles: tuple[tuple[str, ...], ...]
    truncated: int

    def __len__(self) -> int:
        return len(self.ids)

    def arrays(self) -> dict[str, np.ndarray]:
        """The feature table (every array with one row per example)."""
        return {k: getattr(self, k) for k in ("input_ids", "padding_mask", "global_mask", "paragraph_positions",
                                              "paragraph_labels")}


def build_selector_features(examples: Sequence[HotpotExample], tokenizer, *, seq_len: int,
                            max_question_tokens: int | None = None, max_paragraphs: int = 10) -> SelectorFeatures:
    """Stage 1's input of every example: all its paragraphs (see the module docstring and `SelectorFeatures`).

    Args:
      tokenizer: a `tokenizers.Tokenizer` with `<s>`, `</s>`, `<pad>` and `TASK_TOKENS`.

    Raises:
      ValueError naming the example when it has more than `max_paragraphs`
      paragraphs or its question leaves no room; naming the tokenizer when it
      lacks a token.
    """
    _check_options(examples, seq_len, max_question_tokens)
    if max_paragraphs < 1:
        raise ValueError(f"max_paragraphs: expected >= 1, got {max_paragraphs}")
    vocab, text = _vocab(tokenizer)
    n = len(examples)
    input_ids = np.full((n, seq_len), vocab.pad, np.int32)
    padding_mask, global_mask = np.zeros((n, seq_len), bool), np.zeros((n, seq_len), bool)
    positions = np.full((n, max_paragraphs), -1, np.int32)
    labels = np.full((n, max_paragraphs), -1, np.int32)
    truncated = 0
    for row, example in enumerate(examples):
        where = f"examples[{row}] ({example.id})"
        if len(example.context) > max_paragraphs:
            raise ValueError(f"{where}: has {len(example.context)} paragraphs; raise data.max_paragraphs "
                             f"(now {max_paragraphs})")
        layout = _layout(example, range(len(example.context)), vocab, text, seq_len=seq_len,
                         max_question_tokens=max_question_tokens, where=where)
        _fill(row, layout, input_ids, padding_mask, global_mask)
        truncated += layout.truncated
        gold = gold_titles(example)
        for p, position in layout.title_positions.items():
            positions[row, p] = position
            if gold is not None:
                labels[row, p] = example.context[p][0] in gold
    if truncated:
        log.warning("HotpotQA stage 1: %d of %d examples cut to seq_len=%d", truncated, n, seq_len)
    return SelectorFeatures(input_ids, padding_mask, global_mask, positions, labels, tuple(e.id for e in examples),
                            tuple(tuple(title for title, _ in e.context) for e in examples), truncated)


def paragraph_ranking(features: SelectorFeatures, i: int, scores) -> list[tuple[str, float]]:
    """Row `i`'s paragraphs stage 1 saw, as `(title, score)` best first (ties in context order).

    Args:
      scores: float `[max_paragraphs]`, the selector's score of each paragraph slot.
    """
    scores = np.asarray(scores)
    if scores.shape != features.paragraph_positions.shape[1:]:
        raise ValueError(f"scores: expected shape {features.paragraph_positions.shape[1:]}, got {scores.shape}")
    seen = np.flatnonzero(features.paragraph_positions[i] >= 0)
    order = seen[np.argsort(-scores[seen], kind="stable")]
    return [(features.titles[i][p], float(scores[p])) for p in order]


# ---------------------------------------------------------------- stage 2: answer and supporting facts


@dataclasses.dataclass(frozen=True)
class AnswerFeatures:
    """Stage-2 features, one row per example (S = max_sentences, K = max_answer_spans).

    Arrays:
      input_ids: int32 `[n, seq_len]`, the layout over the selected paragraphs.
      padding_mask, global_mask: bool `[n, seq_len]`.
      context_mask: bool `[n, seq_len]`, the sentence tokens with a non-empty
        character span: where an answer may start and end.
      answer_starts, answer_ends: int32 `[n, K]`, first and last (inclusive)
        token of each distinct occurrence of a span answer, in input order; -1 after.
      answer_type: int32 `[n]`, 0 span, 1 yes, 2 no, -1 unknown.
      sentence_positions: int32 `[n, S]`, each kept sentence's `[s]`, in input order; -1 after.
      sentence_labels: int32 `[n, S]`, 1 supporting fact, 0 not; -1 padding and unknown.
      token_char_spans: int32 `[n, seq_len, 2]`, each sentence token's
        characters in the row's context string; -1 elsewhere (decoding only,
        not in `arrays()`).

    Metadata: ids; paragraphs (the context indices laid out); sentence_keys
    (per row, `(title, sentence index)` of each sentence slot); contexts (the
    kept sentences concatenated in input order); truncated (rows that lost a
    unit), unanswerable (span answers with no occurrence kept), overflow
    (occurrences beyond K).
    """

    input_ids: np.ndarray
    padding_mask: np.ndarray
    global_mask: np.ndarray
    context_mask: np.ndarray
    answer_starts: np.ndarray
    answer_ends: np.ndarray
    answer_type: np.ndarray
    sentence_positions: np.ndarray
    sentence_labels: np.ndarray
    token_char_spans: np.ndarray
    ids: tuple[str, ...]
    paragraphs: tuple[tuple[int, ...], ...]
    sentence_keys: tuple[tuple[tuple[str, int], ...], ...]
    contexts: tuple[str, ...]
    truncated: int
    unanswerable: int
    overflow: int

    def __len__(self) -> int:
        return len(self.ids)

    def arrays(self) -> dict[str, np.ndarray]:
        """The feature table (every array with one row per example)."""
        return {k: getattr(self, k) for k in ("input_ids", "padding_mask", "global_mask", "context_mask",
                                              "answer_starts", "answer_ends", "answer_type", "sentence_positions",
                                              "sentence_labels")}


def answer_type_of(answer: str | None) -> int:
    """0 span, 1 yes, 2 no (the answer lowercased and stripped), -1 for None."""
    if answer is None:
        return -1
    normal = answer.strip().lower()
    return ANSWER_TYPES.index(normal) if normal in ("yes", "no") else 0


def _token_spans(offsets: np.ndarray, occurrences: list[tuple[int, int]], where: str) -> list[tuple[int, int]]:
    """The first and last non-empty token (indices into `offsets`) covering each `[start, end)`."""
    nonempty = np.flatnonzero(offsets[:, 1] > offsets[:, 0])
    chars = np.asarray(occurrences, np.int64).reshape(-1, 2)
    first = np.searchsorted(offsets[nonempty, 1], chars[:, 0], side="right")  # first token ending after the start
    last = np.searchsorted(offsets[nonempty, 0], chars[:, 1], side="left") - 1  # last token starting before the end
    bad = (first >= len(nonempty)) | (last < first)
    if np.any(bad):
        start, end = chars[np.argmax(bad)]
        raise ValueError(f"{where}: no token covers characters [{start}, {end})")
    return list(zip(nonempty[first].tolist(), nonempty[last].tolist()))


def build_answer_features(examples: Sequence[HotpotExample], tokenizer, *, seq_len: int,
                          selections: Mapping[str, Sequence[int]], max_question_tokens: int | None = None,
                          max_sentences: int = 64, max_answer_spans: int = 64,
                          word_boundaries: bool = True) -> AnswerFeatures:
    """Stage 2's input of every example over its selected paragraphs (see the module docstring and `AnswerFeatures`).

    Args:
      selections: `{_id: context indices}`, laid out in the order given
        (`hotpotqa_selection.select_paragraphs` gives context order).
      word_boundaries: passed to `find_occurrences`.

    Raises:
      ValueError naming the example when `selections` lacks it or holds
      indices that are out of range, repeated or none, when it keeps more than
      `max_sentences` sentences, or its question leaves no room.
    """
    _check_options(examples, seq_len, max_question_tokens)
    if max_sentences < 1 or max_answer_spans < 1:
        raise ValueError(f"max_sentences and max_answer_spans: expected >= 1, got {max_sentences} and "
                         f"{max_answer_spans}")
    vocab, text = _vocab(tokenizer)
    n = len(examples)
    input_ids = np.full((n, seq_len), vocab.pad, np.int32)
    padding_mask, global_mask, context_mask = (np.zeros((n, seq_len), bool) for _ in range(3))
    starts, ends = np.full((n, max_answer_spans), -1, np.int32), np.full((n, max_answer_spans), -1, np.int32)
    answer_type = np.full((n,), -1, np.int32)
    positions = np.full((n, max_sentences), -1, np.int32)
    labels = np.full((n, max_sentences), -1, np.int32)
    char_spans = np.full((n, seq_len, 2), -1, np.int32)
    paragraphs, keys, contexts = [], [], []
    truncated = unanswerable = overflow = 0
    for row, example in enumerate(examples):
        where = f"examples[{row}] ({example.id})"
        if example.id not in selections:
            raise ValueError(f"selections: no entry for example {example.id!r}")
        chosen = [int(p) for p in selections[example.id]]
        if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= p < len(example.context) for p in chosen):
            raise ValueError(f"{where}: selections: expected distinct context indices in [0, "
                             f"{len(example.context)}), at least one, got {list(selections[example.id])}")
        layout = _layout(example, chosen, vocab, text, seq_len=seq_len, max_question_tokens=max_question_tokens,
                         where=where)
        if len(layout.sentences) > max_sentences:
            raise ValueError(f"{where}: keeps {len(layout.sentences)} sentences; raise data.max_sentences "
                             f"(now {max_sentences})")
        _fill(row, layout, input_ids, padding_mask, global_mask)
        truncated += layout.truncated
        answer_type[row] = answer_type_of(example.answer)
        facts = None if example.supporting_facts is None else set(example.supporting_facts)
        pieces, base, answers = [], 0, {}  # answers: an ordered set of (start, end) token pairs
        for j, sentence in enumerate(layout.sentences):
            title, sentences = example.context[sentence.paragraph]
            string = sentences[sentence.index]
            positions[row, j] = sentence.marker
            if facts is not None:
                labels[row, j] = (title, sentence.index) in facts
            tokens = slice(sentence.first, sentence.marker)
            char_spans[row, tokens] = sentence.offsets + base
            context_mask[row, tokens] = sentence.offsets[:, 1] > sentence.offsets[:, 0]
            if answer_type[row] == 0:
                occurrences = find_occurrences(string, [example.answer], word_boundaries=word_boundaries)
                sentence_where = f"{where}: sentence {sentence.index} of {title!r}"
                for first, last in _token_spans(sentence.offsets, occurrences, sentence_where):
                    answers.setdefault((sentence.first + first, sentence.first + last), None)
            pieces.append(string)
            base += len(string)
        answers = list(answers)
        stored = answers[:max_answer_spans]
        if stored:
            starts[row, : len(stored)], ends[row, : len(stored)] = zip(*stored)
        unanswerable += bool(answer_type[row] == 0 and not answers)
        overflow += len(answers) - len(stored)
        paragraphs.append(tuple(chosen))
        keys.append(tuple((example.context[s.paragraph][0], s.index) for s in layout.sentences))
        contexts.append("".join(pieces))
    if truncated:
        log.warning("HotpotQA stage 2: %d of %d examples cut to seq_len=%d", truncated, n, seq_len)
    if unanswerable:
        log.warning("HotpotQA stage 2: %d of %d examples have a span answer that occurs nowhere in the kept "
                    "sentences (no span target)", unanswerable, n)
    if overflow:
        log.warning("HotpotQA stage 2: %d answer occurrences beyond data.max_answer_spans=%d dropped",
                    overflow, max_answer_spans)
    return AnswerFeatures(input_ids, padding_mask, global_mask, context_mask, starts, ends, answer_type, positions,
                          labels, char_spans, tuple(e.id for e in examples), tuple(paragraphs), tuple(keys),
                          tuple(contexts), truncated, unanswerable, overflow)


# ---------------------------------------------------------------- decoding


def answer_text(features: AnswerFeatures, i: int, start_token: int, end_token: int) -> str:
    """The original text of row `i`'s tokens `start_token..end_token` (inclusive), cut from its context string.

    Raises:
      ValueError when a token is not a sentence token (offset -1) or the span is reversed.
    """
    if not 0 <= i < len(features):
        raise ValueError(f"i: expected 0 <= i < {len(features)}, got {i}")
    spans = features.token_char_spans[i]
    for name, token in (("start_token", start_token), ("end_token", end_token)):
        if not 0 <= token < len(spans) or spans[token, 0] < 0:
            raise ValueError(f"{name}: {token} of example {features.ids[i]!r} is not a sentence token")
    if end_token < start_token:
        raise ValueError(f"end_token {end_token} is before start_token {start_token}")
    return features.contexts[i][spans[start_token, 0] : spans[end_token, 1]]


def supporting_facts_of(features: AnswerFeatures, i: int, sentence_probabilities,
                        threshold: float = 0.5) -> list[list]:
    """`[[title, sentence index], ...]` of row `i`'s sentence slots whose probability is above `threshold`.

    Args:
      sentence_probabilities: float `[max_sentences]`; slots past the kept sentences are ignored.
    """
    probabilities = np.asarray(sentence_probabilities)
    if probabilities.shape != features.sentence_positions.shape[1:]:
        raise ValueError(f"sentence_probabilities: expected shape {features.sentence_positions.shape[1:]}, "
                         f"got {probabilities.shape}")
    return [[title, index] for j, (title, index) in enumerate(features.sentence_keys[i])
            if probabilities[j] > threshold]
