"""The TensorBoard sink: scalars written with tensorboardX under `workdir/tensorboard`.

Training metrics go to `train/<name>` (with the phase as `train/phase`),
evaluations to `<split>/<name>`, each at the training step.

Resuming: a run restarted from its checkpoint at step R writes a new event file
with `purge_step=R + 1` when earlier files exist, so TensorBoard hides the
events the previous run logged after that checkpoint.
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Mapping

TENSORBOARD_DIR = "tensorboard"


class TensorBoardSink:
    """Writes scalars to a new event file in `workdir/tensorboard`.

    Args:
      workdir: the run's directory (existing).
      resume_step: the step of the checkpoint the run resumes from (0: from scratch).
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int):
        from tensorboardX import SummaryWriter

        tb_dir = pathlib.Path(workdir) / TENSORBOARD_DIR
        stale = tb_dir.is_dir() and any(tb_dir.iterdir())
        # purge_step makes TensorBoard drop the earlier files' events at steps
        # >= resume_step + 1, which the crashed run logged after its checkpoint.
        # tensorboardX names files by the second and opens them with "wb": a run
        # resumed within the same second would overwrite its predecessor's file.
        # The nanosecond suffix keeps the names distinct and in time order.
        self._writer = SummaryWriter(
            str(tb_dir),
            purge_step=resume_step + 1 if stale else None,
            flush_secs=30,
            filename_suffix=f".{time.time_ns()}",
        )

    def train(self, step: int, phase: int, values: Mapping[str, float | int]) -> None:
        self._writer.add_scalar("train/phase", phase, step)
        for name, value in values.items():
            self._writer.add_scalar(f"train/{name}", value, step)

    def eval(self, step: int, phase: int, split: str, values: Mapping[str, float | int]) -> None:
        for name, value in values.items():
            self._writer.add_scalar(f"{split}/{name}", value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
