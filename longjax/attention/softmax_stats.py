"""Unnormalised softmax statistics, so that partial attentions merge exactly.

A partial attention over some key set is kept as `(acc, row_max, row_sum)`:
`acc = sum_j exp(s_j - row_max) v_j` and `row_sum = sum_j exp(s_j - row_max)`.
Two partials over disjoint key sets merge into the attention over their union
(the log-sum-exp merge); dividing `acc` by `row_sum` at the end normalises.
The row maximum only keeps exponentials in range and cancels in the result,
so it carries no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Finite, so that a fully masked row gives exp(0) = 1 (then zeroed) instead of
# exp(-inf - -inf) = NaN.
MASK_VALUE = -1e30


class PartialAttention(NamedTuple):
    """Softmax statistics of one partial attention, all float32.

    acc: `[..., rows, head_dim]`; row_max and row_sum: `[..., rows]`.
    """

    acc: jax.Array
    row_max: jax.Array
    row_sum: jax.Array


def masked_exp(scores, mask):
    """Returns `(probs, row_max, row_sum)` of float32 scores over the last axis.

    probs are the unnormalised weights `exp(scores - row_max)` with masked
    entries zero; a row with no allowed key has all-zero probs and row_sum 0.
    """
    scores = jnp.where(mask, scores, MASK_VALUE)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1))
    row_has_key = row_max > MASK_VALUE / 2
    probs = jnp.exp(scores - row_max[..., None]) * row_has_key[..., None]
    return probs, row_max, jnp.sum(probs, axis=-1)


def merge(a: PartialAttention, b: PartialAttention) -> PartialAttention:
    """The partial attention over the union of two disjoint key sets."""
    row_max = jnp.maximum(a.row_max, b.row_max)
    wa = jnp.exp(a.row_max - row_max)
    wb = jnp.exp(b.row_max - row_max)
    return PartialAttention(
        acc=a.acc * wa[..., None] + b.acc * wb[..., None],
        row_max=row_max,
        row_sum=a.row_sum * wa + b.row_sum * wb,
    )


def normalize(p: PartialAttention):
    """`acc / row_sum`, with rows that attended nothing set to zero."""
    has_key = p.row_sum > 0
    return p.acc / jnp.where(has_key, p.row_sum, 1.0)[..., None]
