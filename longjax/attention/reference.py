"""Dense masked attention: the oracle every implementation is tested against.

Quadratic in sequence length by design; it computes in float32 whatever the
input dtype and casts the result back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.common import RELU_EPSILON
from longjax.attention import masks
from longjax.attention import relative as relative_lib


def dense_attention(q, k, v, mask, *, scale=None, relative=None):
    """Softmax attention restricted to an explicit boolean mask.

    Args:
      q: `[batch, q_seq, heads, head_dim]`.
      k, v: `[batch, kv_seq, heads, head_dim]`.
      mask: bool, broadcastable to `[batch, heads, q_seq, kv_seq]`; True = allowed.
      scale: score multiplier, default `1 / sqrt(head_dim)`.
      relative: None or a `relative.RelativePositions` (self-attention: q_seq == kv_seq):
        the score of (i, j) gains `queries_i . r_{i-j}` before scaling.

    Returns:
      `[batch, q_seq, heads, head_dim]` in q's dtype. A query row with no allowed
      key is all zeros.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qf, kf = (x.astype(jnp.float32) for x in (q, k))
    scores = jnp.einsum("bqhd,bkhd->bhqk", qf, kf)
    if relative is not None:
        scores = scores + relative_lib.dense_scores(relative, q.shape[1])
    return attention_from_scores(scores * scale, mask, v).astype(q.dtype)


def attention_from_scores(scores, mask, v):
    """Masked softmax of float32 scores `[batch, heads, q_seq, kv_seq]` applied to v.

    Returns float32 `[batch, q_seq, heads, head_dim]`; rows with no allowed key are zero.
    """
    # Masking the scores (not the exponentials) keeps gradients finite: exp(-inf)
    # has a zero derivative, while exp of a large masked score could overflow.
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(scores.dtype))


def sliding_window_reference(
    q, k, v, *, spec, global_mask=None, global_qkv=None, padding_mask=None, scale=None, relative=None
):
    """Longformer attention through `dense_attention` and `masks.sliding_window_mask`.

    Global query rows use `global_qkv` when it is given: their queries come from
    `q_g` and every key and value from `k_g`, `v_g`.
    """
    mask = masks.sliding_window_mask(
        q.shape[1],
        left=spec.left,
        right=spec.right,
        dilation=spec.dilation,
        causal=spec.causal,
        global_mask=global_mask,
        padding_mask=padding_mask,
    )
    out = dense_attention(q, k, v, mask, scale=scale, relative=relative)
    if global_qkv is not None:
        global_out = dense_attention(*global_qkv, mask, scale=scale)
        out = jnp.where(global_mask[:, :, None, None], global_out, out)
    return out


def block_sparse_reference(q, k, v, *, spec, global_mask=None, padding_mask=None, scale=None, relative=None):
    """BigBird attention through `dense_attention` and `masks.block_sparse_mask`."""
    mask = masks.block_sparse_mask(
        q.shape[1],
        block_size=spec.block_size,
        window_radius=spec.window_radius,
        global_blocks=spec.global_blocks,
        random_layout=spec.random_layout,
        causal=spec.causal,
        global_mask=global_mask,
        padding_mask=padding_mask,
    )
    return dense_attention(q, k, v, mask, scale=scale, relative=relative)


def favor_reference(q, k, v, *, projection, feature_map, causal=False, padding_mask=None, scale=None):
    """FAVOR+ as a dense masked product of the features: the algebra the linear-time
    implementation must reproduce exactly, computed in the log domain.

    With features phi, the output is `sum_j A_ij v_j / sum_j A_ij` over allowed j,
    `A_ij = phi(q_i) . phi(k_j)`. For softmax features `log A_ij` is a logsumexp
    over features of the two logits, so no stabiliser is needed. Quadratic in
    seq and `[.., seq, seq, features]` in memory: for tests.

    Args:
      projection: `[features, head_dim]` (shared by heads) or `[heads, features, head_dim]`.
    """
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qs, ks = (x.astype(dtype) * jnp.sqrt(jnp.asarray(scale, dtype)) for x in (q, k))
    w = jnp.broadcast_to(projection.astype(dtype), (q.shape[2],) + projection.shape[-2:])
    q_proj = jnp.einsum("bqhd,hmd->bhqm", qs, w)
    k_proj = jnp.einsum("bkhd,hmd->bhkm", ks, w)
    if feature_map == "softmax":
        q_logits = q_proj - 0.5 * jnp.sum(qs * qs, axis=-1).transpose(0, 2, 1)[..., None]
        k_logits = k_proj - 0.5 * jnp.sum(ks * ks, axis=-1).transpose(0, 2, 1)[..., None]
        log_a = jax.nn.logsumexp(q_logits[:, :, :, None, :] + k_logits[:, :, None, :, :], axis=-1)
    elif feature_map == "relu":
        eps = RELU_EPSILON
        log_a = jnp.log(jnp.einsum("bhqm,bhkm->bhqk", jax.nn.relu(q_proj) + eps, jax.nn.relu(k_proj) + eps))
    else:
        raise ValueError(f"feature_map must be 'softmax' or 'relu', got {feature_map!r}")
    seq = q.shape[1]
    mask = jnp.ones((1, 1, seq, seq), bool)
    if causal:
        mask = mask & masks.causal_mask(seq)
    if padding_mask is not None:
        mask = mask & masks.padding_key_mask(padding_mask) & masks.padding_query_mask(padding_mask)
    return attention_from_scores(log_a, mask, v).astype(q.dtype)
