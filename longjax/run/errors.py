"""Why a run stops early: errors whose message names the cause and the remedy, printed as one line."""

from __future__ import annotations

from longjax.sections import ConfigError


def brief(error: BaseException, limit: int = 200) -> str:
    """`Type: first line` of an error, cut at `limit` characters: storage errors embed pages of specs."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(" See full TensorStore details")[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class RunError(Exception):
    """A run cannot go on for a reason the user can fix; the message says what to do."""


class ConfigChangedError(RunError, ValueError):
    """The workdir's checkpoint was written with another config."""


class CheckpointError(RunError, RuntimeError):
    """Checkpoints exist but none (or not the one asked for) can be restored."""


class NonFiniteLossError(RunError, RuntimeError):
    """The training loss became NaN or Inf; the last good checkpoint is left as it was."""


class InitFromError(RunError, ValueError):
    """`init_from` names no usable checkpoint, or its parameters do not fit the model."""


class DeviceError(RunError, ConfigError):
    """The config does not fit the devices this run has (batch sizes, mesh shape)."""


__all__ = [
    "brief",
    "CheckpointError", "ConfigChangedError", "ConfigError", "DeviceError", "InitFromError",
    "NonFiniteLossError", "RunError",
]
