"""`train(plan, workdir)`: the training run behind `python -m longjax.train`, the same for every task.

Phases run in sequence. At a phase change the step function is rebuilt for the
new model (its windows and length); parameters and optimizer state carry
over; the learning rate restarts with the new phase's warmup; a new data
iterator starts with the phase's own seed. Side work (logging, evaluation,
checkpoints, preemption, the non-finite-loss stop) is done by hooks
(`longjax.run.hooks`); where the starting state comes from is `setup`'s
business (`longjax.run.setup`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from longjax import tracking
from longjax.run import hooks as hooks_lib
from longjax.run import steps
from longjax.run.plan import ExperimentPlan, Phase
from longjax.run.setup import Run, setup


@dataclasses.dataclass
class RunResult:
    """How `train` ended: `'finished'` or `'preempted'` (SIGTERM), the step, the last evaluation."""

    status: str
    step: int
    final_metrics: dict | None = None


def data_seed(seed: int, phase: int) -> int:
    """The data seed of a phase: phases do not replay each other's batches."""
    return int(np.random.SeedSequence([seed, 7919, phase]).generate_state(1)[0])


def train(plan: ExperimentPlan, workdir) -> RunResult:
    """Trains `plan` in `workdir` through all its phases, checkpointing and evaluating.

    Args:
      plan: a parsed experiment (`longjax.run.plan.parse`).
      workdir: checkpoints, metrics.jsonl, TensorBoard events, config.json and curves.png go here.

    Returns:
      A `RunResult`.

    Raises:
      The errors of `setup` (devices, data, checkpoints, init_from), and
      `NonFiniteLossError` when the loss becomes NaN or Inf.
    """
    with setup(plan, workdir) as run:
        primary = jax.process_index() == 0
        if primary:
            (run.workdir / "config.json").write_text(plan.config_json)
        log = tracking.MetricsLog(
            run.workdir, total_steps=plan.total_steps, phase_starts=plan.phase_starts, resume_step=run.step,
            is_primary=primary,
        )
        with log, hooks_lib.Preemption() as preemption:
            for note in run.notes:
                log.message(note)
            hooks = [
                hooks_lib.StopOnNonFiniteLoss(),
                hooks_lib.TrainLog(plan.log_every_steps),
                preemption,
                hooks_lib.Evaluate(plan.eval.every_steps),
                hooks_lib.Checkpoint(plan.checkpoint.every_steps),
            ]
            final = None
            for phase in plan.phases:
                if phase.end_step <= run.step:
                    continue
                ctx = run_phase(run, phase, log, hooks)
                if ctx.stop == "preempted":
                    run.checkpointer.wait()
                    log.message(f"SIGTERM: saved the checkpoint at step {run.step}; exiting")
                    return RunResult("preempted", run.step)
                final = ctx.final
            run.checkpointer.wait()
            split = run.task.validation_split
            if final is None:
                log.message(f"nothing to do: the run in this workdir finished at step {run.step}")
            else:
                log.message(f"final {run.task.summary(split, final)}")
        if primary:
            tracking.plot_curves(run.workdir, phase_starts=plan.phase_starts, metric=run.task.curve_metric)
        return RunResult("finished", run.step, final)


def run_phase(run: Run, phase: Phase, log: tracking.MetricsLog, hooks) -> hooks_lib.PhaseContext:
    """Trains `phase` from `run.step` to its end (or until a hook stops it); returns its context."""
    plan, task = run.plan, run.task
    model = task.build_model(phase.model)
    train_step = jax.jit(
        steps.make_train_step(
            functools.partial(task.loss, model), run.tx, peak_learning_rate=phase.learning_rate,
            start_step=phase.start_step, warmup_steps=phase.warmup_steps, seed=plan.seed,
            grad_accumulation=plan.optimizer.grad_accumulation, loss_weight=task.loss_weight,
            end_step=phase.end_step, decay=plan.optimizer.decay, decay_power=plan.optimizer.decay_power,
        ),
        in_shardings=(run.state_sharding, run.batch_sharding),
        out_shardings=(run.state_sharding, run.replicated),
        donate_argnums=0,
    )
    batches = task.train_batches(plan, run.data, phase, seed=data_seed(plan.seed, phase.index))
    ctx = hooks_lib.PhaseContext(
        run=run, phase=phase, log=log, batches=batches, evaluator=task.evaluator(plan, run.data, phase, run.mesh),
        hook_states=lambda: {h.name: h.state_dict() for h in hooks if h.name},
    )
    for hook in hooks:
        hook.phase_start(ctx)
    restored = run.restored
    if restored is not None and restored.meta["phase"] == phase.index and run.step > phase.start_step:
        batches.set_state(restored.data_state)
        for hook in hooks:
            if hook.name in restored.meta["hooks"]:
                hook.load_state_dict(restored.meta["hooks"][hook.name])
    try:
        while run.step < phase.end_step:
            batch = jax.tree_util.tree_map(
                lambda x: jax.make_array_from_process_local_data(run.batch_sharding, x), next(batches)
            )
            run.state, ctx.metrics = train_step(run.state, batch)
            # The one host sync per step: a non-finite loss must stop the run before any save.
            ctx.loss = float(ctx.metrics["loss"])
            run.step += 1
            for hook in hooks:
                hook.after_step(ctx)
            if ctx.stop:
                return ctx
    finally:
        batches.close()
    for hook in hooks:
        hook.phase_end(ctx)
    return ctx
