"""The training run every task shares: a typed plan, one set-up, the phase loop and its hooks, checkpoints.

    plan = longjax.run.parse(config)          # ExperimentPlan: typed, validated; touches nothing
    result = longjax.run.train(plan, workdir)  # resume, else init_from, else scratch; then every phase
    metrics = longjax.run.evaluate_checkpoint(workdir, 'test')
"""

from longjax.run.errors import (
    CheckpointError,
    ConfigChangedError,
    ConfigError,
    DeviceError,
    InitFromError,
    NonFiniteLossError,
    RunError,
)
from longjax.run.evaluation import evaluate_checkpoint
from longjax.run.loop import RunResult, train
from longjax.run.plan import ExperimentPlan, Phase, parse
from longjax.run.setup import Run, setup

__all__ = [
    "CheckpointError",
    "ConfigChangedError",
    "ConfigError",
    "DeviceError",
    "ExperimentPlan",
    "InitFromError",
    "NonFiniteLossError",
    "Phase",
    "Run",
    "RunError",
    "RunResult",
    "evaluate_checkpoint",
    "parse",
    "setup",
    "train",
]
