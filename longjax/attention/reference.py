"""Dense masked attention: the oracle every implementation is tested against.

Quadratic in sequence length by design; it computes in float32 whatever the
input dtype and casts the result back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longjax.attention import masks as masks_lib


def dense_attention(q, k, v, mask, *, scale=None):
    """Softmax attention restricted to an explicit boolean mask.

    Args:
      q: `[batch, q_seq, heads, head_dim]`.
      k, v: `[batch, kv_seq, heads, head_dim]`.
      mask: bool, broadcastable to `[batch, heads, q_seq, kv_seq]`; True = allowed.
      scale: score multiplier, default `1 / sqrt(head_dim)`.

    Returns:
      `[batch, q_seq, heads, head_dim]` in q's dtype. A query row with no allowed
      key is all zeros.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    # Masking the scores (not the exponentials) keeps gradients finite: exp(-inf)
    # has a zero derivative, while exp of a large masked score could overflow.
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, vf).astype(q.dtype)


def sliding_window_reference(
    q, k, v, *, spec, global_mask=None, global_qkv=None, padding_mask=None, scale=None
):
    """Longformer attention through `dense_attention` and `masks.sliding_window_mask`.

    Global query rows use `global_qkv` when it is given: their queries come from
    `q_g` and every key and value from `k_g`, `v_g`.
    """
    mask = masks_lib.sliding_window_mask(
        q.shape[1],
        left=spec.left,
        right=spec.right,
        dilation=spec.dilation,
        causal=spec.causal,
        global_mask=global_mask,
        padding_mask=padding_mask,
    )
    out = dense_attention(q, k, v, mask, scale=scale)
    if global_qkv is not None:
        global_out = dense_attention(*global_qkv, mask, scale=scale)
        out = jnp.where(global_mask[:, :, None, None], global_out, out)
    return out


def block_sparse_reference(q, k, v, *, spec, global_mask=None, padding_mask=None, scale=None):
    """BigBird attention through `dense_attention` and `masks.block_sparse_mask`."""
    mask = masks_lib.block_sparse_mask(
        q.shape[1],
        block_size=spec.block_size,
        window_radius=spec.window_radius,
        global_blocks=spec.global_blocks,
        random_layout=spec.random_layout,
        causal=spec.causal,
        global_mask=global_mask,
        padding_mask=padding_mask,
    )
    return dense_attention(q, k, v, mask, scale=scale)
