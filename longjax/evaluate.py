"""`python -m longjax.evaluate --workdir=DIR [--split=test] [--step=N] [--limit=N]`: a run's checkpoint, scored.

Rebuilds the task, its model and data from the config saved in the
checkpoint (the newest unless `--step` is given), restores its parameters and
runs the task's evaluator on the split (for `char_lm`: BPC with the
Transformer-XL protocol, the windows of the phase the checkpoint was saved
in). Writes `<workdir>/eval_<split>_<step>.json` and prints the result; tasks
that predict something (classification labels, QA answers) also write their
predictions, `<workdir>/predictions_<split>_<step>.<ext>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from absl import flags

from longjax import cli, run, tasks

_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's directory")
_SPLIT = flags.DEFINE_string("split", None, "which split to score (default: the task's validation split)")
_STEP = flags.DEFINE_integer("step", None, "the checkpoint to score (default: the newest)")
_LIMIT = flags.DEFINE_integer("limit", None, "score only the first N units of the split (char_lm: characters)")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    cli.start(argv)
    result = cli.report_failures(
        lambda: run.evaluate_checkpoint(_WORKDIR.value, _SPLIT.value, step=_STEP.value, limit=_LIMIT.value)
    )
    if jax.process_index() == 0:
        out = Path(_WORKDIR.value) / f"eval_{result['split']}_{result['step']}.json"
        out.write_text(json.dumps(result, indent=1))
    task = tasks.get(result["task"])
    print(f"step {result['step']} (phase {result['phase']}) | {task.summary(result['split'], result)}", flush=True)
    if "predictions" in result:
        print(f"predictions: {result['predictions']}", flush=True)


if __name__ == "__main__":
    cli.main(main)
