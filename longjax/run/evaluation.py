"""`evaluate_checkpoint`: the task's evaluator on a checkpoint of a run, behind `python -m longjax.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections

from longjax import tasks
from longjax.run import checkpointing, plan as plan_lib
from longjax.run.setup import setup
from longjax.sections import ConfigError


def evaluate_checkpoint(workdir, split: str | None = None, *, step: int | None = None,
                        limit: int | None = None, overrides: dict[str, dict] | None = None) -> dict:
    """Scores `split` with checkpoint `step` (the newest when None) of the run in `workdir`.

    The model, data and evaluator are rebuilt from the config saved in the
    checkpoint, with the model of the phase the checkpoint was saved in.

    Args:
      workdir: the training run's directory.
      split: one of the task's splits; None: its validation split.
      step: the checkpoint; None: the newest.
      limit: score only the first `limit` units of the split (the task's unit:
        characters for `char_lm`); None: all of it.
      overrides: `{section: {field: value}}` replacing fields of the saved
        config before it is parsed (e.g. summarization's `decode` settings);
        they are checked as the config's own fields are.

    Returns:
      `{'task', 'step', 'phase' (1-based), 'split', **the evaluator's metrics}`,
      plus 'predictions', the file the evaluator wrote its predictions to,
      for evaluators that write them (`write_predictions(stem) -> path`, called
      on process 0 after scoring: e.g. TriviaQA's official `{QuestionId: answer}` JSON).

    Raises:
      CheckpointError: no such checkpoint, or it does not restore;
      ConfigError: the saved config no longer parses, or `split` is not the task's.
    """
    checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
    try:
        meta = checkpointer.meta(checkpointer.resolve_step(step))
    finally:
        checkpointer.close()
    saved = json.loads(meta["config"])
    for section, fields in (overrides or {}).items():
        saved.setdefault(section, {})
        if not isinstance(saved[section], dict):
            raise ConfigError(f"overrides: {section} is not a section of the saved config")
        saved[section].update(fields)
    plan = plan_lib.parse(ml_collections.ConfigDict(saved))
    task = tasks.get(plan.task)
    split = task.validation_split if split is None else split
    if split not in task.splits:
        raise ConfigError(f"split must be one of the {plan.task} task's {list(task.splits)}, got {split!r}")
    with setup(plan, workdir, evaluate=True, step=meta["step"]) as run:
        phase = plan.phases[meta["phase"]]
        evaluator = run.task.evaluator(plan, run.data, phase, run.mesh)
        metrics = evaluator(run.state.params, split, trained_steps=run.step, limit=limit)
        extra = {}
        write_predictions = getattr(evaluator, "write_predictions", None)
        if write_predictions is not None and jax.process_index() == 0:
            path = write_predictions(Path(workdir) / f"predictions_{split}_{run.step}")
            extra["predictions"] = str(path)
    return {"task": plan.task, "step": run.step, "phase": phase.index + 1, "split": split, **metrics, **extra}
