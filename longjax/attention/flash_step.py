"""One query block against its gathered keys: the flash-attention step, forward and backward.

Shared by the scanned XLA implementations (the Longformer band, `band.py`, and
the BigBird block layout, `block_sparse.py`): they differ only in which keys a
query block sees and how its mask is built. Layout: `[batch, heads, rows,
head_dim]`; scores are float32 and already masked (`MASK_VALUE` where a key is
not allowed). The backward step takes the per-row terms of
`kernels_pallas.common.backward_row_terms`, which the Pallas kernels share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.common import MASK_VALUE


def pad_seq(x, before: int, after: int):
    """Pads axis 2 (the sequence of `[batch, heads, seq, ...]`) with zeros."""
    return jnp.pad(x, [(0, 0), (0, 0), (before, after)] + [(0, 0)] * (x.ndim - 3))


def slice_seq(x, start, size: int):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=2)


def stack_blocks(ys, seq: int):
    """Scan outputs `[blocks, batch, heads, block, ...]` -> `[batch, heads, seq, ...]`."""
    ys = jnp.moveaxis(ys, 0, 2)
    return ys.reshape(ys.shape[:2] + (-1,) + ys.shape[4:])[:, :, :seq]


def masked_scores(q_blk, keys, mask, bias=None):
    """float32 `[batch, heads, block, keys]`, `MASK_VALUE` where mask is False.

    Queries come pre-multiplied by the score scale: that is one multiply per
    query element instead of one per score, in the forward and backward steps.
    bias: None, or float32 scores to add (already scaled), shaped like the result.
    """
    scores = jnp.einsum("bhqd,bhkd->bhqk", q_blk, keys, preferred_element_type=jnp.float32)
    if bias is not None:
        scores = scores + bias
    return jnp.where(mask, scores, MASK_VALUE)


def attend(scores, values):
    """Softmax of masked scores applied to values: (out float32, lse float32 `[.., rows]`)."""
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    # A row with no allowed key has row_max == MASK_VALUE and weights exp(0):
    # it is zeroed once per row rather than masking every weight.
    has_key = row_max > MASK_VALUE / 2
    weights = jnp.exp(scores - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum(
        "bhqk,bhkd->bhqd", weights.astype(values.dtype), values, preferred_element_type=jnp.float32
    )
    out = jnp.where(has_key, out / total, 0.0)
    lse = jnp.where(has_key, row_max + jnp.log(total), MASK_VALUE)[..., 0]
    return out, lse


def score_grads(scores, lse, row_term, values, d_out):
    """(probs, d_scores) of one block, float32 `[.., block, keys]`: the backward step up to the scores.

    Inputs as for `attend_grads`; values and d_out may be in the inputs' dtype
    (their product accumulates in float32).
    """
    probs = jnp.exp(scores - lse[..., None])
    d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, values, preferred_element_type=jnp.float32)
    return probs, probs * (d_probs + row_term[..., None])


def attend_grads(scores, lse, row_term, q_blk, keys, values, d_out):
    """Gradients of one block: (dq `[.., block, d]`, dk and dv `[.., keys, d]`), float32.

    `scores` are recomputed masked scores; lse and row_term come from
    `kernels_pallas.common.backward_row_terms` for the block's rows; all other inputs float32, q_blk
    pre-scaled as for `masked_scores` (so dq is the gradient wrt scaled queries).
    """
    probs = jnp.exp(scores - lse[..., None])
    d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, values)
    d_scores = probs * (d_probs + row_term[..., None])
    dq = jnp.einsum("bhqk,bhkd->bhqd", d_scores, keys)
    dk = jnp.einsum("bhqk,bhqd->bhkd", d_scores, q_blk)
    dv = jnp.einsum("bhqk,bhqd->bhkd", probs, d_out)
    return dq, dk, dv
