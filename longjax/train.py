"""`python -m longjax.train --config=configs/enwik8_small.py --workdir=DIR`.

This file is intentionally kept short: flags in, `longjax.run.train` out.
Override any config field with `--config.a.b=value` (`=None` too); running
the same command again resumes from the workdir's newest checkpoint. A
failure prints one `error:` line (`--verbose` adds the traceback) and exits 1.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from longjax import cli, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and plots")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    cli.start(argv)

    def train():
        cli.apply_nones(_CONFIG.value)
        # The whole config is checked before the workdir, the data or any device is touched.
        plan = run.parse(_CONFIG.value)
        return run.train(plan, _WORKDIR.value)

    cli.report_failures(train)


if __name__ == "__main__":
    cli.main(main)
