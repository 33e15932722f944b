"""TensorBoard events of MetricsLog: scalar tags and values, and the purge step on resume."""

from __future__ import annotations

import struct

import pytest
from tensorboardX.proto import event_pb2

from longjax.tracking import TENSORBOARD_DIR
from tests.tracking.helpers import _metrics, _open, _run


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
