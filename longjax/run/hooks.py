"""Side work of the training loop, one hook each: stop on a non-finite loss, log, preempt, evaluate, checkpoint.

The loop (`longjax.run.loop`) runs the steps of a phase and calls every hook,
in order, at the phase's start, after each step and at the phase's end. A hook
that keeps state across steps (the logging interval) gives it to the
checkpoint as JSON (`state_dict`) and gets it back when the run resumes in the
same phase (`load_state_dict`), so a resumed run logs exactly what an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

from longjax import tracking
from longjax.run.errors import NonFiniteLossError
from longjax.run.plan import Phase
from longjax.run.setup import Run

# Train-step metrics logged as their last value in an interval; the others are averaged.
_LAST_VALUE_METRICS = ("learning_rate", "grad_norm")


@dataclasses.dataclass
class PhaseContext:
    """The running phase, as the loop and its hooks see it.

    Attributes:
      run: the run (its `state` and `step` advance with the loop).
      phase: the phase.
      log: the run's metrics log.
      batches: the phase's training batches.
      evaluator: the phase's evaluator.
      metrics: the last step's metrics (device scalars).
      loss: the last step's loss, on the host.
      stop: set by a hook to end the run after this step ('preempted').
      final: the evaluation at the phase's end.
      hook_states: returns every hook's state, for the checkpoint.
    """

    run: Run
    phase: Phase
    log: tracking.MetricsLog
    batches: Any
    evaluator: Any
    hook_states: Any
    metrics: dict | None = None
    loss: float | None = None
    stop: str | None = None
    final: dict | None = None

    @property
    def step(self) -> int:
        return self.run.step

    @property
    def at_phase_end(self) -> bool:
        return self.run.step == self.phase.end_step


class Hook:
    """A piece of side work; override what it needs. `name` keys its state in checkpoints."""

    name = ""

    def phase_start(self, ctx: PhaseContext) -> None:
        pass

    def after_step(self, ctx: PhaseContext) -> None:
        pass

    def phase_end(self, ctx: PhaseContext) -> None:
        pass

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


class StopOnNonFiniteLoss(Hook):
    """Stops the run before anything is saved after a NaN or infinite loss."""

    def after_step(self, ctx):
        if math.isfinite(ctx.loss):
            return
        checkpointer = ctx.run.checkpointer
        checkpointer.wait()
        last = checkpointer.steps()
        message = (
            f"stopping: the training loss is {ctx.loss} at step {ctx.step} (phase {ctx.phase.index + 1}); "
            f"nothing was saved after it. Last good checkpoint: "
            f"{'step ' + str(last[-1]) if last else 'none'} in {checkpointer.directory}. "
            "Lower the learning rate or the gradient clip, or look for bad data near that step."
        )
        ctx.log.message(message)
        raise NonFiniteLossError(message)


def peak_memory_bytes() -> tuple[float, str]:
    """(bytes, source): the most memory this process has held so far.

    On GPU/TPU the largest `peak_bytes_in_use` of this process's devices
    (source 'device'); where devices keep no statistics (the CPU) the
    process's peak resident set size (source 'host_rss'), which also counts
    the data and the Python heap; NaN ('unavailable') where the OS gives
    neither (Windows has no `resource` module).
    """
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    if peaks:
        return float(max(peaks)), "device"
    try:
        import resource  # pylint: disable=import-outside-toplevel
    except ImportError:
        return math.nan, "unavailable"
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "host_rss"


class TrainLog(Hook):
    """Logs the phase start and, every `every_steps` and at the phase end, the interval's training metrics.

    Besides the task's metrics each record has `tokens_per_second` and
    `steps_per_second` over the interval, and `peak_memory_mib` so far
    (`peak_memory_bytes`: device memory on accelerators, the process's
    resident memory on the CPU, as `peak_memory_on_device` 1 or 0 says). An
    interval's time is wall time: it includes the compilation in a phase's
    first interval (and after a resume), and evaluations and checkpoints in it.
    """

    name = "train_log"

    def __init__(self, every_steps: int):
        self.every_steps = every_steps
        self._reset()

    def _reset(self):
        self._values: dict[str, list] = {}
        self._tokens = 0
        self._steps = 0
        self._start = time.perf_counter()

    def phase_start(self, ctx):
        phase, plan = ctx.phase, ctx.run.plan
        ctx.log.message(
            f"phase {phase.index + 1}/{len(plan.phases)}: steps {phase.start_step}-{phase.end_step}, "
            f"seq_len {phase.seq_len}, batch {phase.batch_size}, lr {phase.learning_rate:g} "
            f"(warmup {phase.warmup_steps}), {ctx.run.task.describe_model(phase.model)}"
        )
        self._reset()

    def after_step(self, ctx):
        for name, value in ctx.metrics.items():
            self._values.setdefault(name, []).append(ctx.loss if name == "loss" else value)
        self._tokens += ctx.run.task.tokens_per_batch(ctx.phase)
        self._steps += 1
        if ctx.step % self.every_steps and not ctx.at_phase_end:
            return
        elapsed = time.perf_counter() - self._start
        record = {
            name: float(values[-1]) if name in _LAST_VALUE_METRICS else float(np.mean([float(v) for v in values]))
            for name, values in self._values.items()
        }
        record["tokens_per_second"] = self._tokens / max(elapsed, 1e-9)
        record["steps_per_second"] = self._steps / max(elapsed, 1e-9)
        peak, source = peak_memory_bytes()
        record["peak_memory_mib"] = peak / 2**20
        record["peak_memory_on_device"] = int(source == "device")
        ctx.log.train(ctx.step, ctx.phase.index + 1, record)
        self._reset()

    def state_dict(self):
        # What a resumed run needs to log the same interval means: the values since the last line.
        return {name: [float(v) for v in values] for name, values in self._values.items()}

    def load_state_dict(self, state):
        self._values = {name: list(values) for name, values in state.items()}


class Preemption(Hook):
    """Turns SIGTERM into a stop after the current step (the checkpoint hook then saves; exit 0)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if sys.platform != "win32" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def after_step(self, ctx):
        if self.requested:
            ctx.stop = "preempted"


class Evaluate(Hook):
    """Evaluates the validation split every `every_steps` (None: never mid-phase) and at each phase end."""

    def __init__(self, every_steps: int | None):
        self.every_steps = every_steps

    def _evaluate(self, ctx) -> dict:
        run = ctx.run
        split = run.task.validation_split
        result = ctx.evaluator(run.state.params, split, trained_steps=ctx.step, limit=run.plan.eval.training_limit)
        ctx.log.eval(ctx.step, ctx.phase.index + 1, split, result)
        return result

    def after_step(self, ctx):
        if ctx.stop or ctx.at_phase_end or self.every_steps is None or ctx.step % self.every_steps:
            return
        self._evaluate(ctx)

    def phase_end(self, ctx):
        ctx.final = self._evaluate(ctx)


class Checkpoint(Hook):
    """Saves every `every_steps`, at each phase end and before a stop, with the data and hook states."""

    def __init__(self, every_steps: int):
        self.every_steps = every_steps

    def after_step(self, ctx):
        if ctx.step % self.every_steps and not ctx.at_phase_end and not ctx.stop:
            return
        run = ctx.run
        meta = {
            "step": ctx.step,
            "phase": ctx.phase.index,
            "config": run.plan.config_json,
            "data": run.data.fingerprint,
            "hooks": ctx.hook_states(),
        }
        run.checkpointer.save(ctx.step, run.state, ctx.batches.get_state(), meta)
