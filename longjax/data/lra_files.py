"""Readers of the released files of three Long Range Arena tasks: Text, Retrieval and Image.

Each `load_*` returns the same table shape, `{split: {"inputs": int32, "labels":
int32 [n]}}` for the splits 'train', 'validation' and 'test', with id 0 as padding.
Pure Python/NumPy; `tensorflow_datasets` (without TensorFlow) is imported only by
the tfds readers.

What LRA's own input pipelines (google-research/long-range-arena) do, and where we differ:

* Text (byte-level IMDB): the tfds `imdb_reviews` review bytes through tfds'
  `ByteTextEncoder` (id = byte + 1, 0 = padding, 257 ids), cut at the
  configured length (the paper's task is 4K; the repository's base config
  says 1,000). LRA has no validation split: it
  evaluates on the test set during training and reports test. Here 'validation'
  is an honest held-out part of train instead (see `load_text`); compare with
  LRA's numbers on 'test'.
* Retrieval (AAN pairs): `new_aan_pairs.{train,eval,test}.tsv`, tab-separated,
  no header, no quoting, columns label (read as a float, then cast to int32),
  id1, id2, text1, text2. Each text is cut at 10,000 bytes, byte-encoded as
  above, cut at the configured length (4,000). 'validation' is the eval file.
  LRA batches eval and test with `drop_remainder=True`, so its numbers leave
  out the last partial batch; here every pair is kept.
* Image (CIFAR-10): tfds `cifar10`, 'train[:90%]' train, 'train[90%:]'
  validation, 'test' test; `tf.image.rgb_to_grayscale` then a cast to int32,
  flattened row-major to 1,024 pixels. LRA feeds the pixel values 0..255 with a
  vocabulary of 256, and its encoder masks every id 0 as padding, black pixels
  included; here ids are pixel + 1 so that 0 is only padding, as in every
  other table, hence 257 ids.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from longjax.data import text_classification, tfds_prepared

SPLITS = ("train", "validation", "test")

TEXT_VOCAB_SIZE = 257
RETRIEVAL_VOCAB_SIZE = 257
IMAGE_VOCAB_SIZE = 257
TEXT_NUM_LABELS = 2
RETRIEVAL_NUM_LABELS = 2
IMAGE_NUM_LABELS = 10

RETRIEVAL_FILES = {
    "train": "new_aan_pairs.train.tsv",
    "validation": "new_aan_pairs.eval.tsv",
    "test": "new_aan_pairs.test.tsv",
}
# LRA's matching pipeline encodes only the first 10,000 bytes of each document.
RETRIEVAL_MAX_BYTES = 10_000
IMAGE_SHAPE = (32, 32, 3)
# The share of CIFAR-10's train split that LRA trains on ('train[:90%]').
IMAGE_TRAIN_PERCENT = 90
# tf.image.rgb_to_grayscale's luma weights.
GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)
_RETRIEVAL_COLUMNS = ("label", "id1", "id2", "text1", "text2")
# TensorFlow's CSV reader ends a record at '\n', '\r' or '\r\n'.
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


# --- encoding ----------------------------------------------------------------------------------


def encode_bytes(texts: Sequence[bytes | str], seq_len: int) -> np.ndarray:
    """Byte-level ids as tfds' `ByteTextEncoder` gives them: byte + 1, cut and padded.

    Args:
      texts: documents; a `str` is encoded as UTF-8.
      seq_len: the row length; longer documents are cut, shorter ones padded with 0.

    Returns:
      int32 `[len(texts), seq_len]`.
    """
    _check_seq_len(seq_len)
    ids = np.zeros((len(texts), seq_len), np.int32)
    for i, text in enumerate(texts):
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        row = np.frombuffer(data[:seq_len], np.uint8)
        ids[i, : row.size] = row.astype(np.int32) + 1
    return ids


def rgb_to_grayscale(images) -> np.ndarray:
    """8-bit luma as `tf.image.rgb_to_grayscale` computes it for uint8 images.

    In float32: each channel times 1/255, the weighted sum with
    `GRAYSCALE_WEIGHTS`, times 255.5, truncated to uint8 (TensorFlow's
    `convert_image_dtype` both ways). The three products are added left to right;
    TensorFlow's matmul may add them in another order, which can move a value
    lying within a float32 rounding of an integer by one level.

    Args:
      images: uint8 `[..., 3]` RGB.

    Returns:
      uint8 `[...]`.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 1 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [..., 3] RGB, got {images.dtype} {images.shape}")
    x = images.astype(np.float32) * np.float32(1.0 / 255)
    w = np.asarray(GRAYSCALE_WEIGHTS, np.float32)
    gray = x[..., 0] * w[0] + x[..., 1] * w[1] + x[..., 2] * w[2]
    return (gray * np.float32(255.5)).astype(np.uint8)


