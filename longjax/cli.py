"""What the command-line entry points (`longjax.train`, `longjax.evaluate`) share.

* `main(fn)`: runs an absl main; `--config.<field>=None` sets a field to None
  (absl cannot parse None for an int or str field, and a str field would get
  the string 'None').
* `report_failures(fn)`: a failure prints one line, `error: <cause and remedy>`,
  and exits 1; `--verbose` adds the traceback.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging

from longjax.data import DataError
from longjax.run import RunError
from longjax.run.errors import brief
from longjax.sections import ConfigError

_VERBOSE = flags.DEFINE_bool("verbose", False, "on failure, print the full traceback after the error line")
_NONE_PREFIX = "--config."
# Failures whose message already says what went wrong and what to do.
_EXPECTED = (RunError, ConfigError, DataError)

_none_fields: list[str] = []


def main(main_fn: Callable) -> None:
    """`app.run(main_fn)`, with `--config.<field>=None` arguments taken out and kept for `apply_nones`."""
    # config_flags reads its overrides from sys.argv itself.
    sys.argv, fields = split_none_overrides(sys.argv)
    _none_fields.extend(fields)
    app.run(main_fn)


def split_none_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(`argv` without its `--config.<field>=None` arguments, those fields' dotted paths)."""
    kept, fields = [], []
    for arg in argv:
        if arg.startswith(_NONE_PREFIX) and arg.endswith("=None"):
            fields.append(arg[len(_NONE_PREFIX):-len("=None")])
        else:
            kept.append(arg)
    return kept, fields


def apply_nones(config, fields: list[str] | None = None) -> None:
    """Sets `fields` (default: those given as `--config.<field>=None`) of `config` to None.

    Raises:
      ConfigError: a field that the config does not have.
    """
    for path in _none_fields if fields is None else fields:
        *parents, name = path.split(".")
        node = config
        for part in parents:
            node = node.get(part) if hasattr(node, "get") else None
        if node is None or not hasattr(node, "get") or name not in node:
            raise ConfigError(f"--config.{path}=None: the config has no field {path}")
        node[name] = None


def start(argv) -> None:
    """Refuses positional arguments and, unless --verbosity is given, keeps library INFO logs quiet.

    Orbax reports every save at INFO; the commands print their own progress lines.
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def report_failures(fn: Callable):
    """`fn()`; if it raises, prints `error: ...` as one line (with the traceback under --verbose) and exits 1."""
    try:
        return fn()
    except _EXPECTED as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - any failure ends in one line; --verbose shows where
        _fail(f"{brief(e)} (an unexpected failure: rerun with --verbose for the traceback)")


def _fail(message: str) -> None:
    if _VERBOSE.value:
        traceback.print_exc()
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(1)
