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
* Global tokens are few: dense passes over `max_global_tokens` slots merged
  with the band through the log-sum-exp (`global_tokens.py`).
* Transformer-XL relative positions (`relative.py`) enter each band block as
  the terms of the offsets the window can have; on a dilated subsequence those
  are every `dilation`-th offset.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from longjax.attention import band
from longjax.attention import global_tokens
from longjax.attention import relative as relative_lib
from longjax.attention.partial_softmax import PartialAttention
from longjax.attention.specs import SlidingWindowSpec


def _dilated_band(q, k, v, key_valid, *, left, right, dilation, block_size, scale, relative):
    """Band attention with dilation, via the `dilation` interleaved subsequences.

    relative: None or (queries `[batch, heads, seq, head_dim]`, embeddings
    `[2M + 1, heads, head_dim]` of this group's heads, M).
    """
    b, h, n, d = q.shape
    sub_len = -(-n // dilation)
    # Steps further than the subsequence length reach no key: clipping keeps the span small.
    left, right = min(left, sub_len - 1), min(right, sub_len - 1)
    block = block_size or band.choose_block_size(sub_len, left, right)
    band_relative = None
    if relative is not None:
        queries, embeddings, max_offset = relative
        rows = relative_lib.offset_rows(embeddings, max_offset=max_offset, left=left, right=right, step=dilation)
        band_relative = (queries, rows)
    if dilation == 1:
        return band.band_attention(
            q, k, v, key_valid, left=left, right=right, block=block, scale=scale, relative=band_relative
        )

    padded = sub_len * dilation

    def split(x):
        # position p = s * dilation + r goes to subsequence r, index s.
        x = jnp.pad(x, [(0, 0), (0, 0), (0, padded - n)] + [(0, 0)] * (x.ndim - 3))
        x = x.reshape(x.shape[:2] + (sub_len, dilation) + x.shape[3:])
        x = jnp.moveaxis(x, 3, 1)
        return x.reshape((b * dilation,) + x.shape[2:])

    valid = split(key_valid[:, None])[:, 0]
    if band_relative is not None:
        band_relative = (split(band_relative[0]), band_relative[1])
    part = band.band_attention(
        split(q), split(k), split(v), valid, left=left, right=right, block=block, scale=scale,
        relative=band_relative,
    )

    def merge_back(x):
        x = x.reshape((b, dilation) + x.shape[1:])
        x = jnp.moveaxis(x, 1, 3)
        return x.reshape(x.shape[:2] + (padded,) + x.shape[4:])[:, :, :n]

    return PartialAttention(*(merge_back(x) for x in part))


def _local(q, k, v, key_valid, spec: SlidingWindowSpec, block_size, scale, relative) -> PartialAttention:
    """The band of every head, heads grouped by dilation.

    relative: None or (queries `[batch, heads, seq, head_dim]`, embeddings
    `[2M + 1, heads, head_dim]`, M).
    """
    groups: dict[int, list[int]] = {}
    for head, dil in enumerate(spec.dilation):
        groups.setdefault(dil, []).append(head)
    parts, order = [], []
    for dil, heads in groups.items():
        idx = np.asarray(heads)
        take = (lambda x: x) if len(groups) == 1 else (lambda x: x[:, idx])
        group_relative = None
        if relative is not None:
            queries, embeddings, max_offset = relative
            group_relative = (take(queries), take(embeddings), max_offset)
        parts.append(
            _dilated_band(
                take(q), take(k), take(v), key_valid,
                left=spec.left, right=spec.right, dilation=dil, block_size=block_size, scale=scale,
                relative=group_relative,
            )
        )
        order.extend(heads)
    if len(parts) == 1:
        return parts[0]
    inverse = np.argsort(np.asarray(order))
    return PartialAttention(
        *(jnp.concatenate(xs, axis=1)[:, inverse] for xs in zip(*parts))
    )


def band_part(
    q, k, v, key_valid, *, spec: SlidingWindowSpec, scale: float, block_size=None, relative=None
) -> PartialAttention:
    """The band of every head, without global tokens, as a partial attention.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]`.
      key_valid: bool `[batch, seq]`, the keys the band may attend.
      relative: None or a `relative.RelativePositions` (queries shaped like q).

    Returns:
      float32 out `[batch, heads, seq, head_dim]` and lse `[batch, heads, seq]`.
    """
    to_bhnd = lambda x: jnp.swapaxes(x, 1, 2)
    if relative is not None:
        relative = (to_bhnd(relative.queries), relative.embeddings, relative.max_offset)
    return _local(to_bhnd(q), to_bhnd(k), to_bhnd(v), key_valid, spec, block_size, scale, relative)


def sliding_window_xla(
    q, k, v, *, spec: SlidingWindowSpec, global_mask=None, global_qkv=None, padding_mask=None,
    scale=None, max_global_tokens=None, block_size=None, relative=None,
):
    """Longformer attention in pure JAX; arguments as `longjax.attention.sliding_window_attention`.

    `max_global_tokens` must already be resolved to an int when `global_mask` is given.
    Rows with more global tokens than `max_global_tokens` come out as NaN.
    """
    if relative is not None and global_mask is not None:
        raise NotImplementedError("relative with global_mask: the band computes only the window's offsets")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    to_bhnd = lambda x: jnp.swapaxes(x, 1, 2)
    part = band_part(
        q, k, v, global_tokens.local_key_valid(q, global_mask, padding_mask), spec=spec, scale=scale,
        block_size=block_size, relative=relative,
    )
    if global_mask is not None:
        global_qkv = None if global_qkv is None else tuple(map(to_bhnd, global_qkv))
        out = global_tokens.add_global_tokens(
            part, to_bhnd(q), to_bhnd(k), to_bhnd(v), global_mask=global_mask, global_qkv=global_qkv,
            padding_mask=padding_mask, max_global_tokens=max_global_tokens,
            causal=spec.causal, scale=scale,
        )
    else:
        out = part.out
    return global_tokens.finish(to_bhnd(out), padding_mask, q.dtype)
