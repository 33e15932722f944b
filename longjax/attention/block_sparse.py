"""BigBird block-sparse attention: random layouts and the XLA implementation.

A query block that is not global attends a fixed-length list of key blocks:
its window, the global blocks and its random blocks. The list is built on the
host from the static pattern (linear in the number of blocks); entries that
are out of range, -1, repeated within the row, or (causal) after the query
block are flagged invalid, so every key counts once. A global query block
attends every key: its keys are cut into rows of the same length, whose
partial results merge by log-sum-exp, so one `lax.scan` over rows serves
both. Each step gathers one row's key blocks, `[heads, keys_per_row x
block, head_dim]` (no copy of k, v holds every row's), and runs one masked
flash-attention step (`flash_step.py`); the backward pass recomputes it and
adds dq, dk, dv into float32 accumulators in place. Token-level global
tokens go through `global_tokens.py`. Nothing is `seq x seq`.

Transformer-XL relative positions (`relative.py`) enter a row as one product
per key block, `[block, 2 * block - 1]`, with the embeddings of the offsets
that block can have (random and global blocks reach any offset, so the table
covers the whole sequence), then the relative shift into the block's keys;
the backward pass adds the table's gradient into a float32 accumulator in
place.

Layout inside: `[batch, seq, heads, head_dim]`, the public one, blocked as
`[batch, blocks, block, heads, head_dim]` (a reshape, not a copy); per-row
results stay in row order, `[rows, batch, block, heads, ...]`, until the end.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.common import MASK_VALUE, backward_row_terms
from longjax.attention import arguments, flash_step, global_tokens
from longjax.attention import relative as relative_lib
from longjax.attention.partial_softmax import PartialAttention
from longjax.attention.specs import BlockSparseSpec


def bigbird_random_layout(
    num_blocks: int,
    num_heads: int,
    num_random_blocks: int,
    *,
    num_window_blocks: int = 3,
    global_blocks=(0, -1),
    causal: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """BigBird's random key blocks per head and query block.

    Each row draws, without repetition, from the blocks that neither its window
    nor the global blocks already cover (and, when causal, only from earlier
    blocks), so no key is counted twice. Deterministic in (seed, arguments);
    each head draws from its own stream. Rows of global blocks, and rows with
    fewer candidates than `num_random_blocks`, are filled with -1.

    Returns:
      int32 `[num_heads, num_blocks, num_random_blocks]`.
    """
    arguments.check_int(num_blocks, name="num_blocks")
    arguments.check_int(num_heads, name="num_heads")
    arguments.check_num_window_blocks(num_window_blocks)
    arguments.check_int(num_random_blocks, name="num_random_blocks", minimum=0)
    globals_ = arguments.normalize_global_blocks(global_blocks, num_blocks)
    radius = num_window_blocks // 2
    layout = np.full((num_heads, num_blocks, num_random_blocks), -1, np.int32)
    if num_random_blocks == 0:
        return layout
    for head in range(num_heads):
        rng = np.random.default_rng([seed, head])
        for a in range(num_blocks):
            if a in globals_:
                continue
            # Candidates are [0, limit) minus the covered blocks, which are few:
            # draw ranks among the candidates, then map ranks to block indices.
            limit = max(0, a - radius) if causal else num_blocks
            covered = sorted(
                {b for b in range(a - radius, a + radius + 1) if 0 <= b < limit}
                | {g for g in globals_ if g < limit}
            )
            available = limit - len(covered)
            take = min(num_random_blocks, available)
            if take == 0:
                continue
            ranks = np.sort(rng.choice(available, size=take, replace=False))
            blocks = []
            for rank in ranks:
                block = int(rank)
                for c in covered:  # ascending: each covered block below shifts the rank up
                    if block >= c:
                        block += 1
                blocks.append(block)
            layout[head, a, :take] = rng.permutation(blocks)
    return layout


def key_block_lists(spec: BlockSparseSpec):
    """The static layout of the sparse (non-global) query blocks.

    Returns:
      query_blocks: int32 `[rows]`, the non-global query blocks.
      key_blocks: int32 `[heads, rows, keys_per_row]`: window, globals, random.
      key_used: bool, same shape: False for entries out of range, -1, repeated
        earlier in the row, or (causal) after the query block.
    """
    nb, s = spec.num_blocks, spec.window_radius
    query_blocks = np.asarray([a for a in range(nb) if a not in spec.global_blocks], np.int32)
    heads = spec.random_layout.shape[0]
    # Causal rows never see the right half of their window: leave it out of the list.
    offsets = np.arange(-s, 1 if spec.causal else s + 1)
    window = query_blocks[:, None] + offsets[None, :]
    parts = [
        np.broadcast_to(window, (heads,) + window.shape),
        np.broadcast_to(np.asarray(spec.global_blocks, np.int32), (heads, len(query_blocks), len(spec.global_blocks))),
        spec.random_layout[:, query_blocks],
    ]
    key_blocks = np.concatenate(parts, axis=-1).astype(np.int32)
    used = (key_blocks >= 0) & (key_blocks < nb)
    if spec.causal:
        used &= key_blocks <= query_blocks[None, :, None]
    same = key_blocks[..., :, None] == key_blocks[..., None, :]
    earlier = np.tril(np.ones((key_blocks.shape[-1],) * 2, bool), k=-1)
    used &= ~np.any(same & earlier & used[..., None, :], axis=-1)
    return query_blocks, np.where(used, key_blocks, 0).astype(np.int32), used


def kernel_key_lists(spec: BlockSparseSpec):
    """The sparse rows' key blocks without the global blocks: what the Pallas kernels visit.

    Returns:
      query_blocks: int32 `[rows]`, as `key_block_lists`.
      key_blocks: int32 `[heads, rows, entries]`: the window, then the random blocks
        (`entries = window entries + num_random_blocks`).
      key_used: bool, same shape: as `key_block_lists`, and False for global blocks.
    """
    query_blocks, key_blocks, key_used = key_block_lists(spec)
    random = spec.random_layout.shape[-1]
    window = key_blocks.shape[-1] - len(spec.global_blocks) - random
    keep = np.r_[0:window, key_blocks.shape[-1] - random:key_blocks.shape[-1]]
    is_global = np.zeros(spec.num_blocks, bool)
    is_global[list(spec.global_blocks)] = True
    key_blocks, key_used = key_blocks[..., keep], key_used[..., keep]
    return query_blocks, key_blocks, key_used & ~is_global[key_blocks]


def _global_row_lists(spec: BlockSparseSpec, keys_per_row: int):
    """The global query blocks' rows: every key block (causal: up to their own), `keys_per_row` a row.

    Returns:
      query_blocks, key_blocks, key_used: as `key_block_lists`, for these rows.
      segment: int32 `[rows]`, the index in `spec.global_blocks` of each row's query block.
    """
    query_blocks, key_blocks, key_used, segment = [], [], [], []
    for i, g in enumerate(spec.global_blocks):
        end = g + 1 if spec.causal else spec.num_blocks
        for start in range(0, end, keys_per_row):
            ids = np.arange(start, start + keys_per_row)
            query_blocks.append(g)
            key_blocks.append(np.where(ids < end, ids, 0))
            key_used.append(ids < end)
            segment.append(i)
    shape = (spec.random_layout.shape[0], len(query_blocks), keys_per_row)
    per_head = lambda rows, dtype: np.broadcast_to(np.asarray(rows, dtype).reshape(shape[1:]), shape)
    return (
        np.asarray(query_blocks, np.int32), per_head(key_blocks, np.int32), per_head(key_used, bool),
        np.asarray(segment, np.int32),
    )


def _blocks(x, num_blocks: int, block: int, axis: int = 1):
    """Cuts `axis` (a sequence) into `[num_blocks, block]`, zero-padding the last block."""
    pad = num_blocks * block - x.shape[axis]
    if pad:
        x = jnp.pad(x, [(0, pad if i == axis else 0) for i in range(x.ndim)])
    return x.reshape(x.shape[:axis] + (num_blocks, block) + x.shape[axis + 1:])


def _unblock(x, seq: int):
    """`[batch, blocks, block, ...]` -> `[batch, seq, ...]`."""
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :seq]


def _heads_first(x):
    """`[batch, block, heads, d]` <-> `[batch, heads, block, d]`: one block, so the copy stays in cache."""
    return jnp.swapaxes(x, 1, 2)


# One head's block is a `[block, d]` slice of `_flat(xb)`, `[batch * blocks, block, heads * d]`. With
# these numbers the gathered blocks come out, and the added ones go in, as `[batch * heads * n, block,
# d]`: the memory order of a `[batch, heads, n * block, d]` dot operand or result. Other forms (jnp
# indexing, size-1 window dimensions inserted by XLA) cost a layout copy of every block per step.
_BLOCK_SLICE = dict(offset_dims=(1, 2), collapsed_slice_dims=(0,), start_index_map=(0, 1, 2))
_BLOCK_UPDATE = dict(update_window_dims=(1, 2, 3), inserted_window_dims=(), scatter_dims_to_operand_dims=(0, 1, 2))


def _flat(xb):
    batch, blocks, block, heads, d = xb.shape
    return xb.reshape(batch * blocks, block, heads * d)


def _block_index(xb, ids):
    """int32 `[batch * heads * n, 3]`: where head h's block `ids[h, i]` starts in `_flat(xb)`, each batch row."""
    batch, blocks, _, _, d = xb.shape
    shape = (batch,) + ids.shape
    rows = jnp.arange(batch)[:, None, None] * blocks + ids
    columns = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None] * d, shape)
    index = [rows, jnp.zeros(shape, jnp.int32), columns]
    return jnp.stack([i.astype(jnp.int32) for i in index], axis=-1).reshape(-1, 3)


