"""`python -m longjax.train --config=configs/enwik8_small.py --workdir=DIR`.

This file is intentionally kept short: flags in, `trainer.train_and_evaluate` out.
Override any config field with `--config.a.b=value`; running the same command
again resumes from the workdir's newest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from longjax import checkpointing, cli, experiment, trainer
from longjax.data import corpora

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and plots")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    cli.start(argv)
    try:
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (experiment.ConfigError, corpora.CorpusError, trainer.ConfigChangedError,
            checkpointing.CheckpointError, trainer.NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
