"""Experiment configs: validation and the staged-training plan derived from them.

An experiment config (`configs/*.py`, `get_config()` -> `ml_collections.ConfigDict`)
has these sections:

    seed                   every random choice of the run derives from it
    model                  `longjax.models.transformer_config` fields (phase-1 windows)
    data                   name ('enwik8' | 'text8' | 'pydoc_topics'), dir, download
    phases                 lists, one entry per phase: seq_len, batch_size, steps,
                           learning_rate, window_scale
    optimizer              AdamW: b1, b2, eps, weight_decay, grad_clip_norm,
                           warmup_fraction, max_warmup_steps
    eval                   seq_len, step, batch_size, every_steps, max_chars
    checkpoint             every_steps, keep, async_save
    log_every_steps        console / TensorBoard / JSONL interval
    distributed            call jax.distributed.initialize() (multi-host)
    allow_config_change    resume even if the saved config differs

`validate(config)` runs before anything else; `plan(config)` turns it into one
`Phase` per training phase, each with the model config of that phase: every
sliding-window layer's window multiplied by the phase's `window_scale` and
clipped to its sequence length.
"""

from __future__ import annotations

import dataclasses
import math

from longjax import models
from longjax.data import corpora
from longjax.models import config as model_config

PHASE_FIELDS = ("seq_len", "batch_size", "steps", "learning_rate", "window_scale")
_SECTIONS = {
    "seed", "model", "data", "phases", "optimizer", "eval", "checkpoint",
    "log_every_steps", "distributed", "allow_config_change",
}


class ConfigError(ValueError):
    """An experiment config contradicts itself; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training phase.

    Attributes:
      index: 0-based phase number.
      start_step, end_step: global steps `[start_step, end_step)` of the phase.
      seq_len, batch_size, learning_rate: the phase's settings (batch is global).
      warmup_steps: linear warmup at the phase start; the rate is then constant.
      model: the phase's model config (windows scaled and clipped).
    """

    index: int
    start_step: int
    end_step: int
    seq_len: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    model: models.TransformerConfig

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")


def _positive_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _phase_lists(config) -> dict[str, tuple]:
    phases = config.phases
    lists = {}
    for field in PHASE_FIELDS:
        if field not in phases:
            raise ConfigError(f"phases.{field} is missing: give one value per phase")
        value = phases[field]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"phases.{field} must be a non-empty list (one value per phase), got {value!r}")
        lists[field] = tuple(value)
    lengths = {field: len(values) for field, values in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"phases lists must have equal lengths (one value per phase), got {lengths}")
    unknown = sorted(set(phases) - set(PHASE_FIELDS))
    if unknown:
        raise ConfigError(f"phases: unknown field(s) {unknown}; the fields are {list(PHASE_FIELDS)}")
    for p in range(lengths["seq_len"]):
        for field in ("seq_len", "batch_size", "steps", "window_scale"):
            _positive_int(f"phases.{field}[{p}]", lists[field][p])
        _positive_number(f"phases.learning_rate[{p}]", lists["learning_rate"][p])
    return lists


def phase_model(base: models.TransformerConfig, *, window_scale: int, seq_len: int) -> models.TransformerConfig:
    """The model config of a phase: sliding windows times `window_scale`, clipped to `seq_len`."""
    layers = []
    for attention in base.attention:
        if isinstance(attention, models.SlidingWindowAttention):
            window = attention.window
            if isinstance(window, tuple):
                window = tuple(min(w * window_scale, seq_len) for w in window)
            else:
                window = min(window * window_scale, seq_len)
            attention = dataclasses.replace(attention, window=window)
        layers.append(attention)
    return dataclasses.replace(base, attention=tuple(layers))


