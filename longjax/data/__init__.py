"""Data for longjax: character corpora (enwik8, text8, the embedded demo corpus) and their pipelines."""

from longjax.data.corpora import CORPORA, DATA_DIR_ENV, EMBEDDED_CORPUS, CorpusSpec, load_corpus, resolve_data_dir
from longjax.data.corpus import (
    SPLITS,
    Corpus,
    CorpusChecksumError,
    CorpusError,
    CorpusNotFoundError,
    DataError,
)
from longjax.data.embedded import load_embedded_corpus
from longjax.data.pipeline import TrainIterator, make_train_iterator, window_starts

__all__ = [
    "CORPORA",
    "DATA_DIR_ENV",
    "EMBEDDED_CORPUS",
    "Corpus",
    "CorpusChecksumError",
    "CorpusError",
    "CorpusNotFoundError",
    "CorpusSpec",
    "DataError",
    "SPLITS",
    "TrainIterator",
    "load_corpus",
    "load_embedded_corpus",
    "make_train_iterator",
    "resolve_data_dir",
    "window_starts",
]
