"""What the tracking tests share: a fake clock, a run's metrics and a training loop's logging calls."""

from __future__ import annotations

import io
import math

from longjax.tracking import MetricsLog

PHASES = (0, 60)
TOTAL = 100


class FakeClock:
    """A settable monotonic clock, so ETAs are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _metrics(step: int) -> dict:
    bpc = 2.0 + 1.0 / step
    return {"loss": bpc * math.log(2), "bpc": bpc, "learning_rate": 2.5e-4, "tokens_per_second": 12345.0}


def _phase(step: int) -> int:
    return sum(step > s for s in PHASES)


def _open(workdir, **kw) -> MetricsLog:
    kw.setdefault("stream", io.StringIO())
    kw.setdefault("tensorboard", False)
    return MetricsLog(workdir, total_steps=TOTAL, phase_starts=PHASES, **kw)


def _run(log: MetricsLog, steps) -> None:
    """A training loop's logging: train every 10 steps, validation every 20."""
    for step in steps:
        log.train(step, _phase(step), _metrics(step))
        if step % 20 == 0:
            log.eval(step, _phase(step), "valid", {"bpc": 2.5 - step / 100, "loss": 1.0, "chars": 1000})


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]