def image_inputs(images) -> np.ndarray:
    """uint8 RGB `[n, 32, 32, 3]` to ids int32 `[n, 1024]`: grayscale, row-major, + 1."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"images: expected [n, 32, 32, 3], got {images.shape}")
    return rgb_to_grayscale(images).reshape(len(images), -1).astype(np.int32) + 1


def _table(inputs: np.ndarray, labels) -> dict[str, np.ndarray]:
    return {"inputs": inputs, "labels": np.asarray(labels, np.int32).reshape(len(inputs))}


# --- Text --------------------------------------------------------------------------------------


def load_text(data_dir: str | os.PathLike, seq_len: int = 4000, validation_fraction: float = 0.1):
    """LRA's Text task from `imdb_reviews` as prepared by tensorflow-datasets.

    Reads through `text_classification.read_imdb_tfds` (array_record or parquet;
    nothing is downloaded) and builds the tables with `text_tables`.

    Args:
      data_dir: the tfds data directory holding `imdb_reviews/plain_text/<version>/`.
      seq_len: bytes kept per review (LRA: 4,000).
      validation_fraction: share of train held out as 'validation', by review id.

    Returns:
      {split: {"inputs": int32 [n, seq_len], "labels": int32 [n]}}; labels neg=0, pos=1.

    Raises:
      FileNotFoundError / ValueError from `read_imdb_tfds` when the dataset is
        not prepared or prepared as tfrecord (both saying how to prepare it).
    """
    _check_seq_len(seq_len)
    _check_fraction(validation_fraction)
    return text_tables(text_classification.read_imdb_tfds(data_dir), seq_len, validation_fraction)


def text_tables(reviews: Mapping[str, Sequence], seq_len: int, validation_fraction: float):
    """The Text tables of IMDB reviews (`LabeledText`) read per split 'train' and 'test'.

    A training review is held out for 'validation' when
    `crc32(id) / 2**32 < validation_fraction`: the same rule, on the same ids
    ('train/<record index>'), as the `imdb` classification task, so both hold
    out the same reviews. The split thus depends on the review ids only, not on
    their order, and is `validation_fraction` of train in expectation.
    'test' is IMDB's test set, on which LRA reports.
    """
    _check_seq_len(seq_len)
    _check_fraction(validation_fraction)
    train = list(reviews["train"])
    held = [text_classification.held_out(r.id, validation_fraction) for r in train]
    parts = {
        "train": [r for r, h in zip(train, held) if not h],
        "validation": [r for r, h in zip(train, held) if h],
        "test": list(reviews["test"]),
    }
    return {
        split: _table(encode_bytes([r.text for r in records], seq_len), [r.label for r in records])
        for split, records in parts.items()
    }


# --- Retrieval ---------------------------------------------------------------------------------


class AanPair(NamedTuple):
    """One line of an LRA AAN pair file: do the two papers cite each other (1) or not (0)?"""

    label: int
    id1: str
    id2: str
    text1: bytes
    text2: bytes


def read_aan_pairs(path: str | os.PathLike) -> list[AanPair]:
    """Reads one of LRA's `new_aan_pairs.*.tsv` files as its matching pipeline does.

    Each line holds five tab-separated fields, label, id1, id2, text1, text2;
    there is no header and no quoting (a `"` is an ordinary character). Lines
    end at '\\n', '\\r' or '\\r\\n', as in TensorFlow's CSV reader; a final line
    break is optional. The label is read as a number and must be 0 or 1 ('1',
    '1.0', ...). Texts are kept as bytes: LRA encodes bytes, whatever the encoding.

    Raises:
      FileNotFoundError naming `path` when it does not exist.
      ValueError naming the file and the 1-based line of a line without
        exactly five fields (an empty line included) or with a bad label.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected LRA's AAN pair file (label, id1, id2, text1, text2)")
    lines = _LINE_BREAK.split(path.read_bytes())
    if lines and lines[-1] == b"":
        lines.pop()
    pairs = []
    for number, line in enumerate(lines, start=1):
        fields = line.split(b"\t")
        if len(fields) != len(_RETRIEVAL_COLUMNS):
            raise ValueError(
                f"{path}: line {number}: expected {len(_RETRIEVAL_COLUMNS)} tab-separated fields "
                f"{_RETRIEVAL_COLUMNS}, got {len(fields)}"
            )
        pairs.append(AanPair(_label(fields[0], path, number), _id(fields[1]), _id(fields[2]), fields[3], fields[4]))
    return pairs


