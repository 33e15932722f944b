"""Console lines, ETA, JSONL records, resume truncation, TensorBoard events and curve plots of MetricsLog."""

from __future__ import annotations

import io
import json
import math
import re
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from longjax.metrics_log import (
    METRICS_FILE,
    PHASE_LINE_GID,
    TENSORBOARD_DIR,
    MetricsLog,
    curves_figure,
    format_duration,
    plot_curves,
    read_metrics,
)

PHASES = (0, 60)
TOTAL = 100
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def _events(workdir) -> list:
    """Every Event in the TensorBoard files, parsed from the TFRecord framing (u64 length, crc, data, crc)."""
    events = []
    for path in sorted((workdir / TENSORBOARD_DIR).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


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


def test_jsonl_records_train_and_eval(tmp_path):
    log = _open(tmp_path, stream=io.StringIO())
    # Steps and values may come straight from jax or numpy; the records hold Python numbers.
    log.train(
        jnp.int32(10),
        np.int64(1),
        {
            "loss": np.float32(0.5),
            "bpc": jnp.float32(0.75),
            "learning_rate": 1e-3,
            "tokens_per_second": 1000,
            "grad_norm": jnp.array(2.0),
        },
    )
    log.eval(10, 1, "valid", {"bpc": 1.5, "loss": 1.0, "chars": np.int64(5_000_000)})
    log.close()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert _without_time(records) == [
        {
            "kind": "train",
            "step": 10,
            "phase": 1,
            "loss": 0.5,
            "bpc": 0.75,
            "learning_rate": 1e-3,
            "tokens_per_second": 1000,
            "grad_norm": 2.0,
        },
        {
            "kind": "eval",
            "step": 10,
            "phase": 1,
            "split": "valid",
            "bpc": 1.5,
            "loss": 1.0,
            "chars": 5_000_000,
        },
    ]
    assert isinstance(records[1]["chars"], int) and isinstance(records[0]["step"], int)
    assert all(isinstance(r["time"], float) and r["time"] > 1.7e9 for r in records)
    assert list(records[0])[:3] == ["kind", "step", "phase"] and list(records[0])[-1] == "time"


def test_eval_line(tmp_path):
    stream = io.StringIO()
    with _open(tmp_path, stream=stream) as log:
        log.eval(80, 2, "test", {"chars": 1000, "loss": 0.7, "bpc": 1.01})
        log.message("saved checkpoint 80")
    assert stream.getvalue().splitlines() == [
        "phase 2/2 | step  80/100 | eval test | bpc 1.0100 | loss 0.7000 | chars 1000",
        "saved checkpoint 80",
    ]


@pytest.mark.parametrize("resume_step", [0, 30, 40])
def test_resume_removes_records_after_the_checkpoint(tmp_path, resume_step):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    with _open(reference) as log:
        _run(log, range(10, TOTAL + 1, 10))

    log = _open(crashed)
    _run(log, range(10, 71, 10))  # checkpoint at resume_step, crash at step 70
    log.close()
    with open(crashed / METRICS_FILE, "a") as f:
        f.write('{"kind": "train", "step": 80, "ph')  # a record cut short by the crash
    before = (crashed / METRICS_FILE).read_text().splitlines()

    log = _open(crashed, resume_step=resume_step)
    after = (crashed / METRICS_FILE).read_text()
    assert after.endswith("\n") or after == ""
    kept = [line for line in before[:-1] if json.loads(line)["step"] <= resume_step]
    assert after.splitlines() == kept  # verbatim: the kept lines are not re-serialised
    if resume_step:  # the resumed loop must not log the checkpoint's step again
        with pytest.raises(ValueError, match=f"step {resume_step} is not after step {resume_step} "):
            log.train(resume_step, 1, _metrics(resume_step))
    _run(log, range(resume_step + 10, TOTAL + 1, 10))
    log.close()
    assert _without_time(read_metrics(crashed)) == _without_time(read_metrics(reference))


def test_resume_leaves_a_clean_file_alone(tmp_path):
    with _open(tmp_path) as log:
        _run(log, range(10, 31, 10))
    path = tmp_path / METRICS_FILE
    stat = path.stat()
    _open(tmp_path, resume_step=30).close()
    assert path.stat().st_ino == stat.st_ino and path.stat().st_mtime_ns == stat.st_mtime_ns


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


def test_read_metrics_round_trips_non_finite_values(tmp_path):
    assert read_metrics(tmp_path) == []
    values = {"loss": math.nan, "bpc": math.inf, "learning_rate": -math.inf, "tokens_per_second": 1.0}
    with _open(tmp_path) as log:
        log.train(10, 1, values)
        log.eval(10, 1, "valid", {"bpc": math.nan})
    text = (tmp_path / METRICS_FILE).read_text()
    assert '"loss": NaN' in text and '"bpc": Infinity' in text and '"learning_rate": -Infinity' in text
    train, evaluation = read_metrics(tmp_path)
    assert math.isnan(train["loss"]) and train["bpc"] == math.inf and train["learning_rate"] == -math.inf
    assert math.isnan(evaluation["bpc"])

    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"kind": "tr')  # unterminated: not a record yet
    assert len(read_metrics(tmp_path)) == 2
    (tmp_path / METRICS_FILE).write_text(text + "garbage\n" + text)
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not a JSON record"):
        read_metrics(tmp_path)


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    with _open(tmp_path, tensorboard=True) as log:
        _run(log, range(10, 41, 10))
    scalars = {(v.tag, e.step): v.simple_value for e in _events(tmp_path) for v in e.summary.value}
    assert scalars[("train/bpc", 30)] == pytest.approx(_metrics(30)["bpc"])
    assert scalars[("train/learning_rate", 10)] == pytest.approx(2.5e-4)
    assert scalars[("train/phase", 40)] == 1
    assert scalars[("valid/bpc", 20)] == pytest.approx(2.3)
    assert {tag for tag, _ in scalars} == {
        "train/loss",
        "train/bpc",
        "train/learning_rate",
        "train/tokens_per_second",
        "train/phase",
        "valid/bpc",
        "valid/loss",
        "valid/chars",
    }
    assert not any(e.HasField("session_log") for e in _events(tmp_path))

    with _open(tmp_path, tensorboard=True, resume_step=20) as log:
        _run(log, range(30, 41, 10))
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    # TensorBoard drops earlier events at steps >= the START event's step.
    starts = [e.step for e in _events(tmp_path) if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [21]


def test_curves_figure_marks_every_phase(tmp_path):
    with _open(tmp_path) as log:
        _run(log, range(10, TOTAL + 1, 10))
    fig = curves_figure(read_metrics(tmp_path), phase_starts=(0, 40, 60))
    (ax,) = fig.axes
    boundaries = [line for line in ax.lines if line.get_gid() == PHASE_LINE_GID]
    assert [line.get_xdata()[0] for line in boundaries] == [0, 40, 60]
    assert [t.get_text().strip() for t in ax.texts] == ["phase 1", "phase 2", "phase 3"]
    curves = {line.get_label(): line for line in ax.lines if line.get_gid() != PHASE_LINE_GID}
    assert set(curves) == {"train BPC", "valid BPC"}
    np.testing.assert_array_equal(curves["valid BPC"].get_xdata(), [20, 40, 60, 80, 100])
    np.testing.assert_allclose(
        curves["train BPC"].get_ydata(), [_metrics(s)["bpc"] for s in range(10, 101, 10)]
    )


def test_plot_curves_writes_a_png(tmp_path):
    with _open(tmp_path) as log:
        _run(log, range(10, TOTAL + 1, 10))
    path = plot_curves(tmp_path, phase_starts=PHASES)
    assert path == tmp_path / "curves.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    other = plot_curves(tmp_path, phase_starts=PHASES, path=tmp_path / "plots" / "c.png")
    assert other.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_curves(tmp_path / "empty", phase_starts=PHASES)


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


def test_format_duration():
    assert (
        format_duration(None) == "?" and format_duration(math.inf) == "?" and format_duration(math.nan) == "?"
    )
    assert format_duration(0.4) == "0:00:00"
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(3 * 3600 + 7 * 60 + 5) == "3:07:05"
    assert format_duration(2 * 86400 + 3600 + 1) == "2d 01:00:01"
    assert re.fullmatch(r"\d+d \d\d:\d\d:\d\d", format_duration(1e7))
