"""The demo corpus: text every Python installation carries, so the demo needs no download.

The text is the standard library's documentation topics (`pydoc_data.topics`,
what `help('FOR')` prints): every topic in sorted key order, each as its key on
one line followed by its text, UTF-8, byte-level (vocabulary 256, like enwik8).
About 0.5 MB, split in file order 90/5/5 into train, validation and test.

The topics come with the interpreter, so the corpus differs slightly between
Python versions (3.11: 466,117 bytes; 3.12: 493,344). `Corpus.fingerprint`
names the exact text; record it with a run to compare like with like.
Nothing from this text is committed to the repository.
"""

from __future__ import annotations

import importlib

from longjax.data.corpus import Corpus, CorpusError, make_corpus

NAME = "pydoc_topics"

# Fractions of the text in train and validation; test is the rest.
SPLIT_FRACTIONS = (0.9, 0.05)


def embedded_text() -> bytes:
    """The corpus as bytes, in a deterministic order."""
    try:
        topics = importlib.import_module("pydoc_data.topics").topics
    except ImportError as e:
        raise CorpusError(
            "the embedded corpus needs the standard library's pydoc_data.topics, which this Python "
            "installation lacks (some distributions split it out of the minimal package); install "
            "the full standard library, or use enwik8/text8"
        ) from e
    return "".join(f"{key}\n{topics[key].strip()}\n\n" for key in sorted(topics)).encode("utf-8")


def load_embedded_corpus() -> Corpus:
    """The pydoc topics as a byte-level `Corpus` (vocabulary 256) with 90/5/5 splits `[chars]`."""
    text = embedded_text()
    train = int(len(text) * SPLIT_FRACTIONS[0])
    validation = int(len(text) * SPLIT_FRACTIONS[1])
    splits = (train, validation, len(text) - train - validation)
    return make_corpus(NAME, text, splits, bytes(range(256)), source="pydoc_data.topics")
