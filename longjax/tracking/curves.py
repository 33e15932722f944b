"""Learning curves: one metric of the training and evaluation records against the step, phases marked.

`plot_curves` reads `workdir/metrics.jsonl` and writes `workdir/curves.png`;
`curves_figure` builds the matplotlib Figure from records. The metric is a
record field, "bpc" by default (the character LM); any other, e.g. "accuracy",
is drawn the same way.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from longjax.tracking.jsonl import METRICS_FILE, read_metrics

CURVES_FILE = "curves.png"
# The gid of the vertical lines `curves_figure` draws at phase starts.
PHASE_LINE_GID = "phase-start"
# Metrics with their own legend name and axis label; others get readable ones from their field name.
_NAMES = {"bpc": ("BPC", "bits per character")}


def curves_figure(records: Sequence[Mapping[str, Any]], *, phase_starts: Sequence[int], metric: str = "bpc"):
    """A matplotlib Figure of the training and evaluation `metric` against the step.

    Args:
      records: records as `read_metrics` returns them; the `metric` field of
        "train" records and of "eval" records (one line per split) is drawn.
      phase_starts: the step at which each phase starts; a vertical line with
        gid `PHASE_LINE_GID`, labelled "phase k", marks each.
      metric: the record field to draw. The curves are labelled "train <name>"
        and "<split> <name>": "BPC" for bpc (axis "bits per character"), the
        field upper-cased for a short one such as "f1", else the field with
        spaces for underscores (e.g. "accuracy").

    Non-finite values are left as gaps. The figure is not registered with
    pyplot, so nothing global changes and nothing needs closing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a non-empty record field name, got {metric!r}")
    starts = [int(s) for s in phase_starts]
    if not starts:
        raise ValueError("phase_starts must list at least one phase start, got none")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        if metric not in record:
            continue
        kind = record.get("kind")
        if kind == "train":
            name = "train"
        elif kind == "eval":
            name = str(record.get("split"))
        else:
            continue
        steps, values = series.setdefault(name, ([], []))
        steps.append(record["step"])
        value = float(record[metric])
        values.append(value if math.isfinite(value) else math.nan)
    if not series:
        raise ValueError(f"records hold no 'train' or 'eval' record with a {metric!r} value; nothing to plot")

    label, axis_label = _names(metric)
    fig = Figure(figsize=(10, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (steps, values) in series.items():
        if name == "train":
            marker = "." if len(steps) == 1 else None
            ax.plot(steps, values, label=f"train {label}", linewidth=1.0, marker=marker)
        else:  # evaluations are sparse: show each point
            ax.plot(steps, values, label=f"{name} {label}", linewidth=1.0, marker="o", markersize=3)
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
    ax.set_ylabel(axis_label)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot_curves(
    workdir: str | os.PathLike,
    *,
    phase_starts: Sequence[int],
    path: str | os.PathLike | None = None,
    metric: str = "bpc",
) -> pathlib.Path:
    """Writes a PNG of the run's training and evaluation curves of `metric` and returns its path.

    Args:
      workdir: the run's directory, holding metrics.jsonl.
      phase_starts: the step at which each phase starts (marked "phase k").
      path: the PNG to write; default `workdir/curves.png`.
      metric: the record field to draw, as in `curves_figure`; default "bpc".
    """
    records = read_metrics(workdir)
    if not records:
        raise ValueError(f"no metrics records in {pathlib.Path(workdir) / METRICS_FILE}; nothing to plot")
    fig = curves_figure(records, phase_starts=phase_starts, metric=metric)
    out = pathlib.Path(workdir) / CURVES_FILE if path is None else pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _names(metric: str) -> tuple[str, str]:
    """(legend name, axis label) of a metric."""
    if metric in _NAMES:
        return _NAMES[metric]
    name = metric.upper() if len(metric) <= 3 else metric.replace("_", " ")
    return name, name
