"""Partial attentions as (normalised output, log-sum-exp), so they merge exactly.

Attention over a key set A is kept as `out_A` (normalised over A) and
`lse_A = log sum_{j in A} exp(s_j)`. For disjoint A and B,
`lse = logaddexp(lse_A, lse_B)` and
`out = exp(lse_A - lse) out_A + exp(lse_B - lse) out_B` is the attention over
the union. A row with no allowed key has output 0 and lse `MASK_VALUE` (from
`kernels_pallas.common`, shared with the kernels), a finite stand-in for -inf
that keeps every merge and gradient finite.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.common import MASK_VALUE


class PartialAttention(NamedTuple):
    """out: float32 `[..., rows, head_dim]`; lse: float32 `[..., rows]`."""

    out: jax.Array
    lse: jax.Array


def masked_softmax(scores, mask):
    """Returns `(probs, lse)` of float32 scores over the last axis.

    Masked entries get probability 0; a row with no allowed key has all-zero
    probs and lse `MASK_VALUE`.
    """
    scores = jnp.where(mask, scores, MASK_VALUE)
    # The shift only keeps exponentials in range and cancels in the result.
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    has_key = row_max > MASK_VALUE / 2
    weights = jnp.exp(scores - row_max) * has_key
    total = jnp.sum(weights, axis=-1, keepdims=True)
    safe_total = jnp.where(has_key, total, 1.0)
    lse = jnp.where(has_key, row_max + jnp.log(safe_total), MASK_VALUE)
    return weights / safe_total, lse[..., 0]


def merge(a: PartialAttention, b: PartialAttention) -> PartialAttention:
    """The attention over the union of two disjoint key sets."""
    lse = jnp.maximum(a.lse, b.lse)
    wa = jnp.exp(a.lse - lse)
    wb = jnp.exp(b.lse - lse)
    total = wa + wb
    out = (a.out * wa[..., None] + b.out * wb[..., None]) / total[..., None]
    return PartialAttention(out=out, lse=lse + jnp.log(total))
