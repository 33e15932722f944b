"""Training progress and metrics: one sink per module, and `MetricsLog` fanning calls out to them.

* `metrics_log`: `MetricsLog`, which checks each `train`/`eval`/`message`
  call once and passes it to the sinks (primary process only);
* `console`: a plain-text line per call, with a progress bar and an ETA;
* `tensorboard`: tensorboardX scalars under `workdir/tensorboard`;
* `jsonl`: a JSON record per line in `workdir/metrics.jsonl`, truncated on
  resume; `read_metrics` reads it back;
* `curves`: learning curves of one metric (BPC by default) as a PNG.
"""

from longjax.tracking.console import format_duration
from longjax.tracking.curves import CURVES_FILE, PHASE_LINE_GID, curves_figure, plot_curves
from longjax.tracking.jsonl import METRICS_FILE, read_metrics
from longjax.tracking.metrics_log import TRAIN_REQUIRED, MetricsLog
from longjax.tracking.tensorboard import TENSORBOARD_DIR

__all__ = [
    "CURVES_FILE",
    "METRICS_FILE",
    "PHASE_LINE_GID",
    "TENSORBOARD_DIR",
    "TRAIN_REQUIRED",
    "MetricsLog",
    "curves_figure",
    "format_duration",
    "plot_curves",
    "read_metrics",
]
