"""Document classification data: IMDB and Hyperpartisan readers, splits, and their metrics.

Pure Python/NumPy; `tensorflow_datasets` is imported only by `read_imdb_tfds`.

Readers return `LabeledText` records with string ids and integer labels.
IMDB: neg=0, pos=1. Hyperpartisan: false=0, true=1 (allenai/longformer's
`classification.py` numbers the sorted label strings, giving the same).
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import pathlib
import re
import warnings
import zlib
from collections.abc import Sequence

import numpy as np

from longjax.data import tfds_prepared

logger = logging.getLogger(__name__)

IMDB_SPLITS = ("train", "test")
IMDB_CLASSES = (("neg", 0), ("pos", 1))
HYPERPARTISAN_SPLITS = ("train", "validation", "test")
# allenai's hp-splits.json names its validation split 'dev'.
_SPLIT_FILE_KEYS = {"train": "train", "dev": "validation", "test": "test"}
_HYPERPARTISAN_LABELS = {"false": 0, "true": 1}
_IMDB_FILE = re.compile(r"^(\d+)_(\d+)\.txt$")
_IMDB_LAYOUT = "directory/{train,test}/{pos,neg}/<id>_<rating>.txt (the aclImdb archive, unpacked)"


@dataclasses.dataclass(frozen=True)
class LabeledText:
    """One document and its class.

    Attributes:
      id: unique within its dataset, e.g. 'train/pos/123_9' (IMDB files),
        'train/17' (IMDB from tfds: split and record index) or '42' (Hyperpartisan).
      text: the document as stored.
      label: the class index.
    """

    id: str
    text: str
    label: int


@dataclasses.dataclass(frozen=True)
class ReadResult:
    """What `scan_hyperpartisan_jsonl` read.

    Attributes:
      records: the well-formed records, in file order.
      skipped: how many malformed records were skipped (0 unless `skip_malformed`).
    """

    records: list[LabeledText]
    skipped: int


# --- IMDB -------------------------------------------------------------------------------------


def held_out(record_id: str, fraction: float) -> bool:
    """Whether a training record goes to the validation split that IMDB lacks: `crc32(id) / 2**32 < fraction`.

    A function of the id alone, so the split does not depend on file order,
    and the `imdb` classification task and LRA's Text task hold out the same reviews.
    """
    return zlib.crc32(record_id.encode()) / 2**32 < fraction


def read_imdb_directory(directory: str | os.PathLike) -> dict[str, list[LabeledText]]:
    """Reads the raw aclImdb layout.

    Args:
      directory: holds `train/` and `test/`, each with `pos/` and `neg/` of
        `<id>_<rating>.txt` files (other entries, e.g. `train/unsup/`, are ignored).

    Returns:
      {'train': [...], 'test': [...]}: per split, the neg reviews then the pos
      reviews, each class sorted by its numeric review id (then rating). Ids are
      'split/class/<id>_<rating>'; labels neg=0, pos=1. Text is decoded as UTF-8
      and kept verbatim: IMDB's `<br />` line breaks are not replaced.

    Raises:
      FileNotFoundError naming the missing split/class directory (or one without
        reviews) and the expected layout.
      ValueError naming a `.txt` file whose name is not `<id>_<rating>.txt`, or
        that is not UTF-8.
    """
    directory = pathlib.Path(directory)
    splits = {}
    for split in IMDB_SPLITS:
        records = []
        for name, label in IMDB_CLASSES:
            class_dir = directory / split / name
            if not class_dir.is_dir():
                raise FileNotFoundError(f"{class_dir}: no such directory; expected {_IMDB_LAYOUT}")
            files = []
            for path in class_dir.glob("*.txt"):
                match = _IMDB_FILE.match(path.name)
                if match is None:
                    raise ValueError(f"{path}: expected a review file named <id>_<rating>.txt")
                files.append(((int(match[1]), int(match[2])), path))
            if not files:
                raise FileNotFoundError(f"{class_dir}: no <id>_<rating>.txt reviews; expected {_IMDB_LAYOUT}")
            for _, path in sorted(files):
                records.append(LabeledText(f"{split}/{name}/{path.stem}", _read_utf8(path), label))
        splits[split] = records
    return splits


def read_imdb_tfds(data_dir: str | os.PathLike) -> dict[str, list[LabeledText]]:
    """Reads `imdb_reviews` as prepared by tensorflow-datasets, without TensorFlow.

    Uses `tfds.builder('imdb_reviews', data_dir=data_dir).as_data_source(split)` (`tfds_prepared`),
    which needs the dataset prepared in the `array_record` (or `parquet`) file
    format; nothing is downloaded.

    Args:
      data_dir: the tfds data directory (holding `imdb_reviews/plain_text/1.0.0/`).

    Returns:
      {'train': [...], 'test': [...]} in the prepared files' order. Ids are
      'split/<record index>' (tfds keeps no file names); labels neg=0, pos=1;
      text is the stored UTF-8 decoded, `<br />` kept. Note tfds strips each
      review's surrounding whitespace, so texts may differ from
      `read_imdb_directory`'s by that.

    Raises:
      FileNotFoundError naming `data_dir` if the dataset is not prepared there,
        with the command that prepares it.
      ValueError if it is prepared in a format without random access (tfrecord).
    """
    builder = tfds_prepared.builder("imdb_reviews", data_dir)
    splits = {}
    for split in IMDB_SPLITS:
        source = builder.as_data_source(split)
        examples = source.__getitems__(range(len(source))) if len(source) else []
        splits[split] = [
            LabeledText(f"{split}/{i}", bytes(example["text"]).decode("utf-8"), int(example["label"]))
            for i, example in enumerate(examples)
        ]
    return splits


# --- Hyperpartisan ----------------------------------------------------------------------------


def read_hyperpartisan_jsonl(path: str | os.PathLike, *, skip_malformed: bool = False) -> list[LabeledText]:
    """The records of a Hyperpartisan JSON-lines file: `scan_hyperpartisan_jsonl(...).records`.

    With `skip_malformed`, the number skipped is logged (warning); use
    `scan_hyperpartisan_jsonl` to get it as a value.
    """
    return scan_hyperpartisan_jsonl(path, skip_malformed=skip_malformed).records


def scan_hyperpartisan_jsonl(path: str | os.PathLike, *, skip_malformed: bool = False) -> ReadResult:
    """Reads Hyperpartisan JSON lines as allenai/longformer's `scripts/hp_preprocess.py` writes them.

    Each line is an object `{"text": str, "label": "true" | "false", "id": int}`;
    JSON booleans are accepted as labels and strings as ids. A `.gz` path is
    read through gzip. Every line is a record: a blank line is malformed.

    Args:
      path: a `.jsonl` (or `.jsonl.gz`) file.
      skip_malformed: skip malformed records (logging how many) instead of raising.

    Returns:
      `ReadResult(records, skipped)`; labels false=0, true=1, ids as strings.

    Raises:
      FileNotFoundError if `path` does not exist.
      ValueError naming the file and the 0-based record (line) index of a
        malformed record: bad JSON, not an object, a missing key, an unknown
        label, a non-string text or an id that is not an int or a string.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    records, skipped = [], 0
    with opener(path, "rt", encoding="utf-8") as lines:
        try:
            for index, line in enumerate(lines):
                try:
                    records.append(_hyperpartisan_record(line))
                except ValueError as error:
                    if not skip_malformed:
                        raise ValueError(f"{path}: record {index}: {error}") from error
                    skipped += 1
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 ({error})") from None
    if skipped:
        logger.warning("%s: skipped %d malformed records of %d", path, skipped, skipped + len(records))
    return ReadResult(records, skipped)


