"""The sparse patterns as the block-sparse flash kernels take them: `Pattern`s and their `BlockLayout`s.

`kernels_pallas.block_sparse_flash` consumes a `BlockLayout` (which key blocks
each query block visits, each visit full or masked in-kernel by a band) and
asks its pattern for one per pair of block lengths. The two patterns here
build them on the host, in time linear in the number of visited blocks, from
the same definitions as `masks.py` (the BigBird one from the XLA
implementation's `key_block_lists`), and cache them per static configuration.

A BigBird layout is the pattern's sparse part only: the window and random
blocks of the non-global query blocks. Its global rows and columns (a global
query block sees every key block, every query block sees a global key block)
would make single programs of one visit per block of the sequence, which
serialise the kernel; `pallas_block_sparse` computes them in dense passes.

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

from kernels_pallas import block_sparse_flash as block_sparse_kernels
from kernels_pallas import common
from kernels_pallas.block_layout import BlockLayout
from longjax.attention import block_sparse as block_sparse_lib
from longjax.attention.specs import BlockSparseSpec


@dataclasses.dataclass(frozen=True)
class BandPattern:
    """The undilated band `-left <= key - query <= right` over `seq_len` tokens."""

    seq_len: int
    left: int
    right: int

    @property
    def kernel_len(self) -> int:
        return self.seq_len

    def fit(self, block: int, block_sizes, interpret: bool, name: str) -> int:
        """No longer than the (rounded) sequence: a longer block would only add padding."""
        del name  # every length fits a band
        return min(block, block_sparse_kernels.allowed_block(self.seq_len, block_sizes, interpret))

    def padded_len(self, blocks) -> int:
        return common.round_up(self.seq_len, math.lcm(*blocks))

    def layout(self, block_q: int, block_k: int, padded_len: int) -> BlockLayout:
        return band_layout(
            self.seq_len, left=self.left, right=self.right, block_q=block_q, block_k=block_k, padded_len=padded_len
        )


@dataclasses.dataclass(frozen=True)
class BigBirdPattern:
    """The sparse part of a BigBird pattern, whose blocks sit in slots of `slot` kernel positions.

    The kernel attends, for each non-global query block, its window and
    random key blocks that are not global (`bigbird_layout`); the global rows
    and columns are the caller's dense passes. Hashable through its spec.
    """

    spec: BlockSparseSpec
    seq_len: int
    slot: int

    @property
    def kernel_len(self) -> int:
        return self.spec.num_blocks * self.slot

    def fit(self, block: int, block_sizes, interpret: bool, name: str) -> int:
        """At most a slot, and dividing it, so that a kernel block lies within one pattern block."""
        del block_sizes, interpret  # the slot already has a length the backend allows
        fitted = min(block, self.slot)
        if self.slot % fitted:
            raise NotImplementedError(
                f"block_sizes.{name}={block} does not divide the BigBird kernel slot of {self.slot} positions "
                f"(block_size {self.spec.block_size}); a kernel block must lie within one pair of BigBird blocks"
            )
        return fitted

    def padded_len(self, blocks) -> int:
        del blocks  # kernel blocks divide the slot
        return self.kernel_len

    def layout(self, block_q: int, block_k: int, padded_len: int) -> BlockLayout:
        assert padded_len == self.kernel_len
        return bigbird_layout(self.spec, seq_len=self.seq_len, slot=self.slot, block_q=block_q, block_k=block_k)


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
    return BlockLayout.from_visits(
        [(rows, cols, ~full)], block_q=block_q, block_k=block_k, num_q_blocks=nq, num_k_blocks=nk,
        left=left, right=right,
    )


@functools.lru_cache(maxsize=64)
def bigbird_layout(spec: BlockSparseSpec, *, seq_len: int, slot: int, block_q: int, block_k: int) -> BlockLayout:
    """The layout of a BigBird pattern's sparse part, one layout head per attention head.

    Only the non-global query blocks' window and random key blocks that are
    not global blocks are visited. The rest of the pattern, dense and left to
    the caller, is every key for the rows of the global blocks and the
    columns of the global blocks for every other row: kernel part and dense
    part are disjoint and together are the pattern. So a query block visits
    at most `2 * window_radius + 1 + num_random_blocks` pattern blocks
    (`window_radius + 1 + ...` when causal) whatever the sequence length, and
    a key block is visited by its window and by the rows that drew it.

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
    num_blocks, causal = spec.num_blocks, spec.causal
    sparse_rows, key_blocks, key_used = block_sparse_lib.key_block_lists(spec)
    rq, rk = slot // block_q, slot // block_k
    # Kernel blocks that hold at least one real token, by their offset in the slot.
    q_real = _real_sub_blocks(seq_len, spec.block_size, num_blocks, slot, block_q)
    k_real = _real_sub_blocks(seq_len, spec.block_size, num_blocks, slot, block_k)
    is_global = np.zeros(num_blocks, bool)
    is_global[list(spec.global_blocks)] = True
    visits = []
    for h in range(spec.random_layout.shape[0]):
        # Pattern-block pairs: the sparse rows' lists (already causal and free of repeats), global keys left out.
        used = key_used[h] & ~is_global[key_blocks[h]]
        a = np.repeat(sparse_rows, used.sum(-1)).astype(np.int64)
        b = key_blocks[h][used].astype(np.int64)
        # Expand each pair into its kernel-block pairs.
        rows = (a[:, None, None] * rq + np.arange(rq)[None, :, None] + np.zeros(rk, np.int64)).reshape(-1)
        cols = (b[:, None, None] * rk + np.zeros((1, rq, 1), np.int64) + np.arange(rk)).reshape(-1)
        keep = q_real[rows] & k_real[cols]
        partial = np.zeros(len(rows), bool)
        if causal:
            q_lo, q_hi = rows * block_q, rows * block_q + block_q - 1
            k_lo, k_hi = cols * block_k, cols * block_k + block_k - 1
            keep &= k_lo <= q_hi
            partial = k_hi > q_lo
        visits.append((rows[keep], cols[keep], partial[keep]))
    return BlockLayout.from_visits(
        visits, block_q=block_q, block_k=block_k, num_q_blocks=num_blocks * rq, num_k_blocks=num_blocks * rk,
        left=None, right=0 if causal else None,
    )


def _real_sub_blocks(seq_len: int, block_size: int, num_blocks: int, slot: int, block: int) -> np.ndarray:
    """bool `[num_blocks * slot // block]`: kernel blocks holding at least one real token."""
    starts = np.arange(num_blocks * slot // block) * block
    pattern_block, offset = starts // slot, starts % slot
    return (offset < block_size) & (pattern_block * block_size + offset < seq_len)
