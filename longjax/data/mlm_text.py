"""Masked-LM pretraining text: documents from a directory, packed into blocks, masked as RoBERTa masks them.

* Documents: every `*.txt` file of a directory is one document, every line
  of a `*.jsonl` file one document (its `text` field); files in name order.
* Packing (RoBERTa's full sentences): each document as `<s> tokens </s>`,
  concatenated and cut into blocks of exactly `block_len` tokens that run
  across document ends; the last partial block is dropped (and counted).
* Characters per token: token i of a document covers the characters from the
  end of the previous token to its own end (so spaces, which byte-level BPE
  folds into the next token, count once, and a multi-byte character split
  over tokens counts once); `<s>`/`</s>` cover none. A document's tokens sum to
  its length up to its last token's end: bits per character is the masked
  tokens' loss in bits over the characters they cover.
* Masking (BERT/RoBERTa): per row, `int(mask_prob * candidates + u)` of the
  non-special tokens with u uniform in [0, 1) (fairseq's randomised rounding),
  chosen without replacement; of those, 80% become `<mask>`, 10% a random
  non-special token, 10% stay.
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


@dataclasses.dataclass(frozen=True)
class Document:
    """One document and where it came from ('file.txt' or 'file.jsonl:line')."""

    source: str
    text: str


@dataclasses.dataclass(frozen=True)
class Packed:
    """Blocks of tokens: `tokens` int32 `[blocks, block_len]`, `token_chars` float32 like it; `dropped` tokens."""

    tokens: np.ndarray
    token_chars: np.ndarray
    dropped: int


def read_documents(directory: str | os.PathLike) -> list[Document]:
    """The documents of a directory's `*.txt` and `*.jsonl` files (not recursive), in file-name order.

    Raises:
      FileNotFoundError: no such directory, or no such file in it.
      ValueError: a JSON line that is not an object with a string `text`, naming the file and line.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (expected *.txt or *.jsonl documents in it)")
    files = sorted(p for p in root.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
    if not files:
        raise FileNotFoundError(f"{root}: holds no *.txt or *.jsonl document file")
    documents, empty = [], 0
    for path in files:
        if path.suffix == ".txt":
            pieces = [(path.name, path.read_text(encoding="utf-8"))]
        else:
            pieces = []
            with path.open(encoding="utf-8") as f:
                for index, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {index} is not JSON ({e})") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError(f"{path}: line {index} must be an object with a string 'text' field")
                    pieces.append((f"{path.name}:{index}", record["text"]))
        for source, text in pieces:
            if text.strip():
                documents.append(Document(source, text))
            else:
                empty += 1
    if empty:
        log.warning("%s: skipped %d empty documents", root, empty)
    return documents


def token_characters(offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Characters each token covers: from the previous token's end to its own (float32 `[tokens]`)."""
    chars = np.zeros(len(offsets), np.float32)
    covered = 0
    for i, (_, end) in enumerate(offsets):
        if end > covered:
            chars[i] = end - covered
            covered = end
    return chars


def pack_documents(token_ids: Sequence[np.ndarray], token_chars: Sequence[np.ndarray], block_len: int, *,
                   bos_id: int, eos_id: int) -> Packed:
    """`<s> doc </s>` of every document, concatenated and cut into blocks of `block_len` (see the module docstring)."""
    if block_len < 1:
        raise ValueError(f"block_len must be positive, got {block_len}")
    if len(token_ids) != len(token_chars):
        raise ValueError(f"token_ids ({len(token_ids)}) and token_chars ({len(token_chars)}) must pair up")
    ids, chars = [], []
    for doc_ids, doc_chars in zip(token_ids, token_chars):
        if len(doc_ids) != len(doc_chars):
            raise ValueError("every document needs one character count per token")
        ids += [np.array([bos_id]), np.asarray(doc_ids), np.array([eos_id])]
        chars += [np.zeros(1), np.asarray(doc_chars), np.zeros(1)]
    stream = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
    stream_chars = np.concatenate(chars).astype(np.float32) if chars else np.zeros(0, np.float32)
    blocks = len(stream) // block_len
    used = blocks * block_len
    return Packed(stream[:used].reshape(blocks, block_len), stream_chars[:used].reshape(blocks, block_len),
                  int(len(stream) - used))


def pack_documents_with_tokenizer(documents: Sequence[Document], tokenizer, block_len: int, *, bos_id: int,
                                  eos_id: int) -> Packed:
    """Tokenises the documents (offsets give the characters per token) and packs them."""
    encodings = tokenizer.encode_batch([d.text for d in documents], add_special_tokens=False)
    packed = pack_documents(
        [np.asarray(e.ids) for e in encodings], [token_characters(e.offsets) for e in encodings], block_len,
        bos_id=bos_id, eos_id=eos_id,
    )
    if packed.dropped:
        log.info("packing into blocks of %d dropped the last %d tokens", block_len, packed.dropped)
    return packed


def mask_tokens(tokens, rng: np.random.Generator, *, mask_id: int, vocab_size: int, special_ids: Sequence[int],
                mask_prob: float = 0.15, replace_prob: float = 0.8, random_prob: float = 0.1
                ) -> tuple[np.ndarray, np.ndarray]:
    """RoBERTa's masking of int `[n, len]` tokens (see the module docstring).

    Returns:
      (inputs, targets): int32 `[n, len]`; targets hold the original token where
      it was chosen and -1 elsewhere.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n, len], got shape {tokens.shape}")
    if not (0 < mask_prob < 1 and replace_prob >= 0 and random_prob >= 0 and replace_prob + random_prob <= 1):
        raise ValueError(f"bad probabilities: mask_prob={mask_prob}, replace_prob={replace_prob}, "
                         f"random_prob={random_prob}")
    special = np.asarray(sorted(set(int(i) for i in special_ids)))
    ordinary = np.setdiff1d(np.arange(vocab_size), special)
    inputs = tokens.astype(np.int32).copy()
    targets = np.full(tokens.shape, -1, np.int32)
    for row in range(tokens.shape[0]):
        candidates = np.flatnonzero(~np.isin(tokens[row], special))
        count = min(int(mask_prob * len(candidates) + rng.random()), len(candidates))
        chosen = rng.choice(candidates, size=count, replace=False)
        targets[row, chosen] = tokens[row, chosen]
        u = rng.random(count)
        masked = chosen[u < replace_prob]
        randomised = chosen[(u >= replace_prob) & (u < replace_prob + random_prob)]
        inputs[row, masked] = mask_id
        inputs[row, randomised] = rng.choice(ordinary, size=len(randomised))
    return inputs, targets
