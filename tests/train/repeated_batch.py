"""Training on one batch again and again, the tasks' check that their loss can be learned."""

import jax

from longjax.run import steps


def losses_on_a_repeated_batch(prepared, plan, *, steps_taken: int = 10, min_weight: float = 2) -> list[float]:
    """The losses of `steps_taken` steps (lr 1e-3, 2 micro-batches) on the first training batch with something to learn.

    A batch qualifies when the task's `loss_weight` (what its loss averages over, e.g.
    TriviaQA's answered pairs) is None or at least `min_weight`.
    """
    phase = plan.phases[0]
    model = prepared.task.build_model(phase.model)
    train_step = jax.jit(steps.make_train_step(
        lambda p, b, **kw: prepared.task.loss(model, p, b, **kw), prepared.tx, peak_learning_rate=1e-3,
        start_step=0, warmup_steps=0, seed=0, grad_accumulation=2, loss_weight=prepared.task.loss_weight,
    ))
    batches = prepared.task.train_batches(plan, prepared.data, phase, seed=0)
    batch = next(batches)
    weight = prepared.task.loss_weight(batch)
    while weight is not None and weight < min_weight:
        batch = next(batches)
        weight = prepared.task.loss_weight(batch)
    batches.close()
    state, losses = prepared.state, []
    for _ in range(steps_taken):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses
