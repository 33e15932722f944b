"""MetricsLog itself: checks of its arguments and calls, non-primary processes, closing."""

from __future__ import annotations

import io

import numpy as np
import pytest

from longjax.tracking import METRICS_FILE, MetricsLog
from tests.tracking.helpers import PHASES, TOTAL, _metrics, _open, _run


def test_non_primary_writes_and_prints_nothing(tmp_path):
    stream = io.StringIO()
    fresh = tmp_path / "fresh"
    log = _open(fresh, stream=stream, is_primary=False, tensorboard=True)
    _run(log, range(10, 41, 10))
    log.message("hello")
    log.close()
    assert not fresh.exists() and stream.getvalue() == ""

    # Nor does it truncate a primary's file on resume.
    with _open(tmp_path) as log:
        _run(log, range(10, 41, 10))
    before = (tmp_path / METRICS_FILE).read_bytes()
    _open(tmp_path, is_primary=False, resume_step=10, stream=stream).close()
    assert (tmp_path / METRICS_FILE).read_bytes() == before and stream.getvalue() == ""
    # It still checks its arguments, so a bug shows on every process.
    with pytest.raises(ValueError, match="phase"):
        _open(tmp_path, is_primary=False).train(10, 3, _metrics(10))
    with pytest.raises(ValueError, match="step 10 is not after step 10"):
        _open(tmp_path, is_primary=False, resume_step=10).train(10, 1, _metrics(10))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda log: log.train(10, 0, _metrics(10)), ValueError, "phase must be in 1..2"),
        (lambda log: log.train(10, 3, _metrics(10)), ValueError, "phase must be in 1..2"),
        (lambda log: log.train(101, 2, _metrics(10)), ValueError, "step must be <= total_steps=100"),
        (lambda log: log.train(-1, 1, _metrics(10)), ValueError, "step must be >= 0"),
        (lambda log: log.train(10, True, _metrics(10)), TypeError, "phase must be an int"),
        (
            lambda log: log.train(10, 1, {"loss": 1.0, "bpc": 1.0}),
            ValueError,
            r"missing \['learning_rate', 'tokens_per_second'\]",
        ),
        (
            lambda log: log.train(10, 1, _metrics(10) | {"step": 3}),
            ValueError,
            "metric name 'step' is reserved",
        ),
        (
            lambda log: log.train(10, 1, _metrics(10) | {"hist": np.ones(3)}),
            ValueError,
            "metric 'hist' must be a real scalar",
        ),
        (lambda log: log.eval(10, 1, "", {"bpc": 1.0}), ValueError, "split must be a non-empty string"),
        (lambda log: log.eval(10, 1, "valid", {}), ValueError, "at least one value"),
    ],
)
def test_bad_calls_name_the_argument(tmp_path, call, error, match):
    with _open(tmp_path) as log, pytest.raises(error, match=match):
        call(log)


def test_steps_must_increase_and_closed_log_refuses(tmp_path):
    log = _open(tmp_path)
    log.train(20, 1, _metrics(20))
    with pytest.raises(ValueError, match=r"step 20 is not after step 20 \(the last training step logged"):
        log.train(20, 1, _metrics(20))
    log.close()
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.message("late")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"total_steps": 0}, ValueError, "total_steps must be >= 1"),
        ({"total_steps": 10.0}, TypeError, "total_steps must be an int"),
        ({"phase_starts": ()}, ValueError, "phase_starts must list at least one"),
        ({"phase_starts": (0, 50, 50)}, ValueError, "phase_starts must increase strictly"),
        ({"phase_starts": (0, 100)}, ValueError, r"phase_starts must be < total_steps=100"),
        ({"resume_step": 101}, ValueError, "resume_step must be <= total_steps=100"),
        ({"eta_window": 0}, ValueError, "eta_window must be >= 1"),
        ({"phase_starts": (0, 50.0)}, TypeError, "phase_starts entries must be an int"),
    ],
)
def test_bad_constructor_arguments(tmp_path, kwargs, error, match):
    args = {"total_steps": TOTAL, "phase_starts": PHASES} | kwargs
    with pytest.raises(error, match=match):
        MetricsLog(tmp_path, stream=io.StringIO(), tensorboard=False, **args)
    assert not (tmp_path / METRICS_FILE).exists()


def test_only_loss_learning_rate_and_throughput_are_required(tmp_path):
    with _open(tmp_path) as log:
        log.train(10, 1, {"loss": 1.0, "learning_rate": 1e-3, "tokens_per_second": 10.0})
        with pytest.raises(ValueError, match=r"missing \['loss'\]"):
            log.train(20, 1, {"bpc": 1.0, "learning_rate": 1e-3, "tokens_per_second": 10.0})