def _label(field: bytes, path: pathlib.Path, number: int) -> int:
    try:
        value = float(field)
    except ValueError:
        value = None
    if value not in (0.0, 1.0):
        raise ValueError(f"{path}: line {number}: label {field[:40]!r} is not 0 or 1")
    return int(value)


def _id(field: bytes) -> str:
    return field.decode("utf-8", errors="replace")


def load_retrieval(directory: str | os.PathLike, seq_len: int = 4000):
    """LRA's Retrieval task from its three AAN pair files in `directory`.

    Args:
      directory: holds `RETRIEVAL_FILES` (LRA's release keeps them in `tsv_data/`).
      seq_len: bytes kept per document (LRA: 4,000); at most `RETRIEVAL_MAX_BYTES`
        are ever used, as in LRA.

    Returns:
      {split: {"inputs": int32 [n, 2, seq_len], "labels": int32 [n]}}, file
      order; 'validation' is LRA's eval file.

    Raises:
      FileNotFoundError naming a missing file; ValueError for a malformed line
        (see `read_aan_pairs`).
    """
    _check_seq_len(seq_len)
    directory = pathlib.Path(directory)
    tables = {}
    for split, name in RETRIEVAL_FILES.items():
        pairs = read_aan_pairs(directory / name)
        first = encode_bytes([p.text1[:RETRIEVAL_MAX_BYTES] for p in pairs], seq_len)
        second = encode_bytes([p.text2[:RETRIEVAL_MAX_BYTES] for p in pairs], seq_len)
        tables[split] = _table(np.stack([first, second], axis=1), [p.label for p in pairs])
    return tables


# --- Image -------------------------------------------------------------------------------------


def read_cifar10_tfds(data_dir: str | os.PathLike, *, chunk: int = 1024) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads `cifar10` as prepared by tensorflow-datasets, without TensorFlow.

    Uses `tfds.builder('cifar10', data_dir=data_dir).as_data_source(split)`,
    which needs the `array_record` or `parquet` file format; nothing is downloaded.

    Args:
      data_dir: the tfds data directory (holding `cifar10/<version>/`).
      chunk: examples decoded at a time.

    Returns:
      {'train': (images, labels), 'test': (images, labels)} in the prepared
      files' order (the order `tfds.load` reads them in): uint8 `[n, 32, 32, 3]`
      and int32 `[n]`.

    Raises:
      FileNotFoundError naming `data_dir` if cifar10 is not prepared there,
        with the command that prepares it.
      ValueError if it is prepared as tfrecord, which needs TensorFlow.
    """
    builder = tfds_prepared.builder("cifar10", data_dir)
    splits = {}
    for split in ("train", "test"):
        # Whole splits only: tfds' parquet data source ignores slices such as 'train[:90%]'.
        source = builder.as_data_source(split)
        images = np.zeros((len(source), *IMAGE_SHAPE), np.uint8)
        labels = np.zeros((len(source),), np.int32)
        for start in range(0, len(source), chunk):
            for i, example in enumerate(source.__getitems__(range(start, min(start + chunk, len(source)))), start):
                images[i] = example["image"]
                labels[i] = example["label"]
        splits[split] = (images, labels)
    return splits


def image_split_point(num_train: int) -> int:
    """Where tfds cuts 'train[:90%]' from 'train[90%:]': 90% of `num_train`, rounded to the closest (45,000 of 50,000)."""
    return int(round(IMAGE_TRAIN_PERCENT * num_train / 100.0))


def image_tables(splits: Mapping[str, tuple[np.ndarray, np.ndarray]]):
    """The Image tables of CIFAR-10 `(images, labels)` read per split 'train' and 'test'.

    The first 90% of train (in the prepared files' order) is 'train', the rest
    'validation', as LRA's 'train[:90%]' / 'train[90%:]'; 'test' is CIFAR-10's test.
    """
    images, labels = splits["train"]
    cut = image_split_point(len(images))
    parts = {
        "train": (images[:cut], labels[:cut]),
        "validation": (images[cut:], labels[cut:]),
        "test": splits["test"],
    }
    return {split: _table(image_inputs(x), y) for split, (x, y) in parts.items()}


def load_image(data_dir: str | os.PathLike):
    """LRA's Image task: `image_tables(read_cifar10_tfds(data_dir))`.

    Returns:
      {split: {"inputs": int32 [n, 1024] (8-bit grayscale + 1), "labels": int32 [n]}}.
    """
    return image_tables(read_cifar10_tfds(data_dir))


# --- checks ------------------------------------------------------------------------------------


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len: expected a positive integer, got {seq_len!r}")


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction: expected a number in (0, 1), got {fraction!r}")
