"""Token-level global attention beside a sparse pattern, shared by the sparse ops.

Global tokens are few: every query against the global keys, and the global
queries against every key, are dense passes over `max_global_tokens` slots,
linear in seq. The first merges with the sparse part through the log-sum-exp
(global keys are removed from the sparse part's keys, so each key counts
once); the second overwrites the rows of global queries. A row with more
global tokens than slots comes out as NaN rather than silently wrong.

The same two passes serve globals at static positions, the same in every row
(BigBird's global blocks on the block-sparse kernels): `to_keys_at` and
`from_queries_at` need no slots, hence no bound.

Layout: `[batch, heads, seq, head_dim]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from longjax.attention import partial_softmax
from longjax.attention.partial_softmax import PartialAttention


def local_key_valid(q, global_mask, padding_mask):
    """bool `[batch, seq]`: the keys the sparse part attends (real, and not global)."""
    valid = jnp.ones(q.shape[:2], bool) if padding_mask is None else padding_mask
    return valid if global_mask is None else valid & ~global_mask


def _global_slots(is_global, num_slots: int):
    """Positions of the global tokens of each row, in order, padded to `num_slots`.

    Returns (positions int32 `[batch, slots]`, slot_used bool `[batch, slots]`,
    overflow bool `[batch]` where a row has more globals than slots).
    """
    positions = jnp.argsort(~is_global, axis=-1, stable=True)[:, :num_slots].astype(jnp.int32)
    used = jnp.take_along_axis(is_global, positions, axis=-1)
    overflow = jnp.sum(is_global, axis=-1) > num_slots
    return positions, used, overflow


def _to_global_keys(q, k, v, positions, used, causal, scale) -> PartialAttention:
    """Every query against the global keys (the part of its key set outside the band)."""
    n = q.shape[2]
    gather = lambda x: jnp.take_along_axis(x, positions[:, None, :, None], axis=2)
    scores = jnp.einsum("bhnd,bhgd->bhng", q, gather(k), preferred_element_type=jnp.float32)
    mask = used[:, None, None, :]
    if causal:
        mask = mask & (positions[:, None, None, :] <= jnp.arange(n)[None, None, :, None])
    probs, lse = partial_softmax.masked_softmax(scores * scale, mask)
    out = jnp.einsum("bhng,bhgd->bhnd", probs.astype(v.dtype), gather(v), preferred_element_type=jnp.float32)
    return PartialAttention(out, lse)


def _from_global_queries(q, k, v, key_valid, positions, used, causal, scale):
    """Global queries against every key: `[batch, heads, slots, head_dim]`, normalised."""
    n = q.shape[2]
    q_sel = jnp.take_along_axis(q, positions[:, None, :, None], axis=2)
    scores = jnp.einsum("bhgd,bhnd->bhgn", q_sel, k, preferred_element_type=jnp.float32)
    mask = used[:, None, :, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    if causal:
        mask = mask & (jnp.arange(n)[None, None, None, :] <= positions[:, None, :, None])
    probs, _ = partial_softmax.masked_softmax(scores * scale, mask)
    return jnp.einsum("bhgn,bhnd->bhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def add_global_tokens(
    part: PartialAttention, q, k, v, *, global_mask, global_qkv, padding_mask, max_global_tokens,
    causal: bool, scale: float,
):
    """Completes a sparse partial attention with the global tokens.

    Args:
      part: the sparse part, computed without the global keys.
      q, k, v: `[batch, heads, seq, head_dim]`.
      global_mask, padding_mask: bool `[batch, seq]` (padding_mask may be None).
      global_qkv: None or `(q_g, k_g, v_g)` in q's layout, used by global queries.
      max_global_tokens: the static number of global slots.

    Returns:
      float32 `[batch, heads, seq, head_dim]`.
    """
    is_global = global_mask if padding_mask is None else global_mask & padding_mask
    positions, used, overflow = _global_slots(is_global, max_global_tokens)
    out = partial_softmax.merge(part, _to_global_keys(q, k, v, positions, used, causal, scale)).out
    gq, gk, gv = (q, k, v) if global_qkv is None else global_qkv
    global_out = _from_global_queries(gq, gk, gv, padding_mask, positions, used, causal, scale)
    slot_target = jnp.where(used, positions, q.shape[2])  # unused slots scatter out of bounds: dropped
    out = jax.vmap(lambda o, t, g: o.at[:, t].set(g, mode="drop"))(out, slot_target, global_out)
    return jnp.where(overflow[:, None, None, None], jnp.nan, out)


def to_keys_at(q, k, v, positions, key_valid, *, causal: bool, scale: float) -> PartialAttention:
    """Every query against the keys at static `positions` that `key_valid` allows.

    Args:
      q, k, v: `[batch, heads, seq, head_dim]`.
      positions: int NumPy `[g]`, distinct positions, the same for every row.
      key_valid: bool `[batch, seq]`.

    Returns:
      float32 out `[batch, heads, seq, head_dim]` and lse `[batch, heads, seq]`.
    """
    positions = np.asarray(positions, np.int32)
    slots = jnp.broadcast_to(jnp.asarray(positions), (q.shape[0], len(positions)))
    return _to_global_keys(q, k, v, slots, key_valid[:, positions], causal, scale)


def from_queries_at(q, k, v, positions, key_valid, *, causal: bool, scale: float):
    """The queries at static `positions` against every key `key_valid` allows (None: every key).

    Returns:
      float32 `[batch, heads, g, head_dim]`, normalised, for `positions` int NumPy `[g]`.
    """
    positions = np.asarray(positions, np.int32)
    slots = jnp.broadcast_to(jnp.asarray(positions), (q.shape[0], len(positions)))
    return _from_global_queries(q, k, v, key_valid, slots, jnp.ones(slots.shape, bool), causal, scale)


def finish(out, padding_mask, dtype):
    """Zeroes padded query rows of a `[batch, seq, heads, head_dim]` output and casts it."""
    if padding_mask is not None:
        out = jnp.where(padding_mask[:, :, None, None], out, 0.0)
    return out.astype(dtype)


def resolve_max_global_tokens(global_mask, padding_mask, max_global_tokens):
    """The static number of global slots: given, or counted from a concrete mask."""
    if max_global_tokens is not None:
        return max_global_tokens
    try:
        is_global = np.asarray(global_mask)
        if padding_mask is not None:
            is_global = is_global & np.asarray(padding_mask)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(
            "max_global_tokens must be given when global_mask is traced (under jit or vmap): "
            "it fixes the shape of the global-token passes"
        ) from e
    return max(1, int(is_global.sum(axis=-1).max()))
