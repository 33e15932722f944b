"""The arXiv summarization dataset (Cohan et al., 2018): its JSON-lines release and tensorflow-datasets' copy.

The release (`arxiv-dataset/{train,val,test}.txt`) holds one JSON object per
line: `article_id`, `article_text` (a list of sentences), `abstract_text` (a
list of `<S> sentence </S>` strings), plus section fields we do not read.
tensorflow-datasets' `scientific_papers/arxiv` stores `article` and
`abstract` as text, the abstract's sentences one per line.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
import re

SPLITS = ("train", "validation", "test")
RELEASE_NAMES = {"train": "train", "validation": "val", "test": "test"}  # the release's file stems
_SENTENCE = re.compile(r"<S>(.*?)</S>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Paper:
    """One article and its abstract, split into sentences (which ROUGE-Lsum needs)."""

    id: str
    article: str
    abstract: tuple[str, ...]


def abstract_sentences(abstract_text) -> tuple[str, ...]:
    """The sentences of the release's `abstract_text`: the text inside each `<S> ... </S>`, stripped."""
    if isinstance(abstract_text, str):
        abstract_text = [abstract_text]
    sentences = []
    for item in abstract_text:
        found = _SENTENCE.findall(item)
        sentences += [s.strip() for s in (found if found else [item])]
    return tuple(s for s in sentences if s)


def _open(path: pathlib.Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def read_arxiv_jsonl(path: str | os.PathLike) -> list[Paper]:
    """The papers of one release file, in file order.

    Raises:
      ValueError naming the file and line for a line that is not a JSON object
      with `article_id`, `article_text` (list of str) and `abstract_text` (list of str).
    """
    path = pathlib.Path(path)
    papers = []
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object")
            for field in ("article_id", "article_text", "abstract_text"):
                if field not in record:
                    raise ValueError(f"{where}: lacks {field!r}")
            for field in ("article_text", "abstract_text"):
                value = record[field]
                if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                    raise ValueError(f"{where}: {field} must be a list of strings")
            papers.append(Paper(str(record["article_id"]), " ".join(s.strip() for s in record["article_text"]),
                                abstract_sentences(record["abstract_text"])))
    return papers


def release_file(directory: pathlib.Path, split: str) -> pathlib.Path:
    """`<dir>/<val|train|test>` with `.txt`, `.jsonl` or either plus `.gz`; FileNotFoundError listing the names tried."""
    stem = RELEASE_NAMES[split]
    names = [f"{stem}{ext}" for ext in (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no {split} file of the arXiv release (tried {names})")


def read_arxiv_release(directory: str | os.PathLike) -> dict[str, list[Paper]]:
    """Every split of the release in `directory` (train.txt, val.txt, test.txt)."""
    directory = pathlib.Path(directory)
    return {split: read_arxiv_jsonl(release_file(directory, split)) for split in SPLITS}


def read_arxiv_tfds(data_dir: str | os.PathLike) -> dict[str, list[Paper]]:
    """`scientific_papers/arxiv` as prepared by tensorflow-datasets (array_record), without TensorFlow.

    Ids are 'split/<record index>' (tfds keeps no article ids); the abstract's
    lines are its sentences; the article's paragraphs are joined with spaces.

    Raises:
      FileNotFoundError naming `data_dir` when the dataset is not prepared
      there, with the command that prepares it.
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    build = (f"`tfds build scientific_papers/arxiv --data_dir={data_dir} --file_format=array_record` "
             "on a machine with network")
    builder = tfds.builder("scientific_papers/arxiv", data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        raise FileNotFoundError(f"{data_dir}: scientific_papers/arxiv is not prepared there; prepare it with {build}")
    if builder.info.file_format not in (tfds.core.FileFormat.ARRAY_RECORD, tfds.core.FileFormat.PARQUET):
        raise ValueError(f"{data_dir}: scientific_papers/arxiv is prepared as {builder.info.file_format.value}, "
                         f"which tfds cannot read without TensorFlow; rebuild it with {build}")
    splits = {}
    for split in SPLITS:
        source = builder.as_data_source(split)
        records = source.__getitems__(range(len(source))) if len(source) else []
        splits[split] = [
            Paper(f"{split}/{i}", " ".join(bytes(r["article"]).decode("utf-8").split("\n")),
                  tuple(s.strip() for s in bytes(r["abstract"]).decode("utf-8").split("\n") if s.strip()))
            for i, r in enumerate(records)
        ]
    return splits
