"""The JSONL records of MetricsLog: contents, resume truncation and reading back."""

from __future__ import annotations

import io
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from longjax.tracking import METRICS_FILE, read_metrics
from tests.tracking.helpers import TOTAL, _metrics, _open, _run, _without_time


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
