"""What the command-line entry points (`longjax.train`, `longjax.evaluate`) share."""

from __future__ import annotations

from absl import app, flags, logging


def start(argv) -> None:
    """Refuses positional arguments and, unless --verbosity is given, keeps library INFO logs quiet.

    Orbax reports every save at INFO; the commands print their own progress lines.
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
