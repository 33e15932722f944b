"""`python -m longjax.summarize --workdir=DIR [--split=test] [--step=N] [--limit=N] [--config.decode.<field>=V ...]`.

Summarises a split with a summarization run's checkpoint: rebuilds the task
from the config saved with it, replaces its `decode` (and `eval`) fields by
the `--config.decode.*` / `--config.eval.*` flags (e.g. `num_beams=4`,
`length_penalty=2.0`, `early_stopping=never`, `max_length=512`), generates,
and writes `<workdir>/predictions_<split>_<step>.txt` (one summary per line,
in split order) and `<workdir>/summaries_<split>_<step>.json` (ROUGE-1/2/L/Lsum,
the settings used); prints both.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import jax
from absl import flags

from longjax import cli, run, tasks
from longjax.sections import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "the summarization run's directory")
_SPLIT = flags.DEFINE_string("split", "test", "which split to summarise")
_STEP = flags.DEFINE_integer("step", None, "the checkpoint to use (default: the newest)")
_LIMIT = flags.DEFINE_integer("limit", None, "summarise only the first N papers of the split")
flags.mark_flags_as_required(["workdir"])

_SECTIONS = ("decode", "eval")
_overrides: dict[str, dict] = {}


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, dict]]:
    """(`argv` without its `--config.<decode|eval>.<field>=<value>` arguments, those as {section: {field: value}}).

    Values are Python literals (4, 2.0, True, None) or, failing that, strings ('never').
    """
    kept, overrides = [], {}
    for arg in argv:
        if not arg.startswith("--config."):
            kept.append(arg)
            continue
        path, sep, text = arg[len("--config."):].partition("=")
        section, _, field = path.partition(".")
        if not sep or section not in _SECTIONS or not field or "." in field:
            raise ConfigError(f"{arg}: expected --config.<{'|'.join(_SECTIONS)}>.<field>=<value>")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        overrides.setdefault(section, {})[field] = value
    return kept, overrides


def main(argv):
    cli.start(argv)
    result = cli.report_failures(lambda: run.evaluate_checkpoint(
        _WORKDIR.value, _SPLIT.value, step=_STEP.value, limit=_LIMIT.value, overrides=_overrides))
    if result["task"] != "summarization" or "predictions" not in result:
        print(f"error: {_WORKDIR.value} is a {result['task']} run; summarize needs a summarization run", flush=True)
        sys.exit(1)
    if jax.process_index() == 0:
        out = Path(_WORKDIR.value) / f"summaries_{result['split']}_{result['step']}.json"
        out.write_text(json.dumps(dict(result, overrides=_overrides), indent=1))
    print(f"step {result['step']} | {tasks.get(result['task']).summary(result['split'], result)}", flush=True)
    print(f"summaries: {result['predictions']}", flush=True)


if __name__ == "__main__":
    try:
        sys.argv, parsed = split_overrides(sys.argv)
    except ConfigError as e:  # before absl parses the flags, so printed here
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    _overrides.update(parsed)
    cli.main(main)
