"""The pure training step every task shares: loss and gradients, AdamW, the phase's learning rate.

Everything random is a function of (seed, step): the dropout key of step s is
`fold_in(key(seed), s)` on its own stream, so a resumed run draws exactly what
an uninterrupted one would, with no key carried in the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from longjax.run.plan import OptimizerSection

# Separates the dropout stream from the other uses of the run seed.
_DROPOUT_STREAM = 1
# Weight matrices and embedding tables; biases, LayerNorm parameters and the
# Transformer-XL bias vectors u, v are not decayed.
_DECAYED_PARAMETERS = ("kernel", "relative_kernel", "embedding")


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds of the model: step, parameters, optimizer state."""

    step: jax.Array  # int32 scalar: optimizer steps taken so far
    params: Any
    opt_state: Any


def optimizer(section: OptimizerSection) -> optax.GradientTransformation:
    """AdamW without its learning rate, after global-norm clipping.

    The learning rate is applied by the step (`learning_rate`) so the
    optimizer state carries over from phase to phase while the schedule restarts.
    Weight decay (decoupled, scaled by the learning rate as in AdamW) applies to
    weight matrices and embeddings only (`decay_mask`).
    """
    return optax.chain(
        optax.clip_by_global_norm(section.grad_clip_norm),
        optax.scale_by_adam(b1=section.b1, b2=section.b2, eps=section.eps),
        optax.add_decayed_weights(section.weight_decay, mask=decay_mask),
    )


def decay_mask(params):
    """True for the parameters AdamW's weight decay applies to, by parameter name."""

    def decayed(path, _):
        return getattr(path[-1], "key", None) in _DECAYED_PARAMETERS

    return jax.tree_util.tree_map_with_path(decayed, params)


def learning_rate(step, *, peak: float, start_step: int, warmup_steps: int):
    """Linear warmup from the phase start to `peak`, then constant (float32 scalar)."""
    if warmup_steps == 0:
        return jnp.asarray(peak, jnp.float32)
    progress = (jnp.asarray(step, jnp.float32) - start_step + 1.0) / warmup_steps
    return peak * jnp.clip(progress, 0.0, 1.0)


def dropout_key(seed: int, step):
    """The dropout key of `step`: a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM), step)


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 with `params` and a fresh optimizer state."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


LossFn = Callable[..., tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, peak_learning_rate: float,
                    start_step: int, warmup_steps: int, seed: int):
    """`train_step(state, batch) -> (state, metrics)` for one phase.

    Args:
      loss_fn: `loss_fn(params, batch, *, step, dropout_key) -> (loss, metrics)`,
        the task's loss with its phase model bound.
      tx: the optimizer (`optimizer(...)`).
      peak_learning_rate, start_step, warmup_steps: the phase's schedule.
      seed: the run seed (dropout keys).

    Returns:
      A pure function for `jax.jit`; its metrics are the task's plus `loss`,
      `learning_rate` and `grad_norm`.
    """

    def train_step(state: TrainState, batch):
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: loss_fn(p, batch, step=state.step, dropout_key=dropout_key(seed, state.step)), has_aux=True
        )(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = learning_rate(state.step, peak=peak_learning_rate, start_step=start_step, warmup_steps=warmup_steps)
        params = jax.tree_util.tree_map(lambda p, u: p - lr * u.astype(p.dtype), state.params, updates)
        metrics = {"loss": loss, **metrics, "learning_rate": lr, "grad_norm": _global_norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))
