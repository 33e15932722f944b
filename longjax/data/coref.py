"""OntoNotes coreference for a long encoder: the reader of the standard JSON lines, whole-document features, clusters.

The input is what Joshi et al.'s `minimize.py` writes, one document per line:
`doc_key` (its first two letters the OntoNotes genre, e.g. "nw/wsj/..."),
`sentences` (lists of subtoken strings), `speakers` (one list per sentence,
one speaker per subtoken), `clusters` (lists of `[start, end]` inclusive
subtoken spans over the flattened document), `sentence_map` (each subtoken's
sentence), `subtoken_map` (each subtoken's word).

A document is one encoder input, not 512-token segments: its subtokens are
looked up in the tokenizer's vocabulary as they are (so preprocess with the
encoder's own tokenizer, RoBERTa's BPE for Longformer, and with a segment
length of at least the document, so the preprocessing adds `<s>`/`</s>` once),
padded to `seq_len`. Joshi et al.'s stock `minimize.py` writes BERT word
pieces with `[CLS]`/`[SEP]`: run it with the RoBERTa tokenizer instead (its
`tokenizer` swapped for RoBERTa's, the segment markers `<s>`/`</s>`), as
Longformer's coreference experiments did; a subtoken the vocabulary lacks is
an error naming it. A document longer than `seq_len` is an error unless
`truncate`: then its first `seq_len` subtokens are kept and the gold mentions
past them dropped, with a cluster the cut leaves with a single mention (all
counted and logged). A mention in two clusters, or a decreasing
`sentence_map`, is an error. Spans are scored in subtoken indices, as Joshi
et al.'s evaluator scores them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# OntoNotes' genres, the first two letters of a doc_key (broadcast conversation, broadcast news, magazine,
# newswire, pivot text (the Bible), telephone conversation, web), in Joshi et al.'s order.
ONTONOTES_GENRES = ("bc", "bn", "mz", "nw", "pt", "tc", "wb")

Span = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class CorefDocument:
    """One document: flattened subtokens and their sentence, speaker and word; gold clusters of (start, end) spans."""

    doc_key: str
    subtokens: tuple[str, ...]
    sentence_map: tuple[int, ...]
    subtoken_map: tuple[int, ...]
    speakers: tuple[str, ...]
    clusters: tuple[tuple[Span, ...], ...]


def _flat(record, key: str, where: str) -> list:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(part, list) for part in value):
        raise ValueError(f"{where}: '{key}' must be a list of per-sentence lists, got {type(value).__name__}")
    return [item for part in value for item in part]


def _document(record, where: str) -> CorefDocument:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    doc_key = record.get("doc_key")
    if not isinstance(doc_key, str) or not doc_key:
        raise ValueError(f"{where}: 'doc_key' must be a non-empty string, got {doc_key!r}")
    where = f"{where} ({doc_key})"
    subtokens = _flat(record, "sentences", where)
    speakers = _flat(record, "speakers", where)
    n = len(subtokens)
    if not n or not all(isinstance(t, str) for t in subtokens):
        raise ValueError(f"{where}: 'sentences' must hold subtoken strings, at least one")
    maps = {}
    for key in ("sentence_map", "subtoken_map"):
        value = record.get(key)
        if not isinstance(value, list) or len(value) != n or not all(isinstance(v, int) for v in value):
            raise ValueError(f"{where}: '{key}' must be {n} ints (one per subtoken), got "
                             f"{len(value) if isinstance(value, list) else type(value).__name__}")
        maps[key] = tuple(value)
    if len(speakers) != n:
        raise ValueError(f"{where}: 'speakers' holds {len(speakers)} entries for {n} subtokens")
    if any(b < a for a, b in zip(maps["sentence_map"], maps["sentence_map"][1:])):
        raise ValueError(f"{where}: 'sentence_map' must not decrease (a sentence's subtokens are contiguous)")
    clusters, cluster_of = [], {}
    raw_clusters = record.get("clusters")
    if not isinstance(raw_clusters, list):
        raise ValueError(f"{where}: 'clusters' must be a list of clusters, got {type(raw_clusters).__name__}")
    for c, cluster in enumerate(raw_clusters):
        spans = []
        for mention in cluster if isinstance(cluster, list) else [None]:
            if not (isinstance(mention, list) and len(mention) == 2 and all(isinstance(i, int) for i in mention)
                    and 0 <= mention[0] <= mention[1] < n):
                raise ValueError(f"{where}: clusters[{c}] holds {mention!r}; expected [start, end] with "
                                 f"0 <= start <= end < {n}")
            span = (mention[0], mention[1])
            if span in cluster_of:
                raise ValueError(f"{where}: mention {list(span)} is in clusters {cluster_of[span]} and {c}; "
                                 "a mention belongs to one cluster")
            cluster_of[span] = c
            spans.append(span)
        if not spans:
            raise ValueError(f"{where}: clusters[{c}] is empty")
        clusters.append(tuple(spans))
    return CorefDocument(doc_key, tuple(subtokens), maps["sentence_map"], maps["subtoken_map"],
                         tuple(str(s) for s in speakers), tuple(clusters))


def read_jsonlines(path: str | os.PathLike) -> list[CorefDocument]:
    """The documents of a `minimize.py` JSON-lines file (e.g. `dev.english.4096.jsonlines`).

    Raises:
      FileNotFoundError naming the path; ValueError naming the line, doc_key and field of a malformed record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no coreference file at {path}")
    documents = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from None
            documents.append(_document(record, f"{path}:{number}"))
    if not documents:
        raise ValueError(f"{path}: holds no document")
    return documents


