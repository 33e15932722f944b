"""Longformer sliding-window attention (window, dilation, global tokens), XLA implementation.

Layout inside this module is `[batch, heads, seq, head_dim]`, transposed once at
the boundary. Nothing here builds a `seq x seq` array:

* The band is computed in query blocks of length B, each against the key span
  covering its window (`band.py`), so time and memory are linear in seq.
  Unlike Longformer's overlapping chunks, only the blocks the window touches
  are computed.
* Dilation d is reduced exactly to an undilated window: the positions
  `r, r + d, r + 2d, ...` form d interleaved subsequences, and on each one the
  dilated window is an ordinary window. Heads are grouped by dilation.
* Global tokens are few: every query against the global keys, and the global
  queries against every key, are dense passes over `max_global_tokens` slots.
  The first merges with the band through the log-sum-exp (global keys are
  removed from the band so each key counts once); the second overwrites the
  rows of global queries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from longjax.attention import band
from longjax.attention import softmax_stats
from longjax.attention.arguments import SlidingWindowSpec
from longjax.attention.softmax_stats import PartialAttention


def _dilated_band(q, k, v, key_valid, *, left, right, dilation, block_size, scale):
    """Band attention with dilation, via the `dilation` interleaved subsequences."""
    b, h, n, d = q.shape
    sub_len = -(-n // dilation)
    # Steps further than the subsequence length reach no key: clipping keeps the span small.
    left, right = min(left, sub_len - 1), min(right, sub_len - 1)
    block = block_size or band.choose_block_size(sub_len, left, right)
    if dilation == 1:
        return band.band_attention(q, k, v, key_valid, left=left, right=right, block=block, scale=scale)

    padded = sub_len * dilation

    def split(x):
        # position p = s * dilation + r goes to subsequence r, index s.
        x = jnp.pad(x, [(0, 0), (0, 0), (0, padded - n)] + [(0, 0)] * (x.ndim - 3))
        x = x.reshape(x.shape[:2] + (sub_len, dilation) + x.shape[3:])
        x = jnp.moveaxis(x, 3, 1)
        return x.reshape((b * dilation,) + x.shape[2:])

    valid = split(key_valid[:, None])[:, 0]
    part = band.band_attention(
        split(q), split(k), split(v), valid, left=left, right=right, block=block, scale=scale
    )

    def merge_back(x):
        x = x.reshape((b, dilation) + x.shape[1:])
        x = jnp.moveaxis(x, 1, 3)
        return x.reshape(x.shape[:2] + (padded,) + x.shape[4:])[:, :, :n]

    return PartialAttention(*(merge_back(x) for x in part))


def _local(q, k, v, key_valid, spec: SlidingWindowSpec, block_size, scale) -> PartialAttention:
    """The band of every head, heads grouped by dilation."""
    groups: dict[int, list[int]] = {}
    for head, dil in enumerate(spec.dilation):
        groups.setdefault(dil, []).append(head)
    parts, order = [], []
    for dil, heads in groups.items():
        idx = np.asarray(heads)
        take = (lambda x: x) if len(groups) == 1 else (lambda x: x[:, idx])
        parts.append(
            _dilated_band(
                take(q), take(k), take(v), key_valid,
                left=spec.left, right=spec.right, dilation=dil, block_size=block_size, scale=scale,
            )
        )
        order.extend(heads)
    if len(parts) == 1:
        return parts[0]
    inverse = np.argsort(np.asarray(order))
    return PartialAttention(
        *(jnp.concatenate(xs, axis=1)[:, inverse] for xs in zip(*parts))
    )


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
    probs, lse = softmax_stats.masked_softmax(scores * scale, mask)
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
    probs, _ = softmax_stats.masked_softmax(scores * scale, mask)
    return jnp.einsum("bhgn,bhnd->bhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def sliding_window_xla(
    q, k, v, *, spec: SlidingWindowSpec, global_mask=None, global_qkv=None, padding_mask=None,
    scale=None, max_global_tokens=None, block_size=None,
):
    """Longformer attention in pure JAX; arguments as `longjax.attention.sliding_window_attention`.

    `max_global_tokens` must already be resolved to an int when `global_mask` is given.
    Rows with more global tokens than `max_global_tokens` come out as NaN.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    to_bhnd = lambda x: jnp.swapaxes(x, 1, 2)
    qh, kh, vh = to_bhnd(q), to_bhnd(k), to_bhnd(v)

    key_valid = jnp.ones(q.shape[:2], bool) if padding_mask is None else padding_mask
    if global_mask is not None:
        is_global = global_mask & key_valid
        # Global keys are attended through the global-key pass, so the band skips them.
        key_valid = key_valid & ~global_mask

    part = _local(qh, kh, vh, key_valid, spec, block_size, scale)

    if global_mask is not None:
        positions, used, overflow = _global_slots(is_global, max_global_tokens)
        part = softmax_stats.merge(
            part, _to_global_keys(qh, kh, vh, positions, used, spec.causal, scale)
        )
        out = part.out
        gq, gk, gv = (qh, kh, vh) if global_qkv is None else map(to_bhnd, global_qkv)
        global_out = _from_global_queries(gq, gk, gv, padding_mask, positions, used, spec.causal, scale)
        n = q.shape[1]
        slot_target = jnp.where(used, positions, n)  # unused slots scatter out of bounds: dropped
        out = jax.vmap(lambda o, t, g: o.at[:, t].set(g, mode="drop"))(out, slot_target, global_out)
        out = jnp.where(overflow[:, None, None, None], jnp.nan, out)
    else:
        out = part.out

    out = to_bhnd(out)
    if padding_mask is not None:
        out = jnp.where(padding_mask[:, :, None, None], out, 0.0)
    return out.astype(q.dtype)


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