def _hyperpartisan_record(line: str) -> LabeledText:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"bad JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("text", "label", "id") if key not in record]
    if missing:
        raise ValueError(f"missing keys {missing}")
    text, label, id_ = record["text"], record["label"], record["id"]
    if not isinstance(text, str):
        raise ValueError(f"'text' must be a string, got {type(text).__name__}")
    if isinstance(label, bool):
        label = int(label)
    elif isinstance(label, str) and label in _HYPERPARTISAN_LABELS:
        label = _HYPERPARTISAN_LABELS[label]
    else:
        raise ValueError(f"unknown label {label!r}; expected 'true', 'false' or a JSON boolean")
    if isinstance(id_, bool) or not isinstance(id_, (int, str)):
        raise ValueError(f"'id' must be an int or a string, got {id_!r}")
    return LabeledText(str(id_), text, label)


def split_hyperpartisan(
    records: Sequence[LabeledText],
    *,
    split_file: str | os.PathLike | None = None,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, list[LabeledText]]:
    """Splits Hyperpartisan records into train/validation/test.

    Records repeating an id with the same text and label count once (e.g. when
    allenai's train/dev/test files are read together).

    With `split_file` (allenai's `hp-splits.json`: `{"train": [ids], "dev": [ids],
    "test": [ids]}`), its splits are used as they are, for comparability with
    published numbers, in the file's order ('dev' becomes 'validation'). That file
    puts some test (and dev) ids in train too; a `UserWarning` says how many,
    counted from the file.

    Without it, a clean split: records sharing an id, or sharing a text (after
    stripping surrounding whitespace), form one group that goes to one split.
    A group's split is a function of `(seed, its smallest id)` only, through
    SHA-256 mapped to [0, 1) and cut at the cumulative `fractions`, so it never
    depends on record order and adding records moves no other group. The split
    sizes are therefore `fractions` only in expectation. Each split is sorted
    by id (numeric ids numerically).

    Args:
      records: e.g. `read_hyperpartisan_jsonl(...).records`, possibly of several files.
      split_file: allenai's `hp-splits.json`, or None for the clean split.
      seed: selects the clean split.
      fractions: train, validation, test shares of the clean split; >= 0, summing to 1.

    Returns:
      {'train': [...], 'validation': [...], 'test': [...]}.

    Raises:
      ValueError naming an id given twice with different text or label, ids of
        the split file that no record has, a split file without exactly the keys
        train/dev/test, or bad `fractions`.
    """
    by_id = _unique_by_id(records)
    if split_file is not None:
        return _split_from_file(by_id, pathlib.Path(split_file))
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions: expected three shares >= 0 summing to 1, got {fractions}")
    groups = _groups(by_id)
    bounds = np.cumsum(fractions)
    splits = {name: [] for name in HYPERPARTISAN_SPLITS}
    for group in groups:
        digest = hashlib.sha256(f"{seed}\0{min(group, key=_id_order)}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        name = HYPERPARTISAN_SPLITS[min(int(np.searchsorted(bounds, u, side="right")), 2)]
        splits[name].extend(by_id[id_] for id_ in group)
    return {name: sorted(split, key=lambda r: _id_order(r.id)) for name, split in splits.items()}


def _unique_by_id(records: Sequence[LabeledText]) -> dict[str, LabeledText]:
    by_id = {}
    for record in records:
        seen = by_id.setdefault(record.id, record)
        if (seen.text, seen.label) != (record.text, record.label):
            raise ValueError(f"records: id {record.id!r} appears twice with different text or label")
    return by_id


def _groups(by_id: dict[str, LabeledText]) -> list[list[str]]:
    """Ids connected by a shared text, as groups (union-find over the text's first id)."""
    parent = {id_: id_ for id_ in by_id}

    def root(id_):
        while parent[id_] != id_:
            parent[id_] = parent[parent[id_]]
            id_ = parent[id_]
        return id_

    first_with_text = {}
    for id_, record in by_id.items():
        other = first_with_text.setdefault(record.text.strip(), id_)
        parent[root(id_)] = root(other)
    groups = collections.defaultdict(list)
    for id_ in by_id:
        groups[root(id_)].append(id_)
    return list(groups.values())


def _split_from_file(by_id: dict[str, LabeledText], split_file: pathlib.Path) -> dict[str, list[LabeledText]]:
    try:
        content = json.loads(split_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{split_file}: bad JSON ({error})") from None
    if not isinstance(content, dict) or set(content) != set(_SPLIT_FILE_KEYS):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{split_file}: expected an object with keys {sorted(_SPLIT_FILE_KEYS)}, got {found}")
    ids = {key: [str(id_) for id_ in content[key]] for key in _SPLIT_FILE_KEYS}
    missing = sorted({id_ for split in ids.values() for id_ in split if id_ not in by_id}, key=_id_order)
    if missing:
        raise ValueError(f"{split_file}: {len(missing)} ids have no record: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    train = set(ids["train"])
    test_in_train = len(set(ids["test"]) & train)
    dev_in_train = len(set(ids["dev"]) & train)
    test_in_dev = len(set(ids["test"]) & set(ids["dev"]))
    if test_in_train or dev_in_train or test_in_dev:
        warnings.warn(
            f"{split_file}: {test_in_train} of its {len(set(ids['test']))} test ids also appear in its train ids "
            f"({dev_in_train} of {len(set(ids['dev']))} dev ids in train, {test_in_dev} test ids in dev); "
            "scores on these splits are not held-out scores",
            UserWarning,
            stacklevel=3,
        )
    return {_SPLIT_FILE_KEYS[key]: [by_id[id_] for id_ in split] for key, split in ids.items()}


def _id_order(id_: str) -> tuple:
    return (0, int(id_), id_) if id_.isdigit() else (1, 0, id_)


def _read_utf8(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 ({error})") from None


# --- metrics ----------------------------------------------------------------------------------


def accuracy(predictions, labels) -> float:
    """The fraction of `predictions` equal to `labels`.

    Args:
      predictions, labels: integer class ids `[n]`, n >= 1.

    Raises:
      ValueError naming the argument that is not a non-empty 1-D integer array,
        or when their lengths differ.
    """
    predictions, labels = _pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1_score(predictions, labels, *, positive: int = 1) -> float:
    """Binary F1 of the class `positive`: 2 tp / (2 tp + fp + fn).

    Edge case: when `positive` is neither predicted nor true anywhere
    (tp + fp + fn == 0), F1 is 0/0; it is defined as 0.0 here, as scikit-learn
    returns by default.

    Args:
      predictions, labels: integer class ids `[n]`, n >= 1.
      positive: the class whose F1 is computed.
    """
    predictions, labels = _pair(predictions, labels)
    return _f1(predictions, labels, positive)


def macro_f1(predictions, labels, *, classes: Sequence[int] | None = None) -> float:
    """The mean over `classes` of each class' F1 (see `f1_score`).

    Args:
      predictions, labels: integer class ids `[n]`, n >= 1.
      classes: the classes averaged; default, those in `labels` or `predictions`
        (as scikit-learn's `f1_score(average='macro')`, which allenai/longformer reports).
    """
    predictions, labels = _pair(predictions, labels)
    if classes is None:
        classes = np.union1d(predictions, labels).tolist()
    if len(classes) == 0:
        raise ValueError("classes: expected at least one class")
    return float(np.mean([_f1(predictions, labels, c) for c in classes]))


def _f1(predictions: np.ndarray, labels: np.ndarray, positive: int) -> float:
    tp = int(np.sum((predictions == positive) & (labels == positive)))
    fp = int(np.sum((predictions == positive) & (labels != positive)))
    fn = int(np.sum((predictions != positive) & (labels == positive)))
    return 0.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for name, value in (("predictions", predictions), ("labels", labels)):
        array = np.asarray(value)
        if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "iub":
            raise ValueError(f"{name}: expected a non-empty 1-D array of integer class ids, got {array.dtype} {array.shape}")
        arrays.append(array.astype(np.int64))
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(f"predictions and labels: lengths differ ({arrays[0].size} vs {arrays[1].size})")
    return arrays[0], arrays[1]
