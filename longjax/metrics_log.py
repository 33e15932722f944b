"""Training progress and metrics: console lines, TensorBoard scalars, a JSONL record, curve plots.

`MetricsLog` is opened once per run by every process; only the primary process
(JAX process 0) prints or writes. Per call it

* prints one plain-text line (readable in a terminal and in a log file)::

    phase 1/5 | step   1200/570000 [------------------------]   0.2% | loss 0.8557 | bpc 1.2345 | lr 2.500e-04 | 123.5k tok/s | ETA 5:12:50

* writes TensorBoard scalars with tensorboardX under `workdir/tensorboard`
  (`train/<name>` for training metrics, `<split>/<name>` for evaluations);
* appends one JSON record per line to `workdir/metrics.jsonl`::

    {"kind": "train", "step": 1200, "phase": 1, "loss": 1.23, "bpc": 1.78, ..., "time": 1767225600.0}
    {"kind": "eval", "step": 5000, "phase": 1, "split": "valid", "bpc": 1.31, ..., "time": ...}

Non-finite values are written as Python's `json` writes them (`NaN`,
`Infinity`), and `read_metrics` reads them back. A record is complete once its
newline is written: an unterminated last line (a crash mid-write) is ignored by
`read_metrics` and dropped when the log is reopened.

Resuming: a run restarted from its checkpoint at step R opens the log with
`resume_step=R`. Records with step > R, logged by the previous run after that
checkpoint, are removed (the file is rewritten atomically), so the resumed file
holds each step once and equals an uninterrupted run's file apart from the
"time" fields. `resume_step=0` is a start from scratch and keeps only records at
step 0. TensorBoard gets `purge_step=R + 1`, which hides the stale events.

`plot_curves` draws training and evaluation BPC against the step, with the
phase starts marked, into `workdir/curves.png`.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import operator
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self, TextIO

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"
# The metrics every training record carries, in console order, with their labels.
TRAIN_REQUIRED = ("loss", "bpc", "learning_rate", "tokens_per_second")
# Keys the log writes itself; metrics may not use them.
_RESERVED = ("kind", "step", "phase", "split", "time")
# The gid of the vertical lines `curves_figure` draws at phase starts.
PHASE_LINE_GID = "phase-start"


class MetricsLog:
    """Console, TensorBoard and JSONL logging of one training run.

    Args:
      workdir: the run's directory; created if missing (primary process only).
      total_steps: the run's last step, for the progress bar and the ETA.
      phase_starts: the step at which each phase starts, increasing; phase k
        (1-based, as passed to `train`/`eval`) starts at `phase_starts[k - 1]`.
      resume_step: the step of the checkpoint the run resumes from; records
        after it are removed from `metrics.jsonl` on open (0: from scratch).
      is_primary: False on every JAX process but 0: nothing is printed or written.
      stream: where console lines go.
      tensorboard: write TensorBoard event files under `workdir/tensorboard`.
      eta_window: the number of recent intervals between `train` calls whose
        rate gives the ETA.
      bar_width: characters inside the progress bar's brackets.
      clock: a monotonic clock in seconds, for the ETA (tests pass a fake one).

    The ETA is the remaining steps times the wall time per step over the last
    `eta_window` intervals between `train` calls of the current phase. An
    interval that contains an `eval` call or a phase change is left out: it holds
    one-off costs (evaluation, compiling the new phase's step function) that are
    not a rate. The ETA therefore counts training time only, at the current
    phase's speed, and reads "ETA ?" until a phase has two `train` calls.

    Steps must increase from one `train` call to the next, and after a resume
    start above `resume_step`: each step is logged once.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        phase_starts: Sequence[int],
        resume_step: int = 0,
        is_primary: bool = True,
        stream: TextIO = sys.stdout,
        tensorboard: bool = True,
        eta_window: int = 20,
        bar_width: int = 24,
        clock: Callable[[], float] = time.monotonic,
    ):
        total_steps = _as_int("total_steps", total_steps, minimum=1)
        self.phase_starts = _check_phase_starts(phase_starts, total_steps)
        resume_step = _as_int("resume_step", resume_step, minimum=0)
        if resume_step > total_steps:
            raise ValueError(f"resume_step must be <= total_steps={total_steps}, got {resume_step}")
        eta_window = _as_int("eta_window", eta_window, minimum=1)
        bar_width = _as_int("bar_width", bar_width, minimum=1)
        self.workdir = pathlib.Path(workdir)
        self.total_steps = total_steps
        self.resume_step = resume_step
        self.is_primary = bool(is_primary)
        self._stream = stream
        self._bar_width = bar_width
        self._clock = clock
        self._intervals: collections.deque[tuple[float, int]] = collections.deque(maxlen=eta_window)
        self._mark: tuple[float, int] | None = None  # (time, step) of the last train call
        self._phase: int | None = None
        self._eval_since_mark = False
        # A resumed run has not done its checkpoint's step; a fresh one may log step 0.
        # Set alike on every process, so a misplaced call fails on all of them.
        self._last_train_step = resume_step if resume_step > 0 else -1
        self._file = None
        self._writer = None
        self._closed = False
        if not self.is_primary:
            return

        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / METRICS_FILE
        if path.exists():
            _truncate_after(path, resume_step)
        # Held open for the log's lifetime and closed by close().
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            tb_dir = self.workdir / TENSORBOARD_DIR
            stale = tb_dir.is_dir() and any(tb_dir.iterdir())
            # purge_step makes TensorBoard drop the earlier files' events at steps
            # >= resume_step + 1, which the crashed run logged after its checkpoint.
            # tensorboardX names files by the second and opens them with "wb": a run
            # resumed within the same second would overwrite its predecessor's file.
            # The nanosecond suffix keeps the names distinct and in time order.
            self._writer = SummaryWriter(
                str(tb_dir),
                purge_step=resume_step + 1 if stale else None,
                flush_secs=30,
                filename_suffix=f".{time.time_ns()}",
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def train(self, step: int, phase: int, metrics: Mapping[str, Any]) -> None:
        """Logs the training metrics of `step`: one console line, TensorBoard scalars, one JSONL record.

        Args:
          step: the number of optimizer steps done, 0 <= step <= total_steps,
            larger than the previous `train` call's and than a nonzero `resume_step`.
          phase: the current phase, 1 <= phase <= len(phase_starts).
          metrics: scalars with at least loss (nats per character), bpc,
            learning_rate and tokens_per_second; more are logged too.
        """
        self._check_open()
        step, phase = self._check_step_phase(step, phase)
        values = _scalars(metrics)
        missing = [k for k in TRAIN_REQUIRED if k not in values]
        if missing:
            raise ValueError(f"metrics must contain {list(TRAIN_REQUIRED)}; missing {missing}")
        if step <= self._last_train_step:
            raise ValueError(
                f"step {step} is not after step {self._last_train_step} (the last training step "
                "logged, or resume_step): each step is logged once, in increasing order"
            )
        self._last_train_step = step
        eta = self._update_eta(step, phase)
        if not self.is_primary:
            return
        self._print(self._train_line(step, phase, values, eta))
        self._write({"kind": "train", "step": step, "phase": phase, **values})
        if self._writer is not None:
            self._writer.add_scalar("train/phase", phase, step)
            for name, value in values.items():
                self._writer.add_scalar(f"train/{name}", value, step)

    def eval(self, step: int, phase: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Logs an evaluation at `step` on `split`, e.g. metrics {"bpc", "loss", "chars"}.

        Args:
          step: the training step evaluated, 0 <= step <= total_steps.
          phase: the phase of that step, 1 <= phase <= len(phase_starts).
          split: the split's name, e.g. "valid" or "test"; TensorBoard tags are
            f"{split}/{name}".
          metrics: scalars, at least one.
        """
        self._check_open()
        step, phase = self._check_step_phase(step, phase)
        if not isinstance(split, str) or not split or "/" in split:
            raise ValueError(f"split must be a non-empty string without '/', got {split!r}")
        values = _scalars(metrics)
        if not values:
            raise ValueError("metrics must hold at least one value, got an empty mapping")
        self._eval_since_mark = True
        if not self.is_primary:
            return
        self._print(self._eval_line(step, phase, split, values))
        self._write({"kind": "eval", "step": step, "phase": phase, "split": split, **values})
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{split}/{name}", value, step)
            self._writer.flush()

    def message(self, text: str) -> None:
        """Prints one line of text (primary process only)."""
        self._check_open()
        if self.is_primary:
            self._print(str(text))

    def close(self) -> None:
        """Flushes and closes the JSONL file and the TensorBoard writer; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()
        if self.is_primary:
            self._stream.flush()

    # Internals.

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MetricsLog is closed")

    def _check_step_phase(self, step: int, phase: int) -> tuple[int, int]:
        step = _as_int("step", step, minimum=0)
        if step > self.total_steps:
            raise ValueError(f"step must be <= total_steps={self.total_steps}, got {step}")
        phase = _as_int("phase", phase)
        if not 1 <= phase <= len(self.phase_starts):
            raise ValueError(
                f"phase must be in 1..{len(self.phase_starts)} (1-based, one per phase_starts entry), "
                f"got {phase}"
            )
        return step, phase

    def _update_eta(self, step: int, phase: int) -> float | None:
        now = self._clock()
        if phase != self._phase:
            self._intervals.clear()
        elif self._mark is not None and not self._eval_since_mark:
            self._intervals.append((now - self._mark[0], step - self._mark[1]))
        self._phase = phase
        self._mark = (now, step)
        self._eval_since_mark = False
        if not self._intervals:
            return None
        seconds = sum(dt for dt, _ in self._intervals)
        steps = sum(ds for _, ds in self._intervals)
        return seconds / steps * (self.total_steps - step)

    def _progress(self, step: int) -> str:
        fraction = step / self.total_steps
        filled = min(self._bar_width, int(fraction * self._bar_width))
        bar = "#" * filled + "-" * (self._bar_width - filled)
        return f"[{bar}] {100 * fraction:5.1f}%"

    def _head(self, step: int, phase: int) -> str:
        width = len(str(self.total_steps))
        return f"phase {phase}/{len(self.phase_starts)} | step {step:>{width}}/{self.total_steps}"

    def _train_line(self, step: int, phase: int, values: dict, eta: float | None) -> str:
        parts = [
            f"{self._head(step, phase)} {self._progress(step)}",
            f"loss {_number(values['loss'])}",
            f"bpc {_number(values['bpc'])}",
            f"lr {values['learning_rate']:.3e}",
            f"{_si(values['tokens_per_second'])} tok/s",
        ]
        parts += [f"{k} {_number(v)}" for k, v in values.items() if k not in TRAIN_REQUIRED]
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    def _eval_line(self, step: int, phase: int, split: str, values: dict) -> str:
        first = [k for k in ("bpc", "loss") if k in values]
        order = first + [k for k in values if k not in first]
        return " | ".join(
            [self._head(step, phase), f"eval {split}"] + [f"{k} {_number(values[k])}" for k in order]
        )

    def _print(self, line: str) -> None:
        print(line, file=self._stream, flush=True)

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


def curves_figure(records: Sequence[Mapping[str, Any]], *, phase_starts: Sequence[int]):
    """A matplotlib Figure of training and evaluation BPC against the step.

    Args:
      records: records as `read_metrics` returns them; the "bpc" of "train"
        records and of "eval" records (one line per split) are drawn.
      phase_starts: the step at which each phase starts; a vertical line with
        gid `PHASE_LINE_GID`, labelled "phase k", marks each.

    Non-finite values are left as gaps. The figure is not registered with
    pyplot, so nothing global changes and nothing needs closing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    starts = [int(s) for s in phase_starts]
    if not starts:
        raise ValueError("phase_starts must list at least one phase start, got none")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        if "bpc" not in record:
            continue
        kind = record.get("kind")
        if kind == "train":
            name = "train"
        elif kind == "eval":
            name = str(record.get("split"))
        else:
            continue
        steps, bpc = series.setdefault(name, ([], []))
        steps.append(record["step"])
        value = float(record["bpc"])
        bpc.append(value if math.isfinite(value) else math.nan)
    if not series:
        raise ValueError("records hold no 'train' or 'eval' record with a 'bpc' value; nothing to plot")

    fig = Figure(figsize=(10, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (steps, bpc) in series.items():
        if name == "train":
            ax.plot(steps, bpc, label="train BPC", linewidth=1.0, marker="." if len(steps) == 1 else None)
        else:  # evaluations are sparse: show each point
            ax.plot(steps, bpc, label=f"{name} BPC", linewidth=1.0, marker="o", markersize=3)
    for k, start in enumerate(starts, 1):
        ax.axvline(start, color="0.5", linestyle="--", linewidth=0.8, gid=PHASE_LINE_GID)
        # x in data coordinates, y in axes coordinates; vertical, so close phases do not overlap.
        ax.text(
            start,
            0.99,
            f" phase {k}",
            transform=ax.get_xaxis_transform(),
            rotation=90,
            ha="right",
            va="top",
            fontsize=8,
            color="0.3",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot_curves(
    workdir: str | os.PathLike, *, phase_starts: Sequence[int], path: str | os.PathLike | None = None
) -> pathlib.Path:
    """Writes a PNG of the run's training and evaluation BPC curves and returns its path.

    Args:
      workdir: the run's directory, holding metrics.jsonl.
      phase_starts: the step at which each phase starts (marked "phase k").
      path: the PNG to write; default `workdir/curves.png`.
    """
    records = read_metrics(workdir)
    if not records:
        raise ValueError(f"no metrics records in {pathlib.Path(workdir) / METRICS_FILE}; nothing to plot")
    fig = curves_figure(records, phase_starts=phase_starts)
    out = pathlib.Path(workdir) / CURVES_FILE if path is None else pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def format_duration(seconds: float | None) -> str:
    """'?' for None or a non-finite value, else 'H:MM:SS', with a 'Nd ' prefix from one day on."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {hours:02d}:{minutes:02d}:{secs:02d}" if days else clock


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def _si(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}"


def _as_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """`value` as a Python int: ints, numpy and jax integer scalars pass; bools and floats do not."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def _check_phase_starts(phase_starts: Sequence[int], total_steps: int) -> tuple[int, ...]:
    starts = tuple(phase_starts)
    if not starts:
        raise ValueError("phase_starts must list at least one phase start, got none")
    starts = tuple(_as_int("phase_starts entries", s, minimum=0) for s in starts)
    if any(b <= a for a, b in itertools.pairwise(starts)):
        raise ValueError(f"phase_starts must increase strictly, got {list(starts)}")
    if starts[-1] >= total_steps:
        raise ValueError(f"phase_starts must be < total_steps={total_steps}, got {list(starts)}")
    return starts


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """Metrics as JSON-ready Python numbers: ints stay ints, floats (NaN, inf too) become floats."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name to scalar, got {type(metrics).__name__}")
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric names must be non-empty strings, got {name!r}")
        if name in _RESERVED:
            raise ValueError(f"metric name {name!r} is reserved for the record's own fields {_RESERVED}")
        array = np.asarray(value)  # Python numbers, numpy and jax scalars alike
        if array.shape != () or array.dtype.kind not in "iuf":
            raise ValueError(
                f"metric {name!r} must be a real scalar, got shape {array.shape} dtype {array.dtype}"
            )
        out[name] = int(array) if array.dtype.kind in "iu" else float(array)
    return out


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


def _truncate_after(path: pathlib.Path, step: int) -> None:
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