def validate(config) -> None:
    """Rejects contradictory or incomplete experiment configs; the message names the field."""
    unknown = sorted(set(config) - _SECTIONS)
    if unknown:
        raise ConfigError(f"unknown top-level field(s) {unknown}; the sections are {sorted(_SECTIONS)}")
    missing = sorted(_SECTIONS - set(config))
    if missing:
        raise ConfigError(f"missing top-level field(s) {missing}")
    if not isinstance(config.seed, int) or config.seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {config.seed!r}")
    try:
        base = models.transformer_config(config.model)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    lists = _phase_lists(config)
    if any(s != 1 for s in lists["window_scale"]) and not any(
        isinstance(a, models.SlidingWindowAttention) for a in base.attention
    ):
        raise ConfigError(
            "phases.window_scale scales sliding-window layers, but model.attention has none: set it to 1s"
        )
    max_seq = max(lists["seq_len"] + (config.eval.seq_len,))
    if base.position == "learned" and base.max_positions < max_seq:
        raise ConfigError(
            f"model.max_positions ({base.max_positions}) is shorter than the longest sequence ({max_seq})"
        )

    names = sorted(corpora.CORPORA) + [corpora.EMBEDDED_CORPUS]
    if config.data.name not in names:
        raise ConfigError(f"data.name must be one of {names}, got {config.data.name!r}")
    alphabet = 256 if config.data.name != "text8" else len(corpora.CORPORA["text8"].alphabet)
    if base.vocab_size < alphabet:
        raise ConfigError(
            f"model.vocab_size ({base.vocab_size}) is smaller than the {config.data.name} alphabet ({alphabet})"
        )

    opt = config.optimizer
    for name in ("b1", "b2"):
        if not 0 <= opt[name] < 1:
            raise ConfigError(f"optimizer.{name} must be in [0, 1), got {opt[name]!r}")
    _positive_number("optimizer.eps", opt.eps)
    if opt.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay must be >= 0, got {opt.weight_decay!r}")
    _positive_number("optimizer.grad_clip_norm", opt.grad_clip_norm)
    if not 0 <= opt.warmup_fraction <= 1:
        raise ConfigError(f"optimizer.warmup_fraction must be in [0, 1], got {opt.warmup_fraction!r}")
    if not isinstance(opt.max_warmup_steps, int) or opt.max_warmup_steps < 0:
        raise ConfigError(f"optimizer.max_warmup_steps must be an int >= 0, got {opt.max_warmup_steps!r}")

    ev = config.eval
    _positive_int("eval.seq_len", ev.seq_len)
    _positive_int("eval.step", ev.step)
    if ev.step > ev.seq_len:
        raise ConfigError(f"eval.step ({ev.step}) must not exceed eval.seq_len ({ev.seq_len})")
    _positive_int("eval.batch_size", ev.batch_size)
    if ev.every_steps is not None:
        _positive_int("eval.every_steps", ev.every_steps)
    if ev.max_chars is not None:
        _positive_int("eval.max_chars", ev.max_chars)
        if ev.max_chars < 2:
            raise ConfigError(f"eval.max_chars must be >= 2, got {ev.max_chars}")
    _positive_int("checkpoint.every_steps", config.checkpoint.every_steps)
    _positive_int("checkpoint.keep", config.checkpoint.keep)
    _positive_int("log_every_steps", config.log_every_steps)

    import jax  # deferred: configs must validate before JAX starts its backends

    for p, batch in enumerate(lists["batch_size"]):
        if batch % jax.process_count():
            raise ConfigError(
                f"phases.batch_size[{p}] ({batch}) must divide evenly over {jax.process_count()} processes"
            )


def plan(config) -> tuple[Phase, ...]:
    """The phases of a validated config, with global step ranges and per-phase model configs."""
    lists = _phase_lists(config)
    base = models.transformer_config(config.model)
    phases, start = [], 0
    for p in range(len(lists["seq_len"])):
        steps = lists["steps"][p]
        warmup = min(int(config.optimizer.warmup_fraction * steps), config.optimizer.max_warmup_steps)
        seq_len = lists["seq_len"][p]
        phases.append(
            Phase(
                index=p,
                start_step=start,
                end_step=start + steps,
                seq_len=seq_len,
                batch_size=lists["batch_size"][p],
                learning_rate=float(lists["learning_rate"][p]),
                warmup_steps=warmup,
                model=phase_model(base, window_scale=lists["window_scale"][p], seq_len=seq_len),
            )
        )
        start += steps
    return tuple(phases)


def flatten(config, prefix: str = "") -> dict[str, object]:
    """`{'a.b.c': value}` of a (nested) ConfigDict or mapping, lists as tuples."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = model_config.plain(value)
    return out
