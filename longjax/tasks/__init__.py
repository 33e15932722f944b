"""Tasks of the training run, selected by name: `config.task = 'char_lm'` is `longjax.tasks.char_lm`.

A name without a dot is a module of this package; a dotted name is any
importable module (a researcher's own task outside longjax). The module
defines `TASK`, an instance of `longjax.tasks.base.Task`.
"""

from __future__ import annotations

import importlib
import pkgutil

from longjax import sections
from longjax.tasks.base import EvalSection, Evaluator, Task, TrainBatches


def available() -> tuple[str, ...]:
    """The tasks in this package."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.endswith("base")))


def get(name: str) -> Task:
    """The task named `name`.

    Raises:
      sections.ConfigError: no such module, or it defines no `TASK`.
    """
    if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
        raise sections.ConfigError(f"task must be a task module's name, one of {list(available())}, got {name!r}")
    module_name = name if "." in name else f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):
            raise  # the task module exists but imports something missing
        raise sections.ConfigError(
            f"task must be one of {list(available())} or an importable module's dotted name, got {name!r}"
        ) from None
    task = getattr(module, "TASK", None)
    if not isinstance(task, Task):
        raise sections.ConfigError(
            f"task {name!r}: module {module_name} must define TASK, a longjax.tasks.base.Task instance"
        )
    return task


__all__ = ["EvalSection", "Evaluator", "Task", "TrainBatches", "available", "get"]