def genre_index(doc_key: str, genres: Sequence[str]) -> int:
    """The index in `genres` of a doc_key's first two letters; ValueError naming both when it is not there."""
    prefix = doc_key[:2]
    if prefix not in genres:
        raise ValueError(f"document {doc_key!r}: genre {prefix!r} is not among data.genres {tuple(genres)}")
    return genres.index(prefix)


@dataclasses.dataclass
class Features:
    """One row per document.

    input_ids int32, padding_mask bool, sentence_map int32 (-1 padding),
    speaker_ids int32 (0 padding, then each speaker in order of first
    appearance): `[n, seq_len]`; genre int32 `[n]`; gold_starts, gold_ends
    int32 (-1 padding) and gold_clusters int32 (1-based, 0 padding) `[n, max_mentions]`.
    `clusters` holds each document's gold clusters after truncation (what it is scored against).
    """

    input_ids: np.ndarray
    padding_mask: np.ndarray
    sentence_map: np.ndarray
    speaker_ids: np.ndarray
    genre: np.ndarray
    gold_starts: np.ndarray
    gold_ends: np.ndarray
    gold_clusters: np.ndarray
    clusters: list[list[list[Span]]]
    truncated: int
    dropped_mentions: int
    too_wide_mentions: int

    def arrays(self) -> dict[str, np.ndarray]:
        """The feature table."""
        return {k: getattr(self, k) for k in ("input_ids", "padding_mask", "sentence_map", "speaker_ids", "genre",
                                              "gold_starts", "gold_ends", "gold_clusters")}


