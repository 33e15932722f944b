"""The JSONL sink: one JSON record per line in `workdir/metrics.jsonl`, and reading it back.

    {"kind": "train", "step": 1200, "phase": 1, "loss": 1.23, "bpc": 1.78, ..., "time": 1767225600.0}
    {"kind": "eval", "step": 5000, "phase": 1, "split": "valid", "bpc": 1.31, ..., "time": ...}

Non-finite values are written as Python's `json` writes them (`NaN`,
`Infinity`), and `read_metrics` reads them back. A record is complete once its
newline is written: an unterminated last line (a crash mid-write) is ignored by
`read_metrics` and dropped when the file is reopened.

Resuming: a run restarted from its checkpoint at step R opens the sink with
`resume_step=R`. Records with step > R, logged by the previous run after that
checkpoint, are removed (the file is rewritten atomically), so the resumed file
holds each step once and equals an uninterrupted run's file apart from the
"time" fields. `resume_step=0` is a start from scratch and keeps only records at
step 0.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Mapping

METRICS_FILE = "metrics.jsonl"


class JsonlSink:
    """Appends records to `workdir/metrics.jsonl`, after removing those past `resume_step`.

    Args:
      workdir: the run's directory (existing).
      resume_step: the step of the checkpoint the run resumes from (0: from scratch).
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int):
        path = pathlib.Path(workdir) / METRICS_FILE
        if path.exists():
            truncate_after(path, resume_step)
        # Held open for the sink's lifetime and closed by close().
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def train(self, step: int, phase: int, values: Mapping[str, float | int]) -> None:
        self._write({"kind": "train", "step": step, "phase": phase, **values})

    def eval(self, step: int, phase: int, split: str, values: Mapping[str, float | int]) -> None:
        self._write({"kind": "eval", "step": step, "phase": phase, "split": split, **values})

    def close(self) -> None:
        self._file.close()

    def _write(self, record: dict) -> None:
        record["time"] = time.time()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of `workdir/metrics.jsonl`, in order; [] if the file does not exist.

    NaN and infinities come back as floats. An unterminated last line (a write cut
    short by a crash) is not a record and is skipped; any other line that is not
    a JSON record raises ValueError naming the file and line.
    """
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [record for _, record in _parse(path)[0]]


def truncate_after(path: pathlib.Path, step: int) -> None:
    """Removes records after `step` and any unterminated last line, rewriting the file only if needed."""
    records, partial = _parse(path)
    kept = [(line, r) for line, r in records if r["step"] <= step]
    if len(kept) == len(records) and not partial:
        return
    # Write beside the file and rename: a crash leaves the old file or the new, never half of one.
    fd, tmp = tempfile.mkstemp(prefix=".metrics-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # The kept lines verbatim, so they stay byte-identical to what was logged.
            f.writelines(line + "\n" for line, _ in kept)
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(path, tmp)  # mkstemp's file is private (0600); keep the log's own mode
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _parse(path: pathlib.Path) -> tuple[list[tuple[str, dict]], bool]:
    """The complete (line, record) pairs of a metrics file and whether it ends in an unterminated line."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    # After the last newline: "" for a well-formed file, else a record cut short.
    partial = lines.pop() != ""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON record ({e.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            # The file's content is malformed, not an argument's type.
            raise ValueError(  # noqa: TRY004
                f"{path}:{number}: not a metrics record with an integer 'step': {line[:80]!r}"
            )
        records.append((line, record))
    return records, partial
