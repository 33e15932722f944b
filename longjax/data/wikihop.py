"""WikiHop (qangaroo) for a long encoder: the reader, the paper's input with task tokens, chunking, accuracy.

Input of one example, as in the Longformer paper: a prefix
`<s> [q] question [/q] [ent] candidate_1 [/ent] ... [ent] candidate_k [/ent] </s>`
(the question is the query with its relation's underscores made spaces),
then every support followed by `</s>`. When prefix and supports exceed
`seq_len`, the supports are cut into consecutive slices of `seq_len - prefix`
tokens and every chunk is the prefix followed by its slice, so every support
token is in exactly one chunk and every chunk holds the question and all
candidates. Global attention: every prefix token before its `</s>` (`<s>`,
the question, the candidates and their markers). A candidate is read at its
`[ent]` token, which sits at the same position in every chunk.
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

TASK_TOKENS = ("[q]", "[/q]", "[ent]", "[/ent]")


@dataclasses.dataclass(frozen=True)
class WikiHopExample:
    """One question: its candidates, supporting documents and the answer's index (None when unknown)."""

    id: str
    query: str
    candidates: tuple[str, ...]
    supports: tuple[str, ...]
    label: int | None


@dataclasses.dataclass
class Features:
    """Arrays over n examples; `chunks` `[n]` counts each example's chunks, `truncated` the examples cut short.

    input_ids int32, padding_mask and global_mask bool: `[n, max_chunks, seq_len]`;
    chunk_mask bool `[n, max_chunks]`; candidate_positions int32 and
    candidate_mask bool `[n, max_candidates]`; labels int32 `[n]` (-1 unknown).
    """

    input_ids: np.ndarray
    padding_mask: np.ndarray
    global_mask: np.ndarray
    chunk_mask: np.ndarray
    candidate_positions: np.ndarray
    candidate_mask: np.ndarray
    labels: np.ndarray
    chunks: np.ndarray
    truncated: int

    def arrays(self) -> dict[str, np.ndarray]:
        """The feature table (every array with one row per example)."""
        return {k: getattr(self, k) for k in ("input_ids", "padding_mask", "global_mask", "chunk_mask",
                                              "candidate_positions", "candidate_mask", "labels")}