def build_features(documents: Sequence[CorefDocument], tokenizer, *, seq_len: int, max_mentions: int,
                   max_span_width: int, genres: Sequence[str] = ONTONOTES_GENRES, truncate: bool = False) -> Features:
    """The whole-document features of `documents` (see `Features` and the module docstring).

    Raises:
      ValueError naming the document when a subtoken is not in the tokenizer's
      vocabulary, its genre is unknown, it is longer than `seq_len` (unless
      `truncate`) or it has more gold mentions than `max_mentions`.
    """
    pad = tokenizer.token_to_id("<pad>")
    if pad is None:
        raise ValueError("the tokenizer has no '<pad>' token (a RoBERTa tokenizer is expected)")
    n = len(documents)
    input_ids = np.full((n, seq_len), pad, np.int32)
    padding = np.zeros((n, seq_len), bool)
    sentence_map = np.full((n, seq_len), -1, np.int32)
    speaker_ids = np.zeros((n, seq_len), np.int32)
    genre = np.zeros((n,), np.int32)
    gold_starts = np.full((n, max_mentions), -1, np.int32)
    gold_ends = np.full((n, max_mentions), -1, np.int32)
    gold_clusters = np.zeros((n, max_mentions), np.int32)
    kept_clusters, truncated, dropped, too_wide = [], 0, 0, 0
    vocab = tokenizer.get_vocab()
    for i, doc in enumerate(documents):
        genre[i] = genre_index(doc.doc_key, genres)
        length = len(doc.subtokens)
        if length > seq_len:
            if not truncate:
                raise ValueError(f"document {doc.doc_key!r} has {length} subtokens, more than seq_len={seq_len}: "
                                 "raise the phases' seq_len or set data.truncate")
            truncated += 1
            length = seq_len
        unknown = [t for t in doc.subtokens[:length] if t not in vocab]
        if unknown:
            raise ValueError(f"document {doc.doc_key!r}: subtoken {unknown[0]!r} is not in the tokenizer's vocabulary "
                             "(preprocess with the encoder's tokenizer)")
        input_ids[i, :length] = [vocab[t] for t in doc.subtokens[:length]]
        padding[i, :length] = True
        sentence_map[i, :length] = doc.sentence_map[:length]
        speaker_index: dict[str, int] = {}
        speaker_ids[i, :length] = [speaker_index.setdefault(s, len(speaker_index) + 1) for s in doc.speakers[:length]]
        clusters = []
        for cluster in doc.clusters:
            spans = [span for span in cluster if span[1] < length]
            # A cluster the cut leaves with one mention goes too: it would be a singleton, which
            # OntoNotes' gold never holds and the metrics would then count.
            kept = spans if len(spans) > 1 or len(spans) == len(cluster) else []
            dropped += len(cluster) - len(kept)
            if kept:
                clusters.append(kept)
        mentions = [(span, c + 1) for c, spans in enumerate(clusters) for span in spans]
        if len(mentions) > max_mentions:
            raise ValueError(f"document {doc.doc_key!r} has {len(mentions)} gold mentions; raise data.max_mentions "
                             f"(now {max_mentions})")
        too_wide += sum(1 for (s, e), _ in mentions if e - s + 1 > max_span_width)
        for m, ((start, end), cluster_id) in enumerate(mentions):
            gold_starts[i, m], gold_ends[i, m], gold_clusters[i, m] = start, end, cluster_id
        kept_clusters.append(clusters)
    if truncated:
        log.warning("coref: %d of %d documents cut to seq_len=%d subtokens; %d gold mentions dropped (past the cut, "
                    "or left alone in their cluster by it)", truncated, n, seq_len, dropped)
    if too_wide:
        log.warning("coref: %d gold mentions are wider than model.coref.max_span_width=%d and cannot be predicted",
                    too_wide, max_span_width)
    return Features(input_ids, padding, sentence_map, speaker_ids, genre, gold_starts, gold_ends, gold_clusters,
                    kept_clusters, truncated, dropped, too_wide)


def predicted_clusters(span_starts, span_ends, span_mask, antecedents, antecedent_scores) -> list[list[Span]]:
    """One document's clusters from the head's outputs (`longjax.models.coref.CorefHead`, one row, NumPy).

    Each kept span takes its best-scoring antecedent; the dummy (column 0)
    starts no link. Following the links in span order, a span joins its
    antecedent's cluster, or the two start one (Joshi et al.'s
    `get_predicted_clusters`), so no cluster is a singleton.
    """
    starts, ends = np.asarray(span_starts), np.asarray(span_ends)
    mask, antecedents, scores = np.asarray(span_mask, bool), np.asarray(antecedents), np.asarray(antecedent_scores)
    clusters: list[list[Span]] = []
    cluster_of: dict[Span, int] = {}
    for i in np.flatnonzero(mask):
        best = int(np.argmax(scores[i]))
        if best == 0:
            continue
        j = int(antecedents[i, best - 1])
        antecedent, mention = (int(starts[j]), int(ends[j])), (int(starts[i]), int(ends[i]))
        if antecedent not in cluster_of:
            cluster_of[antecedent] = len(clusters)
            clusters.append([antecedent])
        index = cluster_of[antecedent]
        if mention not in cluster_of:
            cluster_of[mention] = index
            clusters[index].append(mention)
    return clusters
