"""Pure training and evaluation steps of the character LM.

Everything random is a function of (seed, step): the dropout key of step s is
`fold_in(key(seed), s)` on its own stream, so a resumed run draws exactly what
an uninterrupted one would, with no key carried in the state.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from longjax import models

# Separates the dropout stream from the other uses of the run seed.
_DROPOUT_STREAM = 1


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds of the model: step, parameters, optimizer state."""

    step: jax.Array  # int32 scalar: optimizer steps taken so far
    params: Any
    opt_state: Any


def optimizer(opt_config) -> optax.GradientTransformation:
    """AdamW without its learning rate, after global-norm clipping.

    The learning rate is applied by the step (`apply_learning_rate`) so the
    optimizer state carries over from phase to phase while the schedule restarts.
    Weight decay (decoupled, scaled by the learning rate as in AdamW) applies to
    weight matrices and embeddings only (`decay_mask`).
    """
    return optax.chain(
        optax.clip_by_global_norm(opt_config.grad_clip_norm),
        optax.scale_by_adam(b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps),
        optax.add_decayed_weights(opt_config.weight_decay, mask=decay_mask),
    )


# Weight matrices and embedding tables; biases, LayerNorm parameters and the
# Transformer-XL bias vectors u, v are not decayed.
_DECAYED_PARAMETERS = ("kernel", "relative_kernel", "embedding")


def decay_mask(params):
    """True for the parameters AdamW's weight decay applies to, by parameter name."""
    def decayed(path, _):
        name = getattr(path[-1], "key", None)
        return name in _DECAYED_PARAMETERS

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


def init_state(model: models.CharLM, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0: parameters from `key(seed)` and a fresh optimizer state."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.key(seed), tokens, step=jnp.zeros((), jnp.int32))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def cross_entropy(model: models.CharLM, params, tokens, *, step, deterministic: bool, seed: int):
    """Mean next-character cross entropy (nats) of tokens `[batch, seq + 1]`."""
    rngs = None if deterministic else {"dropout": dropout_key(seed, step)}
    logits = model.apply(params, tokens[:, :-1], deterministic=deterministic, step=step, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_train_step(model: models.CharLM, tx: optax.GradientTransformation, *, peak_learning_rate: float,
                    start_step: int, warmup_steps: int, seed: int):
    """`train_step(state, tokens [batch, seq + 1]) -> (state, metrics)` for one phase.

    The phase's model (its windows and length), learning rate and warmup are
    baked in; the function is pure and meant for `jax.jit`.
    """

    def train_step(state: TrainState, tokens):
        loss, grads = jax.value_and_grad(
            lambda p: cross_entropy(model, p, tokens, step=state.step, deterministic=False, seed=seed)
        )(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = learning_rate(state.step, peak=peak_learning_rate, start_step=start_step, warmup_steps=warmup_steps)
        params = jax.tree_util.tree_map(lambda p, u: p - lr * u.astype(p.dtype), state.params, updates)
        metrics = {
            "loss": loss,
            "bpc": loss / math.log(2.0),
            "learning_rate": lr,
            "grad_norm": _global_norm(grads),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def make_log_prob_fn(model: models.CharLM):
    """`log_probs(params, tokens [batch, n], step) -> [batch, n - 1]`: ln p(tokens[:, 1:] | prefix), float32."""

    def log_probs(params, tokens, step):
        logits = model.apply(params, tokens[:, :-1], deterministic=True, step=step)
        log_softmax = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(log_softmax, tokens[:, 1:, None], axis=-1)[..., 0]

    return log_probs
