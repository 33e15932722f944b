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

from longjax.run.plan import DECAYS, OptimizerSection

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
    weight matrices and embeddings only (`decay_mask`). The updates of a task
    head are scaled by `head_learning_rate_scale` (`head_mask`).
    """
    transforms = [
        optax.clip_by_global_norm(section.grad_clip_norm),
        optax.scale_by_adam(b1=section.b1, b2=section.b2, eps=section.eps),
        optax.add_decayed_weights(section.weight_decay, mask=decay_mask),
    ]
    if section.head_learning_rate_scale != 1.0:
        # Only then: the optimizer state of every other run keeps its structure (and its checkpoints).
        transforms.append(optax.masked(optax.scale(section.head_learning_rate_scale), head_mask))
    return optax.chain(*transforms)


def head_mask(params):
    """True for the parameters under a top-level 'head' (of the variables' 'params' or of the bare tree)."""

    def in_head(path, _):
        keys = [getattr(entry, "key", None) for entry in path]
        if keys and keys[0] == "params":
            keys = keys[1:]
        return bool(keys) and keys[0] == "head"

    return jax.tree_util.tree_map_with_path(in_head, params)


def decay_mask(params):
    """True for the parameters AdamW's weight decay applies to, by parameter name."""

    def decayed(path, _):
        return getattr(path[-1], "key", None) in _DECAYED_PARAMETERS

    return jax.tree_util.tree_map_with_path(decayed, params)


def learning_rate(step, *, peak: float, start_step: int, warmup_steps: int, end_step: int | None = None,
                  decay: str = "constant", decay_power: float = 1.0):
    """The phase's rate at `step` (float32 scalar).

    Linear warmup from the phase start to `peak`, then constant
    (`decay='constant'`), or decaying to 0 at `end_step` as
    `peak * (steps left / decay steps) ** decay_power` (`'polynomial'`:
    power 1 is the linear decay of BERT fine-tuning, power 3 the Longformer
    paper's MLM pretraining), or as a half cosine (`'cosine'`, LRA's image
    tasks), or as `peak * sqrt(max(warmup_steps, 1) / steps since the phase start)`
    (`'rsqrt'`, the Transformer's inverse square root that LRA's text tasks use).
    """
    step = jnp.asarray(step, jnp.float32)
    warm = (jnp.asarray(1.0, jnp.float32) if warmup_steps == 0
            else jnp.clip((step - start_step + 1.0) / warmup_steps, 0.0, 1.0))
    if decay == "constant":
        return peak * warm
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    in_warmup = step - start_step < warmup_steps
    if decay == "rsqrt":
        since_start = jnp.maximum(step - start_step + 1.0, 1.0)
        return peak * jnp.where(in_warmup, warm, jnp.sqrt(max(warmup_steps, 1) / since_start))
    if end_step is None:
        raise ValueError(f"decay={decay!r} needs end_step, the phase's end")
    decay_steps = max(end_step - start_step - warmup_steps, 1)
    left = jnp.clip((end_step - step) / decay_steps, 0.0, 1.0)
    if decay == "cosine":
        return peak * jnp.where(in_warmup, warm, 0.5 * (1.0 + jnp.cos(jnp.pi * (1.0 - left))))
    return peak * jnp.where(in_warmup, warm, left**decay_power)


def dropout_key(seed: int, step):
    """The dropout key of `step`: a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM), step)


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 with `params` and a fresh optimizer state."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


LossFn = Callable[..., tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, peak_learning_rate: float,
                    start_step: int, warmup_steps: int, seed: int, grad_accumulation: int = 1,
                    loss_weight: Callable[[Any], jax.Array] | None = None, end_step: int | None = None,
                    decay: str = "constant", decay_power: float = 1.0):
    """`train_step(state, batch) -> (state, metrics)` for one phase.

    Args:
      loss_fn: `loss_fn(params, batch, *, step, dropout_key) -> (loss, metrics)`,
        the task's loss with its phase model bound.
      tx: the optimizer (`optimizer(...)`).
      peak_learning_rate, start_step, warmup_steps, end_step, decay,
        decay_power: the phase's schedule (`learning_rate`).
      seed: the run seed (dropout keys).
      grad_accumulation: split every batch `[B, ...]` into this many
        micro-batches (rows `m, m + k, m + 2k, ...` form micro-batch m) and
        accumulate their gradients before the one update. 1 computes the
        whole batch at once.
      loss_weight: `loss_weight(micro_batch) -> float32 scalar`, what the
        task's mean loss is a mean over (rows, or masked tokens for a masked
        LM); micro-batch losses, gradients and metrics are combined as means
        weighted by it, so accumulation computes the full batch's mean loss.
        None (or a function returning None): every micro-batch weighs the
        same (right for per-row means).

    Returns:
      A pure function for `jax.jit`; its metrics are the task's plus `loss`,
      `learning_rate` and `grad_norm`.
    """
    if not isinstance(grad_accumulation, int) or grad_accumulation < 1:
        raise ValueError(f"grad_accumulation must be a positive int, got {grad_accumulation!r}")

    def loss_and_grads(params, batch, step, key):
        return jax.value_and_grad(
            lambda p: loss_fn(p, batch, step=step, dropout_key=key), has_aux=True
        )(params)

    def accumulated(params, batch, step):
        k = grad_accumulation

        def split(x):
            if x.shape[0] % k:
                raise ValueError(f"batch of {x.shape[0]} rows does not split into grad_accumulation={k} micro-batches")
            # [B, ...] -> [k, B / k, ...] with micro-batch m = rows m::k, so each
            # device's contiguous share of the rows stays on that device.
            return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

        micro = jax.tree_util.tree_map(split, batch)
        base_key = dropout_key(seed, step)

        def body(carry, inputs):
            index, micro_batch = inputs
            (loss, metrics), grads = loss_and_grads(params, micro_batch, step, jax.random.fold_in(base_key, index))
            weight = None if loss_weight is None else loss_weight(micro_batch)
            weight = jnp.float32(1.0) if weight is None else jnp.asarray(weight, jnp.float32)
            total_weight, total = carry
            # A micro-batch with nothing to average over (weight 0) may report 0/0: it adds nothing.
            total = jax.tree_util.tree_map(
                lambda acc, x: acc + jnp.where(weight > 0, weight * x.astype(jnp.float32), 0.0),
                total, (loss, metrics, grads),
            )
            return (total_weight + weight, total), None

        zeros = jax.tree_util.tree_map(
            lambda x: jnp.zeros(x.shape, jnp.float32),
            jax.eval_shape(lambda: loss_and_grads(params, jax.tree_util.tree_map(lambda x: x[0], micro), step,
                                                  base_key)),
        )
        (loss0, metrics0), grads0 = zeros
        (total_weight, (loss, metrics, grads)), _ = jax.lax.scan(
            body, (jnp.float32(0.0), (loss0, metrics0, grads0)), (jnp.arange(k), micro)
        )
        scale = 1.0 / jnp.maximum(total_weight, 1e-30)
        loss, metrics, grads = jax.tree_util.tree_map(lambda x: x * scale, (loss, metrics, grads))
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
        return (loss, metrics), grads

    def train_step(state: TrainState, batch):
        if grad_accumulation == 1:
            (loss, metrics), grads = loss_and_grads(state.params, batch, state.step, dropout_key(seed, state.step))
        else:
            (loss, metrics), grads = accumulated(state.params, batch, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = learning_rate(state.step, peak=peak_learning_rate, start_step=start_step, warmup_steps=warmup_steps,
                           end_step=end_step, decay=decay, decay_power=decay_power)
        params = jax.tree_util.tree_map(lambda p, u: p - lr * u.astype(p.dtype), state.params, updates)
        metrics = {"loss": loss, **metrics, "learning_rate": lr, "grad_norm": _global_norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))
