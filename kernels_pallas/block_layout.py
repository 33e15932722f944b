"""Host-side block layouts of the sparse attention patterns, for the block-sparse flash kernels.

A layout says, per layout head and query block, which key blocks the kernel
visits, and whether each visit is *full* (every query-key pair of the two
blocks is allowed: no masking work) or *partial* (the kernel computes the mask
in-kernel from the pattern's band: `-left <= key - query <= right`, either side
unbounded when None). Key validity (padding, the token-level global keys that
are attended elsewhere, the padded tail) is not part of the static layout: it
is a per-token vector the kernel applies to the blocks that need it.

Layouts are built from the same pattern definitions as
`longjax.attention.masks` (the BigBird one from the XLA implementation's
`key_block_lists`), in time linear in the number of visited blocks, and cached
per static configuration. They come in compressed-sparse-row form, by query
block (the forward and dq kernels) and transposed, by key block (the dk/dv
kernel: which query blocks see each key block).

Positions are kernel positions: for the Longformer band, the (undilated,
padded) sequence itself; for BigBird, each pattern block of `block_size`
tokens occupies a slot of `slot` positions (`slot >= block_size`, the tail of
the slot being padding) so that kernel blocks can be powers of two or
multiples of 8 whatever the pattern's block size.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from kernels_pallas import common
from longjax.attention import block_sparse as block_sparse_lib
from longjax.attention.arguments import BlockSparseSpec

# Flags of the flattened (TPU) entry lists.
FLAG_PARTIAL = 1  # apply the band mask
FLAG_FIRST = 2  # first visit of its row: initialise the accumulators
FLAG_LAST = 4  # last visit of its row: write the row's outputs
FLAG_COMPUTE = 8  # a real visit (not filler for an empty row or a short head)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """The blocks a block-sparse flash kernel visits, with CSR indexing.

    Equality and hashing are by identity: layouts are cached per static
    configuration, so one configuration gives one object, usable as a static
    argument under jit.

    Attributes:
      block_q, block_k: kernel block lengths.
      num_q_blocks, num_k_blocks: blocks covering the padded kernel sequence.
      left, right: the band applied in-kernel to partial blocks; None = unbounded.
      offsets: int32 `[layout_heads, num_q_blocks + 1]`: row i's entries are
        `offsets[h, i] : offsets[h, i + 1]`.
      codes: int32 `[layout_heads, entries]`: `2 * key_block + partial`; the
        tail past a head's last entry is zero and never read.
      t_offsets: int32 `[layout_heads, num_k_blocks + 1]`, the transposed rows.
      t_codes: int32 `[layout_heads, entries]`: `2 * query_block + partial`.
    """

    block_q: int
    block_k: int
    num_q_blocks: int
    num_k_blocks: int
    left: int | None
    right: int | None
    offsets: np.ndarray
    codes: np.ndarray
    t_offsets: np.ndarray
    t_codes: np.ndarray

    @property
    def layout_heads(self) -> int:
        """1 when every head shares the layout, else the number of heads."""
        return self.offsets.shape[0]

    @property
    def padded_len(self) -> int:
        return self.num_q_blocks * self.block_q

    def entries(self, head: int = 0, transposed: bool = False):
        """(row, column, partial) int arrays of one layout head's visits, in row order."""
        offsets = self.t_offsets if transposed else self.offsets
        codes = self.t_codes if transposed else self.codes
        counts = np.diff(offsets[head])
        rows = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        code = codes[head, : offsets[head, -1]]
        return rows, code >> 1, code & 1

    @functools.cached_property
    def _flat(self):
        return {t: _flatten(self, t) for t in (False, True)}

    def flattened(self, transposed: bool = False):
        """The visits as one list per layout head, for a grid that walks them in order.

        Every row gets at least one entry (an empty row gets a filler that
        initialises and writes its outputs without computing), and heads are
        padded to one length with fillers that repeat the last visit, so a
        pipelined kernel fetches nothing new for them.

        Returns:
          rows, cols, flags: int32 `[layout_heads, length]`; flags are the
          `FLAG_*` bits.
        """
        return self._flat[transposed]

    def total_entries(self) -> int:
        return int(self.offsets[:, -1].sum())


