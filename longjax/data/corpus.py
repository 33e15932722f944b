"""A character corpus in memory, and the errors of reading one: what every corpus loader builds on."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

SPLITS = ("train", "validation", "test")


class DataError(RuntimeError):
    """A task's data is missing or is not what it must be; the message says which file and what to do."""


class CorpusError(DataError):
    """A corpus file is unusable: wrong length, wrong digest, foreign bytes, broken zip."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """The corpus is not in the data directory and could not be downloaded."""


class CorpusChecksumError(CorpusError):
    """A downloaded archive does not match its published size or digest."""


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A character corpus in memory, as token ids, split in file order.

    Attributes:
      name: 'enwik8', 'text8' or the embedded corpus' name.
      train, validation, test: read-only uint8 token ids `[chars]`, views of one array.
      alphabet: the decode table; token id i is the byte `alphabet[i]`.
      fingerprint: SHA-1 (hex) of the corpus as stored, to record which text a run used.
    """

    name: str
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    alphabet: bytes
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def split(self, name: str) -> np.ndarray:
        """The token ids `[chars]` of split `name`: 'train', 'validation' or 'test'."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def decode(self, tokens) -> str:
        """Text of token ids `[chars]` (UTF-8, undecodable bytes replaced: enwik8 windows cut characters)."""
        ids = np.asarray(tokens)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        table = np.frombuffer(self.alphabet, np.uint8)
        return table[ids].tobytes().decode("utf-8", errors="replace")


def make_corpus(
    name: str, text: bytes, splits: tuple[int, int, int], alphabet: bytes, *, source: str
) -> Corpus:
    """Encodes `text` with `alphabet` and splits it in file order; `source` names it in errors."""
    if len(text) != sum(splits):
        raise CorpusError(
            f"{source} holds {len(text):,} characters, expected {sum(splits):,}: "
            f"it is truncated or not the distributed {name}"
        )
    raw = np.frombuffer(text, np.uint8)
    if alphabet == bytes(range(256)):
        ids = raw
    else:
        lookup = np.full(256, 255, np.uint8)
        lookup[np.frombuffer(alphabet, np.uint8)] = np.arange(len(alphabet), dtype=np.uint8)
        ids = lookup[raw]
        foreign = np.flatnonzero(ids == 255)
        if foreign.size:
            at = int(foreign[0])
            raise CorpusError(
                f"{source} has byte {text[at:at + 1]!r} at offset {at:,}, outside the {name} "
                f"alphabet {alphabet!r} ({foreign.size:,} such bytes in all)"
            )
    ids.setflags(write=False)
    train, validation, _ = np.cumsum(splits)
    parts = np.split(ids, [train, validation])
    return Corpus(name, *parts, alphabet=alphabet, fingerprint=hashlib.sha1(text).hexdigest())


