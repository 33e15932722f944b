"""The 'pallas' implementation of `sliding_window_attention` and `block_sparse_attention`.

The block-sparse flash kernels (`kernels_pallas/block_sparse_flash.py`) walk
a block layout; `kernel_layouts.py` gives them two patterns, an undilated band
and a BigBird block layout. This module reduces the ops to them, outside the
kernels:

* Dilation d is reduced exactly to an undilated band: positions
  `r, r + d, r + 2d, ...` form d interleaved subsequences, folded into the
  batch axis (a permutation), on each of which the dilated window is an
  ordinary window. Heads are grouped by dilation.
* BigBird blocks are placed in slots of a length the backend's blocks allow
  (a power of two on GPU, a multiple of 8 on TPU), the slot tail being
  invalid keys, so any block_size works. A GPU kernel block lies within a
  slot; a TPU one may span up to 4 slots (`BigBirdPattern.fit`), so 64-token
  blocks run 128 x 128 tiles, each visit masked by the block pairs it attends.
* Token-level global tokens are removed from the kernel's keys and added by
  the small dense passes of `global_tokens.py`, merged with the kernel's
  result through its log-sum-exp (and written over at global queries).
* BigBird's global blocks are not in the kernel's layout either (a global
  row or column would be one program visiting every block of the sequence):
  every query attends their keys in a dense pass (by query chunks),
  merged through the log-sum-exp before the token-level globals, and their
  queries attend every key in a dense pass (by key chunks, merged by
  log-sum-exp) written over last, as the XLA implementation does.
* Padded queries come out as zeros.
* Transformer-XL's relative positions (`relative.py`, band only): per dilation
  group, the position queries (split like q) meet the embeddings of the band's
  `left + right + 1` offsets (`relative.offset_rows`, steps of the dilation)
  outside the kernels, `by_offset[b, i, h, c] = queries_i . r_{dilation * (left - c)}`,
  which the kernels take as a banded score bias (column `left - i + j`
  for key j) and differentiate; autodiff of the product gives the gradients of
  the queries and the embeddings. BigBird's random blocks reach any offset, so
  its term comes as a per-visit bias instead: per query block and kernel key
  list entry (`block_sparse.kernel_key_lists`), the `[block, block]` terms of
  that key block (`block_sparse.position_terms`: one `[block, 2 * block - 1]`
  product and the relative shift), placed in slots, `[b, blocks x slot, h,
  entries x slot]`, which the kernels read at each visit's columns
  (`BigBirdPattern.visit_bias_columns`). The global blocks, which the kernels
  leave out, then go through the XLA implementation's rows with the term
  (`block_sparse.global_blocks_relative`). The Mosaic (TPU) kernels cut the
  banded bias per tile by a strided lane rotation, and a per-visit one by a
  plain rotation per slot pair to its entry's columns (`visit_bias_key_slots`:
  a 128-wide tile of 64-token blocks is 2 x 2 pairs).
  Either bias goes to the kernels as a `ComputedBias` of the position queries
  and the table: recomputed in the backward pass, so what stays saved between
  the passes is those arrays, not the float32 bias (`left + right + 1` or
  `entries x slot` columns a query).

With `block_sizes=None` on a CPU host, compiled (an export), everything that
depends on the block sizes (the kernels, BigBird's slots) is traced for both
lowerings and the lowered platform keeps its own
(`block_sparse_flash.per_lowering`); the global passes are shared.

Layout: `[batch, seq, heads, head_dim]`, as the public ops.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels_pallas import block_sparse_flash as block_sparse_kernels
from kernels_pallas import common
from longjax.attention import block_sparse as block_sparse_lib
from longjax.attention import global_tokens, partial_softmax
from longjax.attention import relative as relative_lib
from longjax.attention.kernel_layouts import BandPattern, BigBirdPattern
from longjax.attention.partial_softmax import PartialAttention
from longjax.attention.specs import BlockSparseSpec, SlidingWindowSpec


def _pad_axis(x, axis: int, after: int):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, after)
    return jnp.pad(x, widths)


def _offset_bias(queries, embeddings, max_offset, pattern: BandPattern, dilation):
    """The relative term per band offset: float32 `[b, n, h, left + right + 1]` (the kernels' `bias`).

    Column c holds `queries_i . r_{dilation * (left - c)}`, the term of the key
    `c - left` steps from query i; float32 accumulation, and float32 products
    for float32 queries (not the Triton kernels' bfloat16 operands: the
    embeddings' gradient sums this product's over every position, where
    bfloat16 roundings would add up).
    """
    rows = relative_lib.offset_rows(
        embeddings, max_offset=max_offset, left=pattern.left, right=pattern.right, step=dilation
    )
    full = queries.dtype == jnp.float32
    return jnp.einsum(
        "bnhd,hwd->bnhw", queries, rows.astype(queries.dtype), preferred_element_type=jnp.float32,
        precision=lax.Precision.HIGHEST if full else None,
    )


def _dilated_band(q, k, v, key_valid, *, left, right, dilation, scale, block_sizes, interpret, relative=None):
    """(out `[b, n, h, d]`, lse `[b, h, n]`) of a dilated band, via the interleaved subsequences.

    relative: None, or (queries `[b, n, h, d]`, embeddings `[2M + 1, h, d]` of these heads, M).
    """
    b, n = q.shape[:2]
    sub_len = -(-n // dilation)
    # Steps further than the subsequence length reach no key: clipping keeps the layout small.
    pattern = BandPattern(seq_len=sub_len, left=min(left, sub_len - 1), right=min(right, sub_len - 1))

    def run(q, k, v, key_valid, queries=None):
        bias = None
        if queries is not None:
            # Recomputed in the backward pass from the queries and the table, which are what stay saved.
            bias = block_sparse_kernels.ComputedBias(
                functools.partial(_offset_bias, max_offset=relative[2], pattern=pattern, dilation=dilation),
                (queries, relative[1]),
            )
        return block_sparse_kernels.block_sparse_flash(
            q, k, v, key_valid, pattern=pattern, scale=scale, bias=bias, block_sizes=block_sizes,
            interpret=interpret,
        )

    queries = () if relative is None else (relative[0],)
    if dilation == 1:
        return run(q, k, v, key_valid, *queries)
    padded = sub_len * dilation

    def split(x):
        # Position s * dilation + r goes to subsequence r (folded into the batch), index s.
        x = _pad_axis(x, 1, padded - n).reshape((b, sub_len, dilation) + x.shape[2:])
        return jnp.moveaxis(x, 2, 1).reshape((b * dilation, sub_len) + x.shape[3:])

    out, lse = run(split(q), split(k), split(v), split(key_valid), *map(split, queries))
    # Back to position s * dilation + r: out [b * d, s, h, dim] and lse [b * d, h, s].
    out = jnp.moveaxis(out.reshape((b, dilation) + out.shape[1:]), 1, 2).reshape((b, padded) + out.shape[2:])
    heads = lse.shape[1]
    lse = jnp.transpose(lse.reshape(b, dilation, heads, sub_len), (0, 2, 3, 1)).reshape(b, heads, padded)
    return out[:, :n], lse[..., :n]


def _band_heads(q, k, v, key_valid, spec: SlidingWindowSpec, scale, block_sizes, interpret, relative=None):
    """The band of every head, heads grouped by dilation: (out `[b, n, h, d]`, lse `[b, h, n]`).

    relative: None, or (queries `[b, n, h, d]`, embeddings `[2M + 1, h, d]`, M).
    """
    groups: dict[int, list[int]] = {}
    for head, dil in enumerate(spec.dilation):
        groups.setdefault(dil, []).append(head)
    outs, lses, order = [], [], []
    for dil, heads in groups.items():
        group_relative = relative
        if len(groups) == 1:
            qg, kg, vg = q, k, v
        else:
            qg, kg, vg = (x[:, :, np.asarray(heads)] for x in (q, k, v))
            if relative is not None:
                queries, embeddings, max_offset = relative
                group_relative = (queries[:, :, np.asarray(heads)], embeddings[:, np.asarray(heads)], max_offset)
        out, lse = _dilated_band(
            qg, kg, vg, key_valid, left=spec.left, right=spec.right, dilation=dil,
            scale=scale, block_sizes=block_sizes, interpret=interpret, relative=group_relative,
        )
        outs.append(out)
        lses.append(lse)
        order.extend(heads)
    if len(groups) == 1:
        return outs[0], lses[0]
    inverse = np.argsort(np.asarray(order))
    return jnp.concatenate(outs, axis=2)[:, :, inverse], jnp.concatenate(lses, axis=1)[:, inverse]


def band_part(q, k, v, key_valid, *, spec: SlidingWindowSpec, scale: float, block_sizes=None, interpret=None,
              relative=None):
    """The band of every head on the kernels, without global tokens, as a partial attention.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]`.
      key_valid: bool `[batch, seq]`, the keys the band may attend.
      relative: None or a `RelativePositions` (queries like q; the table covering the band's reach).

    Returns:
      float32 out `[batch, heads, seq, head_dim]` and lse `[batch, heads, seq]`.
    """
    out, lse = _band_kernels(q, k, v, key_valid, spec, scale, block_sizes, interpret, relative)
    return PartialAttention(jnp.swapaxes(out, 1, 2).astype(jnp.float32), lse)


def refuse_block_size(block_size) -> None:
    """impl='pallas' has no `block_size` option (its tiling is `block_sizes`): refused, not ignored."""
    if block_size is not None:
        raise NotImplementedError(
            "impl='pallas' takes its tiling from block_sizes; block_size is impl='xla''s query-block length"
        )


def _band_kernels(q, k, v, key_valid, spec, scale, block_sizes, interpret, relative=None):
    """(out `[b, n, h, d]`, lse `[b, h, n]`) of the band on the lowering's kernels.

    relative: None or a `RelativePositions`.
    """
    block_sparse_kernels.check_block_sizes(block_sizes)
    interpret = common.resolve_interpret(interpret)
    # The position queries and embeddings travel as arrays beside q, k, v; the table's reach is static.
    relative_arrays = () if relative is None else (relative.queries, relative.embeddings)

    def heads(blocks, q, k, v, key_valid, *arrays):
        group = (*arrays, relative.max_offset) if arrays else None
        return _band_heads(q, k, v, key_valid, spec, scale, blocks, interpret, relative=group)

    return block_sparse_kernels.per_lowering(
        heads, q, k, v, key_valid, *relative_arrays, block_sizes=block_sizes, interpret=interpret
    )


def _complete(
    out, lse, q, k, v, *, global_mask, global_qkv, padding_mask, max_global_tokens, causal, scale,
    global_positions=None,
):
    """Adds the dense global passes to the kernel's result, zeroes padded queries, casts.

    `global_positions`: int NumPy `[g]`, the tokens of BigBird's global blocks
    (None for a band), which the kernel left out as keys and as queries.
    Their keys merge first (the kernel's keys, the global blocks' keys and the
    token-level global keys are disjoint, so each key counts once); then the
    token-level globals; their rows, which attend every key, are written last.
    """
    if global_mask is None and global_positions is None:
        return global_tokens.finish(out, padding_mask, q.dtype)
    to_bhnd = lambda x: jnp.swapaxes(x, 1, 2)
    qh, kh, vh = to_bhnd(q), to_bhnd(k), to_bhnd(v)
    part = PartialAttention(to_bhnd(out), lse)
    if global_positions is not None:
        # The kernel's keys: real and not token-level globals, which add_global_tokens adds.
        block_keys = global_tokens.local_key_valid(q, global_mask, padding_mask)
        part = partial_softmax.merge(
            part, global_tokens.to_keys_at(qh, kh, vh, global_positions, block_keys, causal=causal, scale=scale)
        )
    out = part.out
    if global_mask is not None:
        global_qkv = None if global_qkv is None else tuple(map(to_bhnd, global_qkv))
        out = global_tokens.add_global_tokens(
            part, qh, kh, vh, global_mask=global_mask, global_qkv=global_qkv, padding_mask=padding_mask,
            max_global_tokens=max_global_tokens, causal=causal, scale=scale,
        )
    if global_positions is not None:
        rows = global_tokens.from_queries_at(qh, kh, vh, global_positions, padding_mask, causal=causal, scale=scale)
        out = out.at[:, :, global_positions].set(rows)
    return global_tokens.finish(to_bhnd(out), padding_mask, q.dtype)


def sliding_window_pallas(
    q, k, v, *, spec: SlidingWindowSpec, global_mask=None, global_qkv=None, padding_mask=None, scale=None,
    max_global_tokens=None, block_size=None, interpret=None, block_sizes=None, relative=None,
):
    """Longformer attention on the block-sparse flash kernels; arguments as
    `longjax.attention.sliding_window_attention`.

    `max_global_tokens` must already be resolved to an int when `global_mask` is given.
    """
    refuse_block_size(block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    key_valid = global_tokens.local_key_valid(q, global_mask, padding_mask)
    out, lse = _band_kernels(q, k, v, key_valid, spec, scale, block_sizes, interpret, relative)
    return _complete(
        out, lse, q, k, v, global_mask=global_mask, global_qkv=global_qkv, padding_mask=padding_mask,
        max_global_tokens=max_global_tokens, causal=spec.causal, scale=scale,
    )


def block_sparse_pallas(
    q, k, v, *, spec: BlockSparseSpec, global_mask=None, padding_mask=None, scale=None, max_global_tokens=None,
    interpret=None, block_sizes=None, relative=None,
):
    """BigBird attention on the block-sparse flash kernels; arguments as
    `longjax.attention.block_sparse_attention`.

    `max_global_tokens` must already be resolved to an int when `global_mask` is given.
    `relative` (not with `global_mask`): the kernels take the position term of their window and
    random blocks as a per-visit bias, and the global blocks go through
    `block_sparse.global_blocks_relative`.
    """
    block_sparse_kernels.check_block_sizes(block_sizes)
    interpret = common.resolve_interpret(interpret)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    key_valid = global_tokens.local_key_valid(q, global_mask, padding_mask)
    relative_arrays = () if relative is None else (relative.queries, relative.embeddings)
    # The slots, so the kernel's inputs, depend on the lowering: all of it runs per lowering.
    out, lse = block_sparse_kernels.per_lowering(
        lambda blocks, *xs: _bigbird_kernel(*xs, spec=spec, scale=scale, block_sizes=blocks, interpret=interpret),
        q, k, v, key_valid, *relative_arrays, block_sizes=block_sizes, interpret=interpret,
    )
    if relative is not None:
        return _complete_relative(out, lse, q, k, v, key_valid, spec=spec, relative=relative, scale=scale,
                                  padding_mask=padding_mask)
    return _complete(
        out, lse, q, k, v, global_mask=global_mask, global_qkv=None,
        padding_mask=padding_mask, max_global_tokens=max_global_tokens, causal=spec.causal, scale=scale,
        global_positions=block_sparse_lib.global_block_positions(spec, q.shape[1]),
    )


def _complete_relative(out, lse, q, k, v, key_valid, *, spec, relative, scale, padding_mask):
    """`_complete` of a BigBird pattern with relative positions (no token-level globals): the global
    blocks' keys merged into every sparse row, their rows written over, both with the position term."""
    positions = block_sparse_lib.global_block_positions(spec, q.shape[1])
    if positions is None:
        return global_tokens.finish(out, padding_mask, q.dtype)
    to_keys, rows = block_sparse_lib.global_blocks_relative(
        q, k, v, key_valid, spec=spec, relative=relative, scale=scale
    )
    part = partial_softmax.merge(PartialAttention(jnp.swapaxes(out, 1, 2).astype(jnp.float32), lse), to_keys)
    out = jnp.swapaxes(part.out, 1, 2).at[:, positions].set(rows)
    return global_tokens.finish(out, padding_mask, q.dtype)


def _visit_bias(queries, embeddings, spec: BlockSparseSpec, slot: int):
    """The position term as the kernels' per-visit bias: float32 `[b, blocks x slot, h, entries x slot]`.

    Row `a * slot + s` (s < block_size) holds, for entry e of block a's kernel key list
    (`block_sparse.kernel_key_lists`), the terms of that key block's keys at columns
    `e * slot + t`; slot tails, the global blocks' rows and unused entries are zeros
    (never attended).
    """
    size, blocks = spec.block_size, spec.num_blocks
    query_blocks, key_blocks, _ = block_sparse_lib.kernel_key_lists(spec)
    terms = block_sparse_lib.position_terms(queries, embeddings, query_blocks, key_blocks, size)
    rows, b, h, entries = terms.shape[:4]
    terms = jnp.pad(terms, [(0, 0)] * 4 + [(0, slot - size)] * 2)  # [rows, b, h, e, slot, slot]
    full = jnp.zeros((blocks,) + terms.shape[1:], terms.dtype).at[query_blocks].set(terms)
    # [blocks, b, h, e, s, t] -> [b, blocks, s, h, e, t]
    return jnp.transpose(full, (1, 0, 4, 2, 3, 5)).reshape(b, blocks * slot, h, entries * slot)


def _bigbird_kernel(q, k, v, key_valid, *relative, spec: BlockSparseSpec, scale, block_sizes, interpret):
    """(out `[b, n, h, d]`, lse `[b, h, n]`) of the BigBird pattern's sparse part, through slots the
    lowering allows; the global blocks' rows come out empty (zeros, lse `MASK_VALUE`).

    relative: () or (position queries like q, embeddings `[2M + 1, h, d]` covering the sequence).
    """
    b, n = q.shape[:2]
    size, blocks = spec.block_size, spec.num_blocks
    # Each BigBird block sits in a slot of the next length the backend's blocks allow; kernel
    # blocks divide it or (TPU) span whole slots, the kernel padding past the last slot.
    slot = block_sparse_kernels.allowed_block(size, block_sizes, interpret)

    def to_slots(x):
        x = _pad_axis(x, 1, blocks * size - n).reshape((b, blocks, size) + x.shape[2:])
        return _pad_axis(x, 2, slot - size).reshape((b, blocks * slot) + x.shape[3:])

    def from_slots(x, axis):
        x = x.reshape(x.shape[:axis] + (blocks, slot) + x.shape[axis + 1:])
        x = x[(slice(None),) * (axis + 1) + (slice(0, size),)]
        return x.reshape(x.shape[:axis] + (blocks * size,) + x.shape[axis + 2:])[(slice(None),) * axis + (slice(0, n),)]

    pattern = BigBirdPattern(spec, seq_len=n, slot=slot)
    bias = None
    if relative:
        bias = block_sparse_kernels.ComputedBias(functools.partial(_visit_bias, spec=spec, slot=slot), relative)
    out, lse = block_sparse_kernels.block_sparse_flash(
        to_slots(q), to_slots(k), to_slots(v), to_slots(key_valid), pattern=pattern, scale=scale, bias=bias,
        block_sizes=block_sizes, interpret=interpret,
    )
    return from_slots(out, 1), from_slots(lse, 2)
