"""The console sink: one plain-text line per call, with a progress bar and an ETA.

A training line reads, in a terminal and in a log file alike (no control codes)::

    phase 1/5 | step   1200/570000 [------------------------]   0.2% | loss 0.8557 | bpc 1.2345 | lr 2.500e-04 | 123.5k tok/s | ETA 5:12:50

`loss`, then `bpc` where the task reports it (the character LM), then the
learning rate and the throughput, then every other metric in the order given,
then the ETA. An evaluation line puts `bpc` and `loss` first where present::

    phase 2/5 | step   5000/570000 | eval valid | bpc 1.3100 | loss 0.9080 | chars 5000000

The ETA (`Eta`) is the remaining steps times the wall time per step over the
last `window` intervals between training lines of the current phase; an
interval holding an evaluation or a phase change is left out.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping
from typing import TextIO

# Training metrics with their own place and format in the line; the others follow them in the order given.
_TRAIN_FIRST = ("loss", "bpc", "learning_rate", "tokens_per_second")


class Eta:
    """Estimates the time left from the recent rate of training steps.

    The estimate is the remaining steps times the wall time per step over the
    last `window` intervals between `train` calls of the current phase. An
    interval that contains an evaluation (`interrupt`) or a phase change is left
    out: it holds one-off costs (evaluation, compiling the new phase's step
    function) that are not a rate. The estimate therefore counts training time
    only, at the current phase's speed, and is None until a phase has two
    `train` calls.
    """

    def __init__(self, *, total_steps: int, window: int, clock: Callable[[], float]):
        self._total_steps = total_steps
        self._clock = clock
        self._intervals: collections.deque[tuple[float, int]] = collections.deque(maxlen=window)
        self._mark: tuple[float, int] | None = None  # (time, step) of the last train call
        self._phase: int | None = None
        self._interrupted = False

    def train(self, step: int, phase: int) -> float | None:
        """Records a training step done now; returns the seconds left, or None while unknown."""
        now = self._clock()
        if phase != self._phase:
            self._intervals.clear()
        elif self._mark is not None and not self._interrupted:
            self._intervals.append((now - self._mark[0], step - self._mark[1]))
        self._phase = phase
        self._mark = (now, step)
        self._interrupted = False
        if not self._intervals:
            return None
        seconds = sum(dt for dt, _ in self._intervals)
        steps = sum(ds for _, ds in self._intervals)
        return seconds / steps * (self._total_steps - step)

    def interrupt(self) -> None:
        """Leaves the interval up to the next `train` call out of the rate (it holds an evaluation)."""
        self._interrupted = True


class ConsoleSink:
    """Prints training, evaluation and free-text lines to `stream`, flushing each.

    Args:
      stream: where lines go.
      total_steps: the run's last step, for the progress bar and the ETA.
      num_phases: the number of phases, shown as "phase k/num_phases".
      eta_window: intervals between training lines whose rate gives the ETA.
      bar_width: characters inside the progress bar's brackets.
      clock: a monotonic clock in seconds, for the ETA.

    The arguments and metrics are taken as checked (`MetricsLog` checks them):
    a training call's metrics hold loss, learning_rate and tokens_per_second.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        total_steps: int,
        num_phases: int,
        eta_window: int,
        bar_width: int,
        clock: Callable[[], float],
    ):
        self._stream = stream
        self._total_steps = total_steps
        self._num_phases = num_phases
        self._bar_width = bar_width
        self._eta = Eta(total_steps=total_steps, window=eta_window, clock=clock)

    def train(self, step: int, phase: int, values: Mapping[str, float | int]) -> None:
        eta = self._eta.train(step, phase)
        parts = [f"{self._head(step, phase)} {self._progress(step)}", f"loss {_number(values['loss'])}"]
        if "bpc" in values:
            parts.append(f"bpc {_number(values['bpc'])}")
        parts += [
            f"lr {values['learning_rate']:.3e}",
            f"{_si(values['tokens_per_second'])} tok/s",
        ]
        parts += [f"{k} {_number(v)}" for k, v in values.items() if k not in _TRAIN_FIRST]
        parts.append(f"ETA {format_duration(eta)}")
        self.message(" | ".join(parts))

    def eval(self, step: int, phase: int, split: str, values: Mapping[str, float | int]) -> None:
        self._eta.interrupt()
        first = [k for k in ("bpc", "loss") if k in values]
        order = first + [k for k in values if k not in first]
        parts = [self._head(step, phase), f"eval {split}"] + [f"{k} {_number(values[k])}" for k in order]
        self.message(" | ".join(parts))

    def message(self, text: str) -> None:
        print(text, file=self._stream, flush=True)

    def close(self) -> None:
        self._stream.flush()

    def _head(self, step: int, phase: int) -> str:
        width = len(str(self._total_steps))
        return f"phase {phase}/{self._num_phases} | step {step:>{width}}/{self._total_steps}"

    def _progress(self, step: int) -> str:
        fraction = step / self._total_steps
        filled = min(self._bar_width, int(fraction * self._bar_width))
        bar = "#" * filled + "-" * (self._bar_width - filled)
        return f"[{bar}] {100 * fraction:5.1f}%"


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
