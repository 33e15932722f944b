"""Curve plots of the metrics records: the figure's lines and labels, and the PNG."""

from __future__ import annotations

import numpy as np
import pytest

from longjax.tracking import PHASE_LINE_GID, curves_figure, plot_curves, read_metrics
from tests.tracking.helpers import PHASES, TOTAL, _metrics, _open, _run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def test_curves_of_another_metric(tmp_path):
    with _open(tmp_path) as log:
        for step in range(10, TOTAL + 1, 10):
            log.train(step, 1 + (step > 60), {"loss": 1.0, "accuracy": step / 200,
                                             "learning_rate": 1e-3, "tokens_per_second": 10.0})
            if step % 50 == 0:
                log.eval(step, 1 + (step > 60), "valid", {"accuracy": step / 100, "loss": 1.0})
    records = read_metrics(tmp_path)
    (ax,) = curves_figure(records, phase_starts=PHASES, metric="accuracy").axes
    curves = {line.get_label(): line for line in ax.lines if line.get_gid() != PHASE_LINE_GID}
    assert set(curves) == {"train accuracy", "valid accuracy"}
    assert ax.get_ylabel() == "accuracy"
    np.testing.assert_array_equal(curves["valid accuracy"].get_xdata(), [50, 100])
    np.testing.assert_allclose(curves["train accuracy"].get_ydata(), [s / 200 for s in range(10, 101, 10)])
    path = plot_curves(tmp_path, phase_starts=PHASES, metric="accuracy", path=tmp_path / "accuracy.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    # The default metric is bpc, which these records do not hold.
    with pytest.raises(ValueError, match="no 'train' or 'eval' record with a 'bpc' value; nothing to plot"):
        plot_curves(tmp_path, phase_starts=PHASES)


def test_bpc_curves_are_in_bits_per_character(tmp_path):
    with _open(tmp_path) as log:
        _run(log, range(10, 41, 10))
    (ax,) = curves_figure(read_metrics(tmp_path), phase_starts=PHASES).axes
    assert ax.get_ylabel() == "bits per character"
    (ax,) = curves_figure(read_metrics(tmp_path), phase_starts=PHASES, metric="loss").axes
    labels = {line.get_label() for line in ax.lines if line.get_gid() != PHASE_LINE_GID}
    assert labels == {"train loss", "valid loss"} and ax.get_ylabel() == "loss"
