"""Position schemes that ride through any attention op as query/key transforms.

Transformer-XL's relative score for head h,

    A_ij = (q_i + u) . k_j + (q_i + v) . W_R R(i - j),

with `R(t) = [sin(t w_f), cos(t w_f)]_f`, splits by the angle-difference
identity into a dot product of a query-side vector (depending on q_i and i)
and a key-side vector (depending on j only):

    a_f = (q_i + v) . W_sin[f],  b_f = (q_i + v) . W_cos[f]
    query extra = [a sin(i w) + b cos(i w),  b sin(i w) - a cos(i w)]
    key extra   = [cos(j w),                 sin(j w)]

so concatenating these to q and k (and zeros to v) makes any attention op,
kernels included, compute exact Transformer-XL relative attention. The price is
`d_model` extra features per head (one sine/cosine pair per TXL frequency).

The ops that take `relative=` compute the position term themselves
(`longjax.attention.relative`), from `q + v` and the table of `r_t` that
`txl_relative_embeddings` builds: the model's default
(`model.relative_positions='native'`).
"""

from __future__ import annotations

import jax.numpy as jnp


def sinusoid_frequencies(d_model: int):
    """Transformer-XL's inverse frequencies `1 / 10000^(2f / d_model)`, float32 `[d_model // 2]`."""
    return 1.0 / (10000.0 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model))


def absolute_sinusoid(positions, d_model: int):
    """The Transformer's fixed absolute position embedding: float32 `[..., d_model]` for int positions `[...]`.

    Sines and cosines interleaved, `[sin(p w_0), cos(p w_0), sin(p w_1), ...]`
    with the frequencies of `sinusoid_frequencies` (Vaswani et al. 2017; LRA's
    `AddPositionEmbs` without a learned table). `d_model` must be even.
    """
    angles = positions.astype(jnp.float32)[..., None] * sinusoid_frequencies(d_model)
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*angles.shape[:-1], d_model)


def relative_sinusoid(offsets, d_model: int):
    """Transformer-XL's `R(t) = [sin(t w), cos(t w)]` for offsets `[n]`: float32 `[n, d_model]`."""
    angles = offsets.astype(jnp.float32)[:, None] * sinusoid_frequencies(d_model)[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def txl_relative_embeddings(relative_kernel, *, max_offset: int, first: int, last: int):
    """Transformer-XL's `r_t = W_R R(t)` as the attention ops' table (`RelativePositions.embeddings`).

    Args:
      relative_kernel: W_R, `[d_model, heads, head_dim]`.
      max_offset: M: the table has rows for offsets `-M .. M`.
      first, last: the offsets the op can attend, `-M <= first <= last <= M`; the
        other rows are zeros rather than projections nothing reads.

    Returns:
      float32 `[2 * max_offset + 1, heads, head_dim]`, row `M + t` holding `r_t`.
    """
    d_model = relative_kernel.shape[0]
    r = jnp.einsum(
        "md,dhe->mhe",
        relative_sinusoid(jnp.arange(first, last + 1), d_model),
        relative_kernel.astype(jnp.float32),
    )
    return jnp.pad(r, [(max_offset + first, max_offset - last), (0, 0), (0, 0)])


def txl_relative_qkv(q, k, v, *, content_bias, position_bias, relative_kernel, positions):
    """Adds Transformer-XL relative positions to q, k, v as extra head features.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]`.
      content_bias: u, `[heads, head_dim]`.
      position_bias: v, `[heads, head_dim]`.
      relative_kernel: W_R, `[d_model, heads, head_dim]`, applied to `R(i - j)`
        (rows: d_model/2 sine then d_model/2 cosine frequencies).
      positions: int `[seq]`, the absolute positions i (only differences matter).

    Returns:
      `(q', k', v')`, each `[batch, seq, heads, head_dim + d_model]` in q's dtype,
      such that `q'_i . k'_j = A_ij` above and attending with v' gives v's
      output in the first head_dim features (the rest are zero).
    """
    d_model = relative_kernel.shape[0]
    half = d_model // 2
    q32 = q.astype(jnp.float32)
    angles = positions.astype(jnp.float32)[:, None] * sinusoid_frequencies(d_model)[None, :]
    sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
    kernel = relative_kernel.astype(jnp.float32)
    query_for_positions = q32 + position_bias.astype(jnp.float32)
    a = jnp.einsum("bshd,fhd->bshf", query_for_positions, kernel[:half])
    b = jnp.einsum("bshd,fhd->bshf", query_for_positions, kernel[half:])
    query_extra = jnp.concatenate([a * sin + b * cos, b * sin - a * cos], axis=-1)
    batch, seq, heads, _ = q.shape
    key_extra = jnp.broadcast_to(jnp.concatenate([cos, sin], axis=-1), (batch, seq, heads, d_model))
    q_out = jnp.concatenate([q32 + content_bias.astype(jnp.float32), query_extra], axis=-1)
    k_out = jnp.concatenate([k.astype(jnp.float32), key_extra], axis=-1)
    v_out = jnp.concatenate([v, jnp.zeros((batch, seq, heads, d_model), v.dtype)], axis=-1)
    return q_out.astype(q.dtype), k_out.astype(k.dtype), v_out


def rotary(x, positions, *, base: float = 10000.0):
    """Rotary position embedding (rotate-half form) of `[batch, seq, heads, head_dim]`, even head_dim."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def roberta_position_ids(padding_mask, offset: int):
    """RoBERTa's positions: real tokens count from `offset + 1`, padding sits at `offset`.

    Args:
      padding_mask: bool `[batch, seq]` (or `[batch, choices, seq]`), True for real tokens.
      offset: the padding index of the position table (1 in RoBERTa).

    Returns:
      int32, padding_mask's shape.
    """
    real = padding_mask.astype(jnp.int32)
    return jnp.cumsum(real, axis=-1) * real + offset
