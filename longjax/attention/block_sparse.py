"""BigBird block-sparse attention: random layouts and the XLA implementation.

A query block that is not global attends a fixed-length list of key blocks:
its window, the global blocks and its random blocks. The list is built on the
host from the static pattern (linear in the number of blocks); entries that
are out of range, -1, repeated within the row, or (causal) after the query
block are flagged invalid, so every key counts once. A `lax.scan` walks the
query blocks, gathering each one's key blocks and running one masked
flash-attention step (`flash_step.py`); the backward pass recomputes the step
and scatter-adds dk, dv into the gathered blocks. Global query blocks are
computed densely against every key and written over. Token-level global
tokens go through `global_tokens.py`. Nothing is `seq x seq`.

Layout inside: `[batch, heads, seq, head_dim]`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.common import MASK_VALUE, backward_row_terms
from longjax.attention import arguments, flash_step, global_tokens
from longjax.attention.flash_step import pad_seq
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


def _row_inputs(t, query_blocks, key_blocks, key_used, validb, *, block: int, causal: bool):
    """Query block, gathered key-block ids and mask `[batch, heads, block, keys]` of scan row t."""
    a = query_blocks[t]
    ids = key_blocks[:, t]  # [heads, keys_per_row]
    valid = validb[:, ids] & key_used[None, :, t, :, None]  # [batch, heads, keys_per_row, block]
    mask = valid.reshape(valid.shape[:2] + (1, -1))
    if causal:
        key_pos = (ids[:, :, None] * block + jnp.arange(block)).reshape(ids.shape[0], -1)
        query_pos = a * block + jnp.arange(block)
        mask = mask & (key_pos[None, :, None, :] <= query_pos[None, None, :, None])
    return a, ids, mask


def _gather(xb, ids):
    """xb `[batch, heads, blocks, block, d]`, ids `[heads, n]` -> `[batch, heads, n * block, d]`."""
    heads = jnp.arange(xb.shape[1])[:, None]
    g = xb[:, heads, ids]
    return g.reshape(g.shape[:2] + (-1, g.shape[-1]))


def _blocked(x, num_blocks, block):
    x = pad_seq(x, 0, num_blocks * block - x.shape[2])
    return x.reshape(x.shape[:2] + (num_blocks, block) + x.shape[3:])


def _scatter_rows(ys, query_blocks, num_blocks: int, seq: int, fill):
    """Scan outputs `[rows, batch, heads, block, ...]` at query_blocks -> `[batch, heads, seq, ...]`."""
    ys = jnp.moveaxis(ys, 0, 2)
    full = jnp.full(ys.shape[:2] + (num_blocks,) + ys.shape[3:], fill, ys.dtype)
    full = full.at[:, :, query_blocks].set(ys)
    return full.reshape(full.shape[:2] + (-1,) + full.shape[4:])[:, :, :seq]


def _sparse_forward(q, k, v, key_valid, query_blocks, key_blocks, key_used, block, causal):
    seq = q.shape[2]
    nb = -(-seq // block)
    qb, kb, vb = (_blocked(x, nb, block) for x in (q, k, v))
    validb = jnp.pad(key_valid, ((0, 0), (0, nb * block - seq))).reshape(-1, nb, block)

    def step(_, t):
        a, ids, mask = _row_inputs(t, query_blocks, key_blocks, key_used, validb, block=block, causal=causal)
        scores = flash_step.masked_scores(qb[:, :, a], _gather(kb, ids), mask)
        return None, flash_step.attend(scores, _gather(vb, ids))

    _, (out, lse) = jax.lax.scan(step, None, jnp.arange(len(query_blocks)))
    return (
        _scatter_rows(out, query_blocks, nb, seq, 0.0),
        _scatter_rows(lse, query_blocks, nb, seq, MASK_VALUE),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _sparse(q, k, v, key_valid, query_blocks, key_blocks, key_used, block, causal):
    """q comes multiplied by the score scale."""
    return _sparse_forward(q, k, v, key_valid, query_blocks, key_blocks, key_used, block, causal)


def _sparse_fwd(q, k, v, key_valid, query_blocks, key_blocks, key_used, block, causal):
    out, lse = _sparse_forward(q, k, v, key_valid, query_blocks, key_blocks, key_used, block, causal)
    return (out, lse), (q, k, v, key_valid, query_blocks, key_blocks, key_used, out, lse)


def _sparse_bwd(block, causal, residuals, cotangents):
    q, k, v, key_valid, query_blocks, key_blocks, key_used, out, lse = residuals
    d_out, d_lse = cotangents
    seq = q.shape[2]
    nb = -(-seq // block)
    f32 = lambda x: x.astype(jnp.float32)
    qb, kb, vb, d_outb = (_blocked(f32(x), nb, block) for x in (q, k, v, d_out))
    validb = jnp.pad(key_valid, ((0, 0), (0, nb * block - seq))).reshape(-1, nb, block)
    row_term, lse = backward_row_terms(out, lse, d_out, d_lse)
    row_termb, lseb = _blocked(row_term, nb, block), _blocked(lse, nb, block)
    heads = jnp.arange(q.shape[1])[:, None]

    def step(carry, t):
        dkb, dvb = carry
        a, ids, mask = _row_inputs(t, query_blocks, key_blocks, key_used, validb, block=block, causal=causal)
        keys, values = _gather(kb, ids), _gather(vb, ids)
        dq, dk, dv = flash_step.attend_grads(
            flash_step.masked_scores(qb[:, :, a], keys, mask), lseb[:, :, a], row_termb[:, :, a],
            qb[:, :, a], keys, values, d_outb[:, :, a],
        )
        unflat = lambda x: x.reshape(x.shape[:2] + ids.shape[1:] + (block, x.shape[-1]))
        dkb = dkb.at[:, heads, ids].add(unflat(dk))
        dvb = dvb.at[:, heads, ids].add(unflat(dv))
        return (dkb, dvb), dq

    zeros = jnp.zeros_like(kb)
    (dkb, dvb), dq = jax.lax.scan(step, (zeros, zeros), jnp.arange(len(query_blocks)))
    unblock = lambda x: x.reshape(x.shape[:2] + (-1, x.shape[-1]))[:, :, :seq]
    return (
        _scatter_rows(dq, query_blocks, nb, seq, 0.0).astype(q.dtype),
        unblock(dkb).astype(k.dtype),
        unblock(dvb).astype(v.dtype),
        None, None, None, None,
    )


_sparse.defvjp(_sparse_fwd, _sparse_bwd)


def sparse_part(q, k, v, key_valid, query_blocks, key_blocks, key_used, block: int, causal: bool):
    """The sparse rows of a block layout, as (out, lse) `[batch, heads, seq(, head_dim)]`.

    q (already multiplied by the score scale), k, v: `[batch, heads, seq, head_dim]`, seq a whole
    number of blocks; key_valid bool `[batch, seq]`; the layout as `key_block_lists` gives it (any
    key-block numbering over this k, v). Rows not in `query_blocks` come out 0, lse `MASK_VALUE`.
    """
    return _sparse(q, k, v, key_valid, query_blocks, key_blocks, key_used, block, causal)


def global_block_positions(spec: BlockSparseSpec, seq_len: int) -> np.ndarray | None:
    """int32 NumPy `[g]`: the token positions of the global blocks, in order (None when there are none)."""
    if not spec.global_blocks:
        return None
    size = spec.block_size
    return np.concatenate(
        [np.arange(g * size, min((g + 1) * size, seq_len)) for g in spec.global_blocks]
    ).astype(np.int32)


def block_sparse_xla(
    q, k, v, *, spec: BlockSparseSpec, global_mask=None, padding_mask=None, scale=None,
    max_global_tokens=None,
):
    """BigBird attention in pure JAX; arguments as `longjax.attention.block_sparse_attention`.

    `max_global_tokens` must already be resolved to an int when `global_mask` is given.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    to_bhnd = lambda x: jnp.swapaxes(x, 1, 2)
    qh, kh, vh = to_bhnd(q), to_bhnd(k), to_bhnd(v)
    b, h, seq, d = qh.shape

    query_blocks, key_blocks, key_used = key_block_lists(spec)
    sparse_keys = global_tokens.local_key_valid(q, global_mask, padding_mask)
    if len(query_blocks):
        part = PartialAttention(
            *_sparse((qh * scale).astype(qh.dtype), kh, vh, sparse_keys,
                     *map(jnp.asarray, (query_blocks, key_blocks, key_used)), spec.block_size, spec.causal)
        )
    else:  # every block is global
        part = PartialAttention(
            jnp.zeros((b, h, seq, d), jnp.float32), jnp.full((b, h, seq), MASK_VALUE)
        )
    if global_mask is not None:
        out = global_tokens.add_global_tokens(
            part, qh, kh, vh, global_mask=global_mask, global_qkv=None, padding_mask=padding_mask,
            max_global_tokens=max_global_tokens, causal=spec.causal, scale=scale,
        )
    else:
        out = part.out
    rows = global_block_positions(spec, seq)
    if rows is not None:
        # Global blocks attend every key: a dense pass over key chunks, written over their rows.
        global_out = global_tokens.from_queries_at(qh, kh, vh, rows, padding_mask, causal=spec.causal, scale=scale)
        out = out.at[:, :, rows].set(global_out)
    return global_tokens.finish(to_bhnd(out), padding_mask, q.dtype)
