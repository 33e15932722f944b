"""Console lines of MetricsLog: fields, progress bar, ETA, evaluation and free-text lines."""

from __future__ import annotations

import io
import math
import re

from longjax.tracking import format_duration, read_metrics
from tests.tracking.helpers import FakeClock, _metrics, _open, _phase, _without_time


def test_train_line_has_every_field_and_a_progress_bar(tmp_path):
    stream, clock = io.StringIO(), FakeClock()
    log = _open(tmp_path, stream=stream, clock=clock)
    metrics = {"loss": 0.8557, "bpc": 1.2345, "learning_rate": 2.5e-4, "tokens_per_second": 123456.0}
    log.train(50, 1, metrics)
    clock.now = 10.0
    log.train(60, 1, metrics | {"grad_norm": 0.25})
    log.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = lines
    for text in (
        "phase 1/2",
        "step  50/100",
        "loss 0.8557",
        "bpc 1.2345",
        "lr 2.500e-04",
        "123.5k tok/s",
        "ETA ?",
    ):
        assert text in first, (text, first)
    assert "[############------------]  50.0%" in first
    # 10 s for 10 steps, 40 steps left.
    assert second.endswith("| grad_norm 0.2500 | ETA 0:00:40"), second
    assert "[##############----------]  60.0%" in second
    assert "\x1b" not in stream.getvalue()  # no terminal control codes in log files


def test_eta_uses_recent_intervals_of_the_phase_only(tmp_path):
    stream, clock = io.StringIO(), FakeClock()
    log = _open(tmp_path, stream=stream, clock=clock, eta_window=2)

    def train(step, at):
        clock.now = at
        log.train(step, _phase(step), _metrics(step))
        return stream.getvalue().splitlines()[-1].rsplit("ETA ", 1)[1]

    # The first call's time (compilation included) is never part of a rate.
    assert train(10, at=1000.0) == "?"
    assert train(20, at=1010.0) == format_duration(80.0)  # 1 s/step
    assert train(30, at=1030.0) == format_duration(70 * 30 / 20)  # window: 1 and 2 s/step
    assert train(40, at=1070.0) == format_duration(60 * 60 / 20)  # window: 2 and 4 s/step
    # An interval holding an evaluation is left out; the window keeps the rest.
    log.eval(40, 1, "valid", {"bpc": 1.0})
    assert train(50, at=5000.0) == format_duration(50 * 60 / 20)
    assert train(60, at=5010.0) == format_duration(40 * 50 / 20)  # window: 4 and 1 s/step
    # A phase change restarts the estimate: its interval holds the new step function's compilation.
    assert train(70, at=9000.0) == "?"
    assert train(80, at=9030.0) == format_duration(20 * 3.0)
    log.close()


def test_eval_line(tmp_path):
    stream = io.StringIO()
    with _open(tmp_path, stream=stream) as log:
        log.eval(80, 2, "test", {"chars": 1000, "loss": 0.7, "bpc": 1.01})
        log.message("saved checkpoint 80")
    assert stream.getvalue().splitlines() == [
        "phase 2/2 | step  80/100 | eval test | bpc 1.0100 | loss 0.7000 | chars 1000",
        "saved checkpoint 80",
    ]


def test_format_duration():
    assert (
        format_duration(None) == "?" and format_duration(math.inf) == "?" and format_duration(math.nan) == "?"
    )
    assert format_duration(0.4) == "0:00:00"
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(3 * 3600 + 7 * 60 + 5) == "3:07:05"
    assert format_duration(2 * 86400 + 3600 + 1) == "2d 01:00:01"
    assert re.fullmatch(r"\d+d \d\d:\d\d:\d\d", format_duration(1e7))


def test_train_line_order_of_the_char_lm(tmp_path):
    stream = io.StringIO()
    with _open(tmp_path, stream=stream) as log:
        metrics = {"grad_norm": 0.25, "tokens_per_second": 123456.0, "bpc": 1.2345, "learning_rate": 2.5e-4}
        log.train(60, 1, metrics | {"loss": 0.8557})
    assert stream.getvalue().splitlines() == [
        "phase 1/2 | step  60/100 [##############----------]  60.0% | loss 0.8557 | bpc 1.2345 | "
        "lr 2.500e-04 | 123.5k tok/s | grad_norm 0.2500 | ETA ?"
    ]


def test_train_record_without_bpc_is_printed_and_written(tmp_path):
    # Tasks other than the character LM (classification, QA, ...) report no bpc.
    stream, clock = io.StringIO(), FakeClock()
    metrics = {"loss": 0.3, "accuracy": 0.875, "learning_rate": 1e-4, "tokens_per_second": 2000.0, "f1": 0.5}
    with _open(tmp_path, stream=stream, clock=clock) as log:
        log.train(50, 1, metrics)
        clock.now = 5.0
        log.train(60, 1, metrics)
        log.eval(60, 1, "valid", {"accuracy": 0.75, "loss": 0.4})
    assert stream.getvalue().splitlines() == [
        "phase 1/2 | step  50/100 [############------------]  50.0% | loss 0.3000 | lr 1.000e-04 | "
        "2.0k tok/s | accuracy 0.8750 | f1 0.5000 | ETA ?",
        "phase 1/2 | step  60/100 [##############----------]  60.0% | loss 0.3000 | lr 1.000e-04 | "
        "2.0k tok/s | accuracy 0.8750 | f1 0.5000 | ETA 0:00:20",
        "phase 1/2 | step  60/100 | eval valid | loss 0.4000 | accuracy 0.7500",
    ]
    assert _without_time(read_metrics(tmp_path)) == [
        {"kind": "train", "step": 50, "phase": 1, **metrics},
        {"kind": "train", "step": 60, "phase": 1, **metrics},
        {"kind": "eval", "step": 60, "phase": 1, "split": "valid", "accuracy": 0.75, "loss": 0.4},
    ]
