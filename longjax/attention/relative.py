"""Transformer-XL relative positions computed inside the attention ops.

Transformer-XL scores query i against key j as

    A_ij = (q_i + u) . k_j + (q_i + v) . r_{i-j}

with `r_t` the per-head projection of the sinusoid of the offset t. The
content bias u is a shift of the queries, which the ops take as q. The
position term is what this module adds: the ops take the position queries
`q_i + v` and the table of `r_t`, and for each query block compute only the
offsets its keys can have, then the relative shift that places offset
`i - j` at key j. Nothing is widened per head and nothing is `seq x seq`.

The score of (i, j) becomes `scale * (q_i . k_j + queries_i . r_{i-j})`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class RelativePositions(NamedTuple):
    """The position term of Transformer-XL's scores, for the attention ops' `relative=` argument.

    Attributes:
      queries: `[batch, seq, heads, head_dim]`, the position queries (Transformer-XL: `q + v`),
        q's dtype.
      embeddings: `[2 * max_offset + 1, heads, head_dim]`; row `max_offset + t` is `r_t`, the
        embedding of the offset `t = i - j` (query position minus key position). An op
        needs every offset its pattern can attend (`max_offset` at least the reach that
        `sliding_window_reach` gives, or `seq - 1` for patterns that reach anywhere).
    """

    queries: jax.Array
    embeddings: jax.Array

    @property
    def max_offset(self) -> int:
        return (self.embeddings.shape[0] - 1) // 2


def sliding_window_reach(left: int, right: int, dilation, seq: int) -> int:
    """The largest `|i - j|` a sliding window attends: `max(dilation) * max(left, right)`, below seq."""
    return min(seq - 1, max(dilation) * max(left, right)) if seq > 0 else 0


def check_relative(relative, q, *, reach: int, name: str = "relative") -> None:
    """Checks the `relative=` argument of an op whose pattern reaches offsets up to `reach`."""
    if relative is None:
        return
    if not isinstance(relative, RelativePositions):
        raise ValueError(f"{name} must be None or a RelativePositions(queries, embeddings), got {type(relative)!r}")
    queries, embeddings = relative
    if getattr(queries, "shape", None) != q.shape or queries.dtype != q.dtype:
        raise ValueError(
            f"{name}.queries must have q's shape {q.shape} and dtype {q.dtype}, got "
            f"{getattr(queries, 'shape', None)} {getattr(queries, 'dtype', None)}"
        )
    heads, head_dim = q.shape[2:]
    shape = getattr(embeddings, "shape", None)
    if shape is None or len(shape) != 3 or shape[1:] != (heads, head_dim) or shape[0] % 2 != 1:
        raise ValueError(
            f"{name}.embeddings must be [2 * max_offset + 1, heads={heads}, head_dim={head_dim}], got {shape}"
        )
    if not jnp.issubdtype(embeddings.dtype, jnp.floating):
        raise ValueError(f"{name}.embeddings must be floating point, got {embeddings.dtype}")
    if relative.max_offset < reach:
        raise ValueError(
            f"{name}.embeddings covers offsets up to {relative.max_offset}, but the pattern attends "
            f"offsets up to {reach}: give at least 2 * {reach} + 1 rows"
        )


def dense_scores(relative: RelativePositions, seq: int):
    """The position term of every (query, key) pair: float32 `[batch, heads, seq, seq]`, unscaled.

    For the dense reference: quadratic in seq. Offsets beyond the table read its
    last row; every pattern masks them (`check_relative` sees to that).
    """
    queries, embeddings = relative
    by_offset = jnp.einsum(
        "bihd,mhd->bhim", queries.astype(jnp.float32), embeddings.astype(jnp.float32)
    )
    offsets = np.arange(seq)[:, None] - np.arange(seq)[None, :]
    index = np.clip(offsets + relative.max_offset, 0, embeddings.shape[0] - 1)
    return jnp.take_along_axis(by_offset, jnp.asarray(index)[None, None], axis=-1)


def offset_rows(embeddings, *, max_offset: int, left: int, right: int, step: int = 1):
    """The rows of offsets `step * left, step * (left - 1), ..., -step * right`: `[heads, left + right + 1, head_dim]`.

    Descending offsets, so that row c of a query block is its key `c` places
    to the right of the block's leftmost possible key (see `skew`).
    """
    index = max_offset + step * np.arange(left, -right - 1, -1)
    return jnp.swapaxes(embeddings[index], 0, 1)


def skew(by_offset, *, shift: int, span: int):
    """Places offsets at keys: `out[.., r, s] = by_offset[.., r, s - r + shift]`, 0 outside its columns.

    Transformer-XL's relative shift, for a query block of B rows whose row r
    holds the terms of W descending offsets (`offset_rows`) and a key span of
    `span` keys: key s of row r has the term in column `s - r + shift`.

    Args:
      by_offset: `[..., B, W]`.
      shift: static; where key 0 of row 0 reads.
      span: keys per row of the result.

    Returns:
      `[..., B, span]`.
    """
    *lead, rows, width = by_offset.shape
    # Row r shifted right by r: pad each row with `rows` zeros and re-cut the flat array
    # with rows one shorter, so x[r, t] = by_offset[r, t - r] (zero where t - r is outside).
    padded = jnp.pad(by_offset, [(0, 0)] * len(lead) + [(0, 0), (0, rows)])
    flat = padded.reshape(*lead, rows * (width + rows))[..., : rows * (width + rows - 1)]
    x = flat.reshape(*lead, rows, width + rows - 1)
    before, after = max(0, -shift), max(0, span + shift - x.shape[-1])
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (before, after)])
    return x[..., shift + before: shift + before + span]


def unskew(d_scores, *, shift: int, width: int):
    """The transpose of `skew`: `[..., B, span]` -> `[..., B, W]` (gradients of the per-offset terms).

    Written out rather than left to `jax.linear_transpose`, whose zero cotangent
    would not carry the per-device variance the scores have under `shard_map`.
    """
    *lead, rows, span = d_scores.shape
    lead_pad = [(0, 0)] * len(lead)
    skewed_width = width + rows - 1
    before, after = max(0, -shift), max(0, span + shift - skewed_width)
    # Back through the window of the padded skewed rows...
    start = shift + before
    d_x = jnp.pad(d_scores, lead_pad + [(0, 0), (start, before + skewed_width + after - start - span)])
    d_x = d_x[..., before: before + skewed_width]
    # ...and through the re-cut of the flat array.
    flat = jnp.pad(d_x.reshape(*lead, rows * skewed_width), lead_pad + [(0, rows)])
    return flat.reshape(*lead, rows, width + rows)[..., :width]