def _take(xb, ids):
    """Head i's blocks `ids[i]` of xb `[batch, blocks, block, heads, d]`, as `[batch, heads, n * block, d]`."""
    batch, _, block, _, d = xb.shape
    blocks = jax.lax.gather(
        _flat(xb), _block_index(xb, ids), jax.lax.GatherDimensionNumbers(**_BLOCK_SLICE), (1, block, d),
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return blocks.reshape(batch, ids.shape[0], -1, d)


def _add_blocks(xb, ids, x):
    """xb with x `[batch, heads, n * block, d]` added to the blocks `_take(xb, ids)` reads."""
    block, d = xb.shape[2], xb.shape[4]
    flat = jax.lax.scatter_add(
        _flat(xb), _block_index(xb, ids), x.reshape(-1, 1, block, d),
        jax.lax.ScatterDimensionNumbers(**_BLOCK_UPDATE), mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return flat.reshape(xb.shape)


def _row_mask(validb, a, ids, used, block: int, causal: bool):
    """bool `[batch, heads, 1 or block, n * block]`: the keys the queries of block a attend."""
    mask = validb[:, ids] & used[None, :, :, None]  # [batch, heads, n, block]
    mask = mask.reshape(mask.shape[:2] + (1, -1))
    if causal:
        key_pos = (ids[:, :, None] * block + jnp.arange(block)).reshape(ids.shape[0], -1)
        query_pos = a * block + jnp.arange(block)
        mask = mask & (key_pos[None, :, None, :] <= query_pos[None, None, :, None])
    return mask


def _offset_index(embeddings, a, ids, block: int):
    """int32 `[heads, n, 2 * block - 1]`: the table rows of the offsets query block a can have with its
    key blocks `ids` `[heads, n]`, descending (`relative.skew`'s order).

    Key block `ids[h, i]` holds the offsets `(a - ids[h, i]) * block + block - 1` down to
    `(a - ids[h, i]) * block - (block - 1)`. Offsets past the table (padding's, which are masked) are
    clipped to its ends.
    """
    max_offset = (embeddings.shape[0] - 1) // 2
    first = max_offset + (a - ids) * block + block - 1
    return jnp.clip(first[..., None] - jnp.arange(2 * block - 1), 0, embeddings.shape[0] - 1)


def _by_offset(rel_blk, embeddings, index, precision=None):
    """The position queries of a block `[batch, block, heads, d]` against the rows `index` of each
    head: float32 `[batch, heads, n, block, 2 * block - 1]`, and the rows `[heads, n, 2 * block - 1, d]`."""
    rows = embeddings[index, jnp.arange(index.shape[0])[:, None, None]]
    by_offset = jnp.einsum(
        "bqhd,hnwd->bhnqw", rel_blk, rows, preferred_element_type=jnp.float32, precision=precision
    )
    return by_offset, rows


def _relative_scores(by_offset, block: int):
    """`_by_offset`'s terms placed at their keys: float32 `[batch, heads, block, n * block]`.

    Key s of block i, row r, has offset `(a - id) * block + r - s`: column `s - r + block - 1`.
    """
    skewed = relative_lib.skew(by_offset, shift=block - 1, span=block)  # [b, h, n, block, block]
    b, h, n = skewed.shape[:3]
    return jnp.swapaxes(skewed, 2, 3).reshape(b, h, block, n * block)


def _row_bias(relb, embeddings, a, ids, block: int, scale: float):
    """The position term of the row (a, ids), float32 `[batch, heads, block, n * block]`, and what its
    gradient needs: the scaled position queries `[batch, block, heads, d]`, the rows of the table they
    met `[heads, n, 2 * block - 1, d]` and those rows' indices. relb: the position queries blocked."""
    index = _offset_index(embeddings, a, ids, block)
    rel_blk = relb[:, a] * scale
    by_offset, rows = _by_offset(rel_blk, embeddings, index)
    return _relative_scores(by_offset, block), (rel_blk, rows, index)


def position_terms(queries, embeddings, query_blocks, key_blocks, block: int):
    """The position term of each (query block, key block) pair: float32 `[rows, batch, heads, n, block, block]`.

    Entry `[r, :, h, i, s, t]` is `queries_p . r_{p - k}` for query p = `query_blocks[r] * block + s`
    and key k = `key_blocks[h, r, i] * block + t` (unscaled), by one `[block, 2 * block - 1]`
    product per pair and the relative shift, a row at a time (no `[seq, keys, head_dim]` gather).
    Float32 queries get float32 products (`Precision.HIGHEST`). Differentiable (autodiff).

    Args:
      queries: `[batch, seq, heads, head_dim]`, the position queries.
      embeddings: `[2 * max_offset + 1, heads, head_dim]` covering every offset of the sequence.
      query_blocks: int `[rows]`; key_blocks: int `[heads, rows, n]`.
    """
    relb = _blocks(queries, -(-queries.shape[1] // block), block)
    precision = jax.lax.Precision.HIGHEST if queries.dtype == jnp.float32 else None

    def row(xs):
        a, ids = xs
        by_offset, _ = _by_offset(relb[:, a], embeddings, _offset_index(embeddings, a, ids, block), precision)
        return relative_lib.skew(by_offset, shift=block - 1, span=block)

    return jax.lax.map(row, (jnp.asarray(query_blocks), jnp.moveaxis(jnp.asarray(key_blocks), 1, 0)))


def _relative_grads(d_scores, by_offset_inputs, block: int):
    """Gradients of the position queries `[batch, block, heads, d]` and of the rows `[heads, n, W, d]`
    (float32) from the scores' `[batch, heads, block, n * block]` (the transpose of `_relative_scores`)."""
    rel_blk, rows = by_offset_inputs
    b, h, _, keys = d_scores.shape
    d_skewed = jnp.swapaxes(d_scores.reshape(b, h, block, keys // block, block), 2, 3)
    d_by_offset = relative_lib.unskew(d_skewed, shift=block - 1, width=2 * block - 1).astype(rel_blk.dtype)
    d_rel_blk = jnp.einsum("bhnqw,hnwd->bqhd", d_by_offset, rows, preferred_element_type=jnp.float32)
    d_rows = jnp.einsum("bhnqw,bqhd->hnwd", d_by_offset, rel_blk, preferred_element_type=jnp.float32)
    return d_rel_blk, d_rows


def _rows_setup(q, k, v, key_valid, query_blocks, key_blocks, key_used, row_kind, block):
    """q, k, v and key_valid blocked, and the layout as scan inputs, one row a step."""
    nb = -(-q.shape[1] // block)
    blocked = tuple(_blocks(x, nb, block) for x in (q, k, v))
    validb = _blocks(key_valid, nb, block, axis=2)
    xs = (query_blocks, jnp.moveaxis(key_blocks, 1, 0), jnp.moveaxis(key_used, 1, 0), row_kind)
    return blocked, validb, xs


def _rows_forward(q, k, v, key_valid, query_blocks, key_blocks, key_used, row_kind, relative, block, causal, scale):
    (qb, kb, vb), validb, xs = _rows_setup(q, k, v, key_valid, query_blocks, key_blocks, key_used, row_kind, block)
    relb = None if relative is None else _blocks(relative[0], qb.shape[1], block)

    def step(_, row):
        a, ids, used, kind = row
        mask = _row_mask(validb[kind], a, ids, used, block, causal)
        bias = None if relb is None else _row_bias(relb, relative[1], a, ids, block, scale)[0]
        scores = flash_step.masked_scores(_heads_first(qb[:, a] * scale), _take(kb, ids), mask, bias=bias)
        out, lse = flash_step.attend(scores, _take(vb, ids))
        return None, (_heads_first(out), lse)

    _, (out, lse) = jax.lax.scan(step, None, xs)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _rows(q, k, v, key_valid, query_blocks, key_blocks, key_used, row_kind, relative, block, causal, scale):
    """Each row's attention, float32: out `[rows, batch, block, heads, d]`, lse `[rows, batch, heads, block]`.

    q, k, v: `[batch, seq, heads, head_dim]`; key_valid: bool `[kinds, batch, seq]`, row r using
    `key_valid[row_kind[r]]`; the rows as `key_block_lists` gives them (a query block may have several
    rows); relative: None, or (position queries like q, embeddings `[2 * max_offset + 1, heads,
    head_dim]` covering every offset of the sequence), as `relative.RelativePositions`; scale
    multiplies the queries and the position queries. Results stay per row, in row order, so the
    backward pass reads each row's out, lse and cotangents as one contiguous slice.
    """
    return _rows_forward(
        q, k, v, key_valid, query_blocks, key_blocks, key_used, row_kind, relative, block, causal, scale
    )


def _rows_fwd(q, k, v, key_valid, query_blocks, key_blocks, key_used, row_kind, relative, block, causal, scale):
    out, lse = _rows_forward(
        q, k, v, key_valid, query_blocks, key_blocks, key_used, row_kind, relative, block, causal, scale
    )
    return (out, lse), (q, k, v, key_valid, query_blocks, key_blocks, key_used, row_kind, relative, out, lse)


def _dot(subscripts: str, a, b):
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


def _step_grads(q_blk, keys, values, d_out, lse, row_term, mask, bias=None):
    """dq `[.., block, d]`, dk and dv `[.., keys, d]` (float32) of one query block against its keys, and
    the scores' gradients `[.., block, keys]` (in the keys' dtype). bias: the position term, float32
    `[.., block, keys]`, or None.

    Scores are recomputed key-major, `[.., keys, block]`: XLA:CPU sends a dot to its fast library
    only when the left operand contracts its last axis, so dk and dv (which contract over queries)
    need the key-major probabilities, and dq the query-major ones, one transposed copy of d_scores
    (the barrier keeps XLA from folding the transpose back into the dot).
    """
    scores = _dot("bhkd,bhqd->bhkq", keys, q_blk)
    if bias is not None:
        scores = scores + jnp.swapaxes(bias, -1, -2)
    scores = jnp.where(jnp.swapaxes(mask, -1, -2), scores, MASK_VALUE)
    probs = jnp.exp(scores - lse[..., None, :])
    d_scores = probs * (_dot("bhkd,bhqd->bhkq", values, d_out) + row_term[..., None, :])
    dk = _dot("bhkq,bhqd->bhkd", d_scores.astype(q_blk.dtype), q_blk)
    dv = _dot("bhkq,bhqd->bhkd", probs.astype(d_out.dtype), d_out)
    d_scores = jax.lax.optimization_barrier(jnp.swapaxes(d_scores, -1, -2).astype(keys.dtype))
    return _dot("bhqk,bhkd->bhqd", d_scores, keys), dk, dv, d_scores


def _rows_bwd(block, causal, scale, residuals, cotangents):
    q, k, v, key_valid, query_blocks, key_blocks, key_used, row_kind, relative, out, lse = residuals
    (qb, kb, vb), validb, xs = _rows_setup(q, k, v, key_valid, query_blocks, key_blocks, key_used, row_kind, block)
    relb = None if relative is None else _blocks(relative[0], qb.shape[1], block)

    def step(grads, row):
        dqb, dkb, dvb, d_rel = grads
        (a, ids, used, kind), out, lse, d_out, d_lse = row
        d_out = _heads_first(d_out)
        row_term, lse = backward_row_terms(_heads_first(out), lse, d_out, d_lse)
        bias = None
        if relb is not None:
            bias, (rel_blk, rows, index) = _row_bias(relb, relative[1], a, ids, block, scale)
        dq, dk, dv, d_scores = _step_grads(
            _heads_first(qb[:, a] * scale), _take(kb, ids), _take(vb, ids), d_out.astype(v.dtype), lse, row_term,
            _row_mask(validb[kind], a, ids, used, block, causal), bias,
        )
        if relb is not None:
            d_rel_blk, d_rows = _relative_grads(d_scores, (rel_blk, rows), block)
            d_relb, d_table = d_rel
            heads = jnp.arange(index.shape[0])[:, None, None]
            d_rel = (d_relb.at[:, a].add(d_rel_blk * scale), d_table.at[index, heads].add(d_rows))
        grads = (dqb.at[:, a].add(_heads_first(dq) * scale), _add_blocks(dkb, ids, dk), _add_blocks(dvb, ids, dv))
        return grads + (d_rel,), None

    # In place across steps. zeros_like: under shard_map they must vary along the axes their inputs do.
    zeros = tuple(jnp.zeros_like(x, jnp.float32) for x in (qb, kb, vb))
    d_rel0 = None if relb is None else (jnp.zeros_like(relb, jnp.float32), jnp.zeros_like(relative[1], jnp.float32))
    (dqb, dkb, dvb, d_rel), _ = jax.lax.scan(step, zeros + (d_rel0,), (xs, out, lse, *cotangents))
    seq = q.shape[1]
    grads = tuple(_unblock(g, seq).astype(x.dtype) for g, x in ((dqb, q), (dkb, k), (dvb, v)))
    d_relative = None
    if relative is not None:
        d_relative = (_unblock(d_rel[0], seq).astype(relative[0].dtype), d_rel[1].astype(relative[1].dtype))
    return grads + (None,) * 5 + (d_relative,)


_rows.defvjp(_rows_fwd, _rows_bwd)


def sparse_part(q, k, v, key_valid, query_blocks, key_blocks, key_used, block: int, causal: bool):
    """The sparse rows of a block layout, as (out, lse) `[batch, heads, seq(, head_dim)]`.

    q (already multiplied by the score scale), k, v: `[batch, heads, seq, head_dim]`, seq a whole
    number of blocks; key_valid bool `[batch, seq]`; the layout as `key_block_lists` gives it (any
    key-block numbering over this k, v). Rows not in `query_blocks` come out 0, lse `MASK_VALUE`.
    """
    to_bsnd = lambda x: jnp.swapaxes(x, 1, 2)
    out, lse = _rows(
        to_bsnd(q), to_bsnd(k), to_bsnd(v), key_valid[None], query_blocks, key_blocks, key_used,
        jnp.zeros_like(query_blocks), None, block, causal, 1.0,
    )
    nb = q.shape[2] // block
    # Padded rows of a sharded layout repeat a block; they attend nothing, and that block is unused.
    out = jnp.zeros((nb,) + out.shape[1:], out.dtype).at[query_blocks].set(out)
    lse = jnp.full((nb,) + lse.shape[1:], MASK_VALUE, lse.dtype).at[query_blocks].set(lse)
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], -1, *out.shape[-2:])
    return to_bsnd(out), jnp.moveaxis(lse, 0, 2).reshape(lse.shape[1:3] + (-1,))


def global_block_positions(spec: BlockSparseSpec, seq_len: int) -> np.ndarray | None:
    """int32 NumPy `[g]`: the token positions of the global blocks, in order (None when there are none)."""
    if not spec.global_blocks:
        return None
    size = spec.block_size
    return np.concatenate(
        [np.arange(g * size, min((g + 1) * size, seq_len)) for g in spec.global_blocks]
    ).astype(np.int32)


def _in_block_order(sparse, global_rows, query_blocks, global_blocks):
    """`[blocks, ...]` from the sparse blocks' rows (ascending `query_blocks`) and the global blocks' rows."""
    pieces, start = [], 0
    for i, g in enumerate(global_blocks):
        stop = int(np.searchsorted(query_blocks, g))
        pieces += [sparse[start:stop], global_rows[i:i + 1]]
        start = stop
    return jnp.concatenate(pieces + [sparse[start:]])


def _by_position(global_out, spec: BlockSparseSpec, seq: int):
    """The global blocks' merged rows `[g_blocks, batch, block, heads, d]` (`_merge_rows`) as `[batch, g, heads,
    d]` for the `g` positions of `global_block_positions`, in its order."""
    b, h, d = global_out.shape[1], global_out.shape[3], global_out.shape[4]
    return jnp.moveaxis(global_out, 0, 1).reshape(b, -1, h, d)[:, :len(global_block_positions(spec, seq))]


def _merge_rows(out, lse, segment, count: int):
    """The rows of each segment merged by log-sum-exp (their key sets are disjoint): out `[count, ...]`."""
    top = jax.lax.stop_gradient(jax.ops.segment_max(lse, segment, count, indices_are_sorted=True))
    weights = jnp.exp(lse - top[segment])
    total = jax.ops.segment_sum(weights, segment, count, indices_are_sorted=True)
    as_out = lambda x: jnp.swapaxes(x, 2, 3)[..., None]  # [.., heads, block] -> [.., block, heads, 1]
    merged = jax.ops.segment_sum(out * as_out(weights), segment, count, indices_are_sorted=True)
    return merged / as_out(total)


def _sparse_partial(out, lse, query_blocks, global_blocks, seq: int) -> PartialAttention:
    """The sparse rows' results (`_rows` order) as a partial attention `[batch, heads, seq(, head_dim)]`,
    float32; the global blocks' rows attend nothing in it (out 0, lse `MASK_VALUE`)."""
    none = lambda x, fill: jnp.full((len(global_blocks),) + x.shape[1:], fill, x.dtype)
    sparse_out = _in_block_order(out, none(out, 0.0), query_blocks, global_blocks)
    sparse_lse = _in_block_order(lse, none(lse, MASK_VALUE), query_blocks, global_blocks)
    b, h = lse.shape[1:3]
    return PartialAttention(
        jnp.swapaxes(_unblock(jnp.moveaxis(sparse_out, 0, 1), seq), 1, 2),
        jnp.moveaxis(sparse_lse, 0, 2).reshape(b, h, -1)[..., :seq],
    )


def global_blocks_relative(q, k, v, key_valid, *, spec: BlockSparseSpec, relative, scale: float):
    """BigBird's global blocks with relative positions, through this module's rows: what the Pallas
    kernels leave out of the pattern when they add the position term.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]`.
      key_valid: bool `[batch, seq]`, the keys any query may attend.
      spec: with at least one global block.
      relative: a `RelativePositions` covering every offset of the sequence.
      scale: the score multiplier.

    Returns:
      part: every query of a sparse block against the global blocks' keys, a float32 partial
        attention (out `[batch, heads, seq, head_dim]`, lse `[batch, heads, seq]`; the global
        blocks' own rows attend nothing in it).
      rows: the global blocks' queries against every key, float32 `[batch, g, heads, head_dim]`
        for the `g` positions of `global_block_positions`, in its order.
    """
    b, seq, h, d = q.shape
    block, rel = spec.block_size, (relative.queries, relative.embeddings)
    key_valid = key_valid[None]
    query_blocks, key_blocks, _ = key_block_lists(spec)
    global_q, global_k, global_used, segment = _global_row_lists(spec, key_blocks.shape[-1])
    row_kind = lambda rows: jnp.zeros(len(rows), jnp.int32)
    out, lse = _rows(
        q, k, v, key_valid, jnp.asarray(global_q), jnp.asarray(global_k), jnp.asarray(global_used),
        row_kind(global_q), rel, block, spec.causal, scale,
    )
    rows = _by_position(_merge_rows(out, lse, segment, len(spec.global_blocks)), spec, seq)
    if not len(query_blocks):
        none = jnp.zeros((b, h, seq, d), jnp.float32)
        return PartialAttention(none, jnp.full((b, h, seq), MASK_VALUE, jnp.float32)), rows
    globals_ = np.asarray(spec.global_blocks, np.int32)
    keys = np.broadcast_to(globals_, (h, len(query_blocks), len(globals_)))
    used = np.broadcast_to(globals_[None] <= query_blocks[:, None] if spec.causal else True, keys.shape)
    out, lse = _rows(
        q, k, v, key_valid, jnp.asarray(query_blocks), jnp.asarray(keys), jnp.asarray(used), row_kind(query_blocks),
        rel, block, spec.causal, scale,
    )
    return _sparse_partial(out, lse, query_blocks, spec.global_blocks, seq), rows


def block_sparse_xla(
    q, k, v, *, spec: BlockSparseSpec, global_mask=None, padding_mask=None, scale=None,
    max_global_tokens=None, relative=None,
):
    """BigBird attention in pure JAX; arguments as `longjax.attention.block_sparse_attention`.

    `max_global_tokens` must already be resolved to an int when `global_mask` is given. With
    `relative` (a `RelativePositions` covering offsets up to seq - 1; not with global_mask), each
    row adds the position term of its key blocks: for each key block the `2 * block - 1` offsets it
    can have, then Transformer-XL's relative shift (`relative.skew`).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    b, seq, h, d = q.shape
    query_blocks, key_blocks, key_used = key_block_lists(spec)
    global_q, global_k, global_used, segment = _global_row_lists(spec, key_blocks.shape[-1])
    # The global blocks' rows join the sparse ones in one scan: one set of gradient accumulators,
    # and the same block-sized dots (a dense pass's backward runs slower on XLA:CPU). They attend
    # every real key, the sparse rows not the token-level globals (`add_global_tokens` adds those).
    key_valid = global_tokens.local_key_valid(q, global_mask, padding_mask)[None]
    global_kind = 0
    if global_mask is not None:
        all_keys = jnp.ones((b, seq), bool) if padding_mask is None else padding_mask
        key_valid, global_kind = jnp.concatenate([key_valid, all_keys[None]]), 1
    row_kind = np.concatenate([np.zeros(len(query_blocks), np.int32), np.full(len(global_q), global_kind, np.int32)])
    layout = (
        np.concatenate([query_blocks, global_q]),
        np.concatenate([key_blocks, global_k], axis=1),
        np.concatenate([key_used, global_used], axis=1),
        row_kind,
    )
    if relative is not None and global_mask is not None:
        raise NotImplementedError("relative with global_mask: see block_sparse_attention")
    rel = None if relative is None else (relative.queries, relative.embeddings)
    out, lse = _rows(q, k, v, key_valid, *map(jnp.asarray, layout), rel, spec.block_size, spec.causal, scale)
    rows = len(query_blocks)
    globals_out = _merge_rows(out[rows:], lse[rows:], segment, len(spec.global_blocks))
    if global_mask is None:
        out = _in_block_order(out[:rows], globals_out, query_blocks, spec.global_blocks)
        return global_tokens.finish(_unblock(jnp.moveaxis(out, 0, 1), seq), padding_mask, q.dtype)
    to_bhnd = lambda x: jnp.swapaxes(x, 1, 2)
    qh, kh, vh = to_bhnd(q), to_bhnd(k), to_bhnd(v)
    part = _sparse_partial(out[:rows], lse[:rows], query_blocks, spec.global_blocks, seq)
    out = to_bhnd(global_tokens.add_global_tokens(
        part, qh, kh, vh, global_mask=global_mask, global_qkv=None, padding_mask=padding_mask,
        max_global_tokens=max_global_tokens, causal=spec.causal, scale=scale,
    ))
    positions = global_block_positions(spec, seq)
    if positions is not None:
        out = out.at[:, positions].set(_by_position(globals_out, spec, seq))
    return global_tokens.finish(out, padding_mask, q.dtype)