def _flatten(layout: BlockLayout, transposed: bool):
    n_rows = layout.num_k_blocks if transposed else layout.num_q_blocks
    per_head = []
    for h in range(layout.layout_heads):
        rows, cols, partial = layout.entries(h, transposed)
        counts = np.bincount(rows, minlength=n_rows)
        empty = np.flatnonzero(counts == 0)
        flags = FLAG_COMPUTE | partial.astype(np.int32)
        # Fillers for empty rows: no compute, but their outputs must be written.
        rows = np.concatenate([rows, empty.astype(np.int32)])
        cols = np.concatenate([cols, np.zeros(len(empty), np.int32)])
        flags = np.concatenate([flags, np.zeros(len(empty), np.int32)])
        order = np.argsort(rows, kind="stable")
        rows, cols, flags = rows[order], cols[order], flags[order]
        starts = np.ones(len(rows), bool)
        starts[1:] = rows[1:] != rows[:-1]
        ends = np.ones(len(rows), bool)
        ends[:-1] = rows[1:] != rows[:-1]
        flags = flags | np.where(starts, FLAG_FIRST, 0) | np.where(ends, FLAG_LAST, 0)
        per_head.append((rows, cols, flags))
    length = max(len(r) for r, _, _ in per_head)
    out = np.zeros((3, layout.layout_heads, length), np.int32)
    for h, (rows, cols, flags) in enumerate(per_head):
        pad = length - len(rows)
        out[0, h] = np.concatenate([rows, np.full(pad, rows[-1], np.int32)])
        out[1, h] = np.concatenate([cols, np.full(pad, cols[-1], np.int32)])
        out[2, h] = np.concatenate([flags, np.zeros(pad, np.int32)])
    return out[0], out[1], out[2]


def _csr(rows, cols, partial, n_rows: int, n_cols: int):
    """CSR offsets and codes of one head's visits, by row and transposed.

    `rows` must be sorted, and `cols` sorted within each row.
    """
    offsets = np.zeros(n_rows + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=offsets[1:])
    codes = (2 * cols + partial).astype(np.int32)
    # A stable sort by column keeps rows ascending within each transposed row.
    order = np.argsort(cols, kind="stable")
    t_offsets = np.zeros(n_cols + 1, np.int32)
    np.cumsum(np.bincount(cols, minlength=n_cols), out=t_offsets[1:])
    t_codes = (2 * rows[order] + partial[order]).astype(np.int32)
    return offsets, codes, t_offsets, t_codes


def _stack_heads(per_head, **static) -> BlockLayout:
    entries = max(1, max(len(h[1]) for h in per_head))
    pad = lambda x: np.pad(x, (0, entries - len(x)))
    return BlockLayout(
        offsets=np.stack([h[0] for h in per_head]),
        codes=np.stack([pad(h[1]) for h in per_head]),
        t_offsets=np.stack([h[2] for h in per_head]),
        t_codes=np.stack([pad(h[3]) for h in per_head]),
        **static,
    )


def _freeze(layout: BlockLayout) -> BlockLayout:
    for array in (layout.offsets, layout.codes, layout.t_offsets, layout.t_codes):
        array.setflags(write=False)
    return layout