def read_qangaroo(path: str | os.PathLike, *, skip_malformed: bool = False) -> list[WikiHopExample]:
    """The examples of a qangaroo WikiHop file (a JSON list of {id, query, answer?, candidates, supports}).

    Raises:
      FileNotFoundError naming the file; ValueError naming the file and the
      0-based record index of a malformed record (unless `skip_malformed`:
      skipped, and the count logged).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a qangaroo WikiHop JSON file)")
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of examples, got {type(records).__name__}")
    examples, skipped = [], 0
    for index, record in enumerate(records):
        try:
            examples.append(_example(record))
        except ValueError as e:
            if not skip_malformed:
                raise ValueError(f"{path}: record {index} is malformed: {e}") from None
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d malformed records", path, skipped)
    return examples


def _example(record) -> WikiHopExample:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ("id", "query", "candidates", "supports") if k not in record]
    if missing:
        raise ValueError(f"missing {missing}")
    for key in ("candidates", "supports"):
        value = record[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
            raise ValueError(f"{key} must be a non-empty list of strings")
    if not isinstance(record["query"], str):
        raise ValueError("query must be a string")
    label = None
    if "answer" in record:
        if record["answer"] not in record["candidates"]:
            raise ValueError(f"answer {record['answer']!r} is not among the candidates")
        label = record["candidates"].index(record["answer"])
    return WikiHopExample(str(record["id"]), record["query"], tuple(record["candidates"]),
                          tuple(record["supports"]), label)


def question_text(query: str) -> str:
    """The query as the question: 'located_in_the_administrative_territorial_entity x' -> words."""
    return query.replace("_", " ")


def _ids(tokenizer, token: str) -> int:
    index = tokenizer.token_to_id(token)
    if index is None:
        raise ValueError(
            f"the tokenizer has no {token!r}: add the task tokens first (longjax.hf.tokenizer.add_task_tokens)"
        )
    return index


def build_features(examples: Sequence[WikiHopExample], tokenizer, *, seq_len: int, max_chunks: int,
                   max_candidates: int, truncate: bool = False) -> Features:
    """The chunked input of every example (see the module docstring and `Features`).

    Raises:
      ValueError naming the example and the field to raise when its prefix
      does not fit `seq_len`, it has more than `max_candidates` candidates, or
      it needs more than `max_chunks` chunks (unless `truncate`: the chunks
      past `max_chunks` are dropped and the examples cut are counted and logged).
    """
    q, q_end, ent, ent_end = (_ids(tokenizer, t) for t in TASK_TOKENS)
    bos, eos, pad = (_ids(tokenizer, t) for t in ("<s>", "</s>", "<pad>"))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    n = len(examples)
    shape = (n, max_chunks, seq_len)
    input_ids = np.full(shape, pad, np.int32)
    padding = np.zeros(shape, bool)
    glob = np.zeros(shape, bool)
    chunk_mask = np.zeros((n, max_chunks), bool)
    positions = np.full((n, max_candidates), -1, np.int32)
    candidate_mask = np.zeros((n, max_candidates), bool)
    labels = np.full((n,), -1, np.int32)
    chunks = np.zeros((n,), np.int32)
    truncated = 0
    for i, example in enumerate(examples):
        if len(example.candidates) > max_candidates:
            raise ValueError(f"example {example.id!r} has {len(example.candidates)} candidates; raise "
                             f"data.max_candidates (now {max_candidates})")
        prefix = [bos, q, *encode(question_text(example.query)), q_end]
        for k, candidate in enumerate(example.candidates):
            positions[i, k] = len(prefix)
            prefix += [ent, *encode(candidate), ent_end]
        prefix.append(eos)
        body = seq_len - len(prefix)
        if body < 1:
            raise ValueError(f"example {example.id!r}: question and candidates take {len(prefix)} tokens, leaving "
                             f"no room for the supports in seq_len={seq_len}")
        supports = [t for s in example.supports for t in (*encode(s), eos)]
        needed = max(1, -(-len(supports) // body))
        if needed > max_chunks:
            if not truncate:
                raise ValueError(f"example {example.id!r} needs {needed} chunks of {seq_len} tokens; raise "
                                 f"data.max_chunks (now {max_chunks}) or set data.truncate")
            truncated += 1
            needed = max_chunks
        for c in range(needed):
            row = prefix + supports[c * body:(c + 1) * body]
            input_ids[i, c, :len(row)] = row
            padding[i, c, :len(row)] = True
            glob[i, c, :len(prefix) - 1] = True
        chunk_mask[i, :needed] = True
        candidate_mask[i, :len(example.candidates)] = True
        chunks[i] = needed
        if example.label is not None:
            labels[i] = example.label
    if truncated:
        log.warning("WikiHop: %d of %d examples cut to data.max_chunks=%d chunks", truncated, n, max_chunks)
    return Features(input_ids, padding, glob, chunk_mask, positions, candidate_mask, labels, chunks, truncated)


def accuracy(scores, candidate_mask, labels) -> float:
    """The fraction of examples whose best valid candidate (argmax of `scores` `[n, K]`) is the label."""
    scores, mask, labels = np.asarray(scores), np.asarray(candidate_mask, bool), np.asarray(labels)
    if scores.shape != mask.shape or scores.shape[:1] != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape}, candidate_mask {mask.shape} and labels {labels.shape} disagree")
    if not len(labels):
        raise ValueError("accuracy of no example")
    best = np.where(mask, scores, -np.inf).argmax(-1)
    return float(np.mean(best == labels))
