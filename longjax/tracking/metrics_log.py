"""`MetricsLog`: checks each logging call once and fans it out to the sinks.

The sinks, one per module of this package:

* `console` prints a line per call with a progress bar and an ETA;
* `jsonl` appends a record per call to `workdir/metrics.jsonl`, and on resume
  removes the records logged after the checkpoint;
* `tensorboard` writes scalars under `workdir/tensorboard`, hiding on resume the
  events logged after the checkpoint.

A sink takes its arguments as checked: `train(step, phase, values)`,
`eval(step, phase, split, values)` with `values` a dict of Python numbers, and
`close()`. The log works for any task: a training record needs only loss,
learning_rate and tokens_per_second; bpc (the character LM), accuracy and any
other metric are optional.
"""

from __future__ import annotations

import itertools
import operator
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, Self, TextIO

import numpy as np

from longjax.tracking.console import ConsoleSink
from longjax.tracking.jsonl import JsonlSink
from longjax.tracking.tensorboard import TensorBoardSink

# The metrics every training record carries.
TRAIN_REQUIRED = ("loss", "learning_rate", "tokens_per_second")
# Keys the sinks write themselves; metrics may not use them.
_RESERVED = ("kind", "step", "phase", "split", "time")


class Sink(Protocol):
    """Where checked logging calls go."""

    def train(self, step: int, phase: int, values: Mapping[str, float | int]) -> None: ...

    def eval(self, step: int, phase: int, split: str, values: Mapping[str, float | int]) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """Console, TensorBoard and JSONL logging of one training run.

    Opened once per run by every process; only the primary process (JAX process
    0) prints or writes, but every process checks its calls, so a misplaced call
    fails on all of them.

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
        # A resumed run has not done its checkpoint's step; a fresh one may log step 0.
        # Set alike on every process, so a misplaced call fails on all of them.
        self._last_train_step = resume_step if resume_step > 0 else -1
        self._console: ConsoleSink | None = None
        self._sinks: list[Sink] = []
        self._closed = False
        if not self.is_primary:
            return

        self.workdir.mkdir(parents=True, exist_ok=True)
        self._console = ConsoleSink(
            stream,
            total_steps=total_steps,
            num_phases=len(self.phase_starts),
            eta_window=eta_window,
            bar_width=bar_width,
            clock=clock,
        )
        self._sinks.append(self._console)
        try:
            self._sinks.append(JsonlSink(self.workdir, resume_step=resume_step))
            if tensorboard:
                self._sinks.append(TensorBoardSink(self.workdir, resume_step=resume_step))
        except BaseException:
            self.close()
            raise

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
          metrics: scalars with at least loss, learning_rate and tokens_per_second;
            more are logged too (e.g. bpc for the character LM, accuracy for a
            classifier). The console shows loss, bpc if given, the learning rate,
            the throughput, then the others in the order given.
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
        for sink in self._sinks:
            sink.train(step, phase, values)

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
        for sink in self._sinks:
            sink.eval(step, phase, split, values)

    def message(self, text: str) -> None:
        """Prints one line of text (primary process only)."""
        self._check_open()
        if self._console is not None:
            self._console.message(str(text))

    def close(self) -> None:
        """Flushes and closes the JSONL file and the TensorBoard writer; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        # The files first, the console last, as each sink was opened before the next.
        for sink in reversed(self._sinks):
            sink.close()

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