@functools.lru_cache(maxsize=128)
def band_layout(
    seq_len: int, *, left: int, right: int, block_q: int, block_k: int, padded_len: int | None = None
) -> BlockLayout:
    """The layout of the undilated band `-left <= key - query <= right`.

    The kernel sequence is `seq_len` padded to `padded_len` (default: the
    least whole number of both block lengths); blocks entirely past `seq_len`
    are not visited (their rows are empty). A visit is full when every pair of
    its blocks is in the band, counting padded positions too, so no pair is
    left unmasked by mistake.

    Args:
      seq_len: the real sequence length, >= 1.
      left, right: the band, >= 0.
      block_q, block_k: kernel block lengths.
      padded_len: a multiple of both block lengths, >= seq_len.
    """
    padded = common.round_up(seq_len, math.lcm(block_q, block_k)) if padded_len is None else padded_len
    if padded < seq_len or padded % block_q or padded % block_k:
        raise ValueError(f"padded_len {padded} must be >= {seq_len} and a multiple of {block_q} and {block_k}")
    nq, nk = padded // block_q, padded // block_k
    q_start = np.arange(nq, dtype=np.int64) * block_q
    real_q = q_start < seq_len
    q_last = np.minimum(q_start + block_q, seq_len) - 1
    first = np.maximum(q_start - left, 0) // block_k
    last = np.minimum(q_last + right, seq_len - 1) // block_k
    counts = np.where(real_q, last - first + 1, 0)
    rows = np.repeat(np.arange(nq), counts)
    cols = np.repeat(first, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    k_start = cols * block_k
    full = (k_start - (rows * block_q + block_q - 1) >= -left) & (k_start + block_k - 1 - rows * block_q <= right)
    per_head = [_csr(rows, cols, (~full).astype(np.int32), nq, nk)]
    return _freeze(
        _stack_heads(per_head, block_q=block_q, block_k=block_k, num_q_blocks=nq, num_k_blocks=nk, left=left, right=right)
    )


def bigbird_layout(spec: BlockSparseSpec, *, seq_len: int, slot: int, block_q: int, block_k: int) -> BlockLayout:
    """The layout of a BigBird pattern, one layout head per attention head.

    Pattern block a occupies kernel positions `a * slot .. a * slot + slot - 1`;
    its first `spec.block_size` are its tokens. Kernel blocks must divide the
    slot, so that every visit lies within one pair of pattern blocks. Visits
    are full except, when causal, those crossing the diagonal (in-kernel band
    `key <= query`); kernel blocks holding only slot padding or positions past
    `seq_len` are not visited.
    """
    if slot % block_q or slot % block_k or slot < spec.block_size:
        raise ValueError(
            f"kernel blocks ({block_q}, {block_k}) must divide the slot {slot} >= block_size {spec.block_size}"
        )
    layout = np.ascontiguousarray(spec.random_layout, np.int32)
    return _bigbird_layout(
        seq_len, spec.block_size, spec.num_blocks, spec.window_radius, spec.global_blocks,
        layout.shape, layout.tobytes(), spec.causal, slot, block_q, block_k,
    )


@functools.lru_cache(maxsize=64)
def _bigbird_layout(
    seq_len, block_size, num_blocks, window_radius, global_blocks, layout_shape, layout_bytes, causal,
    slot, block_q, block_k,
) -> BlockLayout:
    random_layout = np.frombuffer(layout_bytes, np.int32).reshape(layout_shape)
    spec = BlockSparseSpec(
        block_size=block_size, num_blocks=num_blocks, window_radius=window_radius,
        global_blocks=global_blocks, random_layout=random_layout, causal=causal,
    )
    heads = layout_shape[0]
    sparse_rows, key_blocks, key_used = block_sparse_lib.key_block_lists(spec)
    rq, rk = slot // block_q, slot // block_k
    nq, nk = num_blocks * rq, num_blocks * rk
    # Kernel blocks that hold at least one real token, by their offset in the slot.
    q_real = _real_sub_blocks(seq_len, block_size, num_blocks, slot, block_q)
    k_real = _real_sub_blocks(seq_len, block_size, num_blocks, slot, block_k)
    per_head = []
    for h in range(heads):
        # Pattern-block pairs: the sparse rows' lists, and global rows against every block.
        used = key_used[h]
        a = np.concatenate([np.repeat(sparse_rows, used.sum(-1))] + [np.full(num_blocks, g) for g in global_blocks])
        b = np.concatenate([key_blocks[h][used]] + [np.arange(num_blocks)] * len(global_blocks))
        if causal:
            a, b = a[b <= a], b[b <= a]
        order = np.lexsort((b, a))
        a, b = a[order].astype(np.int64), b[order].astype(np.int64)
        # Expand each pair into its kernel-block pairs, rows outer so the result stays sorted.
        u = np.arange(rq)
        w = np.arange(rk)
        rows = (a[:, None, None] * rq + u[None, :, None] + 0 * w[None, None, :]).reshape(-1)
        cols = (b[:, None, None] * rk + 0 * u[None, :, None] + w[None, None, :]).reshape(-1)
        keep = q_real[rows] & k_real[cols]
        partial = np.zeros(len(rows), bool)
        if causal:
            q_lo, q_hi = rows * block_q, rows * block_q + block_q - 1
            k_lo, k_hi = cols * block_k, cols * block_k + block_k - 1
            keep &= k_lo <= q_hi
            partial = k_hi > q_lo
        rows, cols, partial = rows[keep], cols[keep], partial[keep]
        order = np.lexsort((cols, rows))
        per_head.append(_csr(rows[order], cols[order], partial[order].astype(np.int32), nq, nk))
    return _freeze(
        _stack_heads(
            per_head, block_q=block_q, block_k=block_k, num_q_blocks=nq, num_k_blocks=nk,
            left=None, right=0 if causal else None,
        )
    )


def _real_sub_blocks(seq_len: int, block_size: int, num_blocks: int, slot: int, block: int) -> np.ndarray:
    """bool `[num_blocks * slot // block]`: kernel blocks holding at least one real token."""
    starts = np.arange(num_blocks * slot // block) * block
    pattern_block, offset = starts // slot, starts % slot
    return (offset < block_size) & (pattern_block * block_size + offset < seq_len)


