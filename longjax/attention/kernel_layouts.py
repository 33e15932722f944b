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
multiples of 8 whatever the pattern's block size. A kernel block lies within
one slot, or, on TPU, spans up to `MAX_SLOTS_PER_BLOCK` whole slots: the
layout's visits then carry a bitmask of the slot pairs they attend
(`BlockLayout.sub_block`), so 64-token BigBird blocks run 128 x 128 tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from kernels_pallas import block_sparse_flash as block_sparse_kernels
from kernels_pallas import common
from kernels_pallas.block_layout import MAX_SUB_MASK_BITS, BlockLayout
from longjax.attention import block_sparse as block_sparse_lib
from longjax.attention.specs import BlockSparseSpec


# Slots a TPU kernel block spans at most, so a visit's slot-pair bitmask (query slots x key
# slots) fits the layout's sub-masks: 4, i.e. 128-position blocks down to 32-token BigBird blocks.
MAX_SLOTS_PER_BLOCK = math.isqrt(MAX_SUB_MASK_BITS)


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
        """A divisor of the slot, or on TPU a whole number of slots: a kernel block never splits a slot.

        A block shorter than the slot must divide it. A longer one is a slot
        on GPU (the Triton kernels take no slot masks); on TPU the most whole
        slots it holds, at most `MAX_SLOTS_PER_BLOCK` and the pattern's blocks
        (64-token blocks: 128 positions, two slots, per 128 requested).
        """
        del interpret  # the slot already has a length the backend allows
        if block < self.slot:
            if self.slot % block:
                raise NotImplementedError(
                    f"block_sizes.{name}={block} does not divide the BigBird kernel slot of {self.slot} positions "
                    f"(block_size {self.spec.block_size}); a kernel block shorter than a slot must lie within one"
                )
            return block
        if not isinstance(block_sizes, block_sparse_kernels.TpuBlockSizes):
            return self.slot
        return min(block // self.slot, MAX_SLOTS_PER_BLOCK, self.spec.num_blocks) * self.slot

    def padded_len(self, blocks) -> int:
        return common.round_up(self.kernel_len, math.lcm(*blocks))

    def layout(self, block_q: int, block_k: int, padded_len: int) -> BlockLayout:
        return bigbird_layout(
            self.spec, seq_len=self.seq_len, slot=self.slot, block_q=block_q, block_k=block_k, padded_len=padded_len
        )

    @property
    def visit_bias_width(self) -> int:
        """Columns of a per-visit score bias: a slot per entry of `block_sparse.kernel_key_lists`."""
        return block_sparse_lib.kernel_key_lists(self.spec)[1].shape[-1] * self.slot

    def visit_bias_columns(self, layout: BlockLayout):
        """Each visit's first column in a per-visit bias, by `layout.codes` and by `layout.t_codes`.

        The bias of a query position in pattern block a holds, for entry e of
        a's row in `kernel_key_lists` (key block b), the keys of b's slot at
        columns `e * slot ...`: a visit of kernel key block c starts at
        `e * slot + c * block_k - b * slot`. Layout-independent, so the
        forward and backward layouts (other block lengths) share one bias.
        Layouts whose kernel blocks lie within a slot only (GPU layouts);
        `visit_bias_key_slots` serves any.
        """
        return bigbird_bias_columns(self.spec, self.slot, layout)

    def visit_bias_key_slots(self) -> np.ndarray:
        """int32 `[heads, num_blocks, entries]`: the key block (slot) whose keys each entry of a query
        block's per-visit bias holds, `num_blocks` for entries it does not use and for blocks without
        a kernel key list (the global ones). For the TPU kernels, whose blocks may span several slots:
        a visit finds each (query slot, key slot) pair's entry here, and reads that entry's run of
        columns from `entry * slot` (plus where the key block starts in a slot it lies within).
        """
        return bigbird_bias_key_slots(self.spec)


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
def bigbird_layout(
    spec: BlockSparseSpec, *, seq_len: int, slot: int, block_q: int, block_k: int, padded_len: int | None = None
) -> BlockLayout:
    """The layout of a BigBird pattern's sparse part, one layout head per attention head.

    Only the non-global query blocks' window and random key blocks that are
    not global blocks are visited. The rest of the pattern, dense and left to
    the caller, is every key for the rows of the global blocks and the
    columns of the global blocks for every other row: kernel part and dense
    part are disjoint and together are the pattern. So a query block visits
    at most `2 * window_radius + 1 + num_random_blocks` pattern blocks
    (`window_radius + 1 + ...` when causal) per slot it spans, whatever the
    sequence length, and a key block is visited by its window and by the
    rows that drew it.

    Pattern block a occupies kernel positions `a * slot .. a * slot + slot - 1`;
    its first `spec.block_size` are its tokens. A kernel block divides the
    slot (it lies within one pattern block) or is a whole number of slots
    (at most `MAX_SLOTS_PER_BLOCK`); with such blocks the layout has
    sub-blocks of one slot (`BlockLayout.sub_block`), each visit carrying
    the bitmask of the pattern-block pairs it attends. A visit is full when
    it attends all of them and, causal, does not cross the diagonal
    (in-kernel band `key <= query`); else partial. Kernel blocks holding
    only slot padding or positions past `seq_len` are not visited.

    Args:
      spec, seq_len, slot, block_q, block_k: as above.
      padded_len: kernel positions, a multiple of both blocks >= the slots'
        `num_blocks * slot` (blocks past them are empty); None: the least.
    """
    for block in (block_q, block_k):
        if (slot % block and block % slot) or slot < spec.block_size or block // slot > MAX_SLOTS_PER_BLOCK:
            raise ValueError(
                f"kernel blocks ({block_q}, {block_k}) must divide the slot {slot} >= block_size {spec.block_size} "
                f"or be at most {MAX_SLOTS_PER_BLOCK} whole slots"
            )
    num_blocks, causal = spec.num_blocks, spec.causal
    kernel_len = num_blocks * slot
    padded = common.round_up(kernel_len, math.lcm(block_q, block_k)) if padded_len is None else padded_len
    if padded < kernel_len or padded % block_q or padded % block_k:
        raise ValueError(f"padded_len {padded} must be >= {kernel_len} and a multiple of {block_q} and {block_k}")
    sparse_rows, key_blocks, key_used = block_sparse_lib.key_block_lists(spec)
    query_side = _SlotBlocks(seq_len, spec.block_size, num_blocks, slot, block_q)
    key_side = _SlotBlocks(seq_len, spec.block_size, num_blocks, slot, block_k)
    sub_bits = query_side.slots * key_side.slots
    is_global = np.zeros(num_blocks, bool)
    is_global[list(spec.global_blocks)] = True
    visits, sub_masks = [], []
    for h in range(spec.random_layout.shape[0]):
        # Pattern-block pairs: the sparse rows' lists (already causal and free of repeats), global keys left out.
        used = key_used[h] & ~is_global[key_blocks[h]]
        a = np.repeat(sparse_rows, used.sum(-1)).astype(np.int64)
        b = key_blocks[h][used].astype(np.int64)
        # Each pair as kernel-block pairs (several when blocks split the slot) and their slot-pair bit.
        q_rows, q_slot, pair = query_side.expand(a)
        k_cols, k_slot, pair_k = key_side.expand(b[pair])
        rows, q_slot = q_rows[pair_k], q_slot[pair_k]
        keep = query_side.real[rows] & key_side.real[k_cols]
        if causal:
            # Blocks within one slot can lie wholly after the query block (whole slots cannot: b <= a).
            keep &= k_cols * block_k <= rows * block_q + block_q - 1
        rows, cols = rows[keep], k_cols[keep]
        bit = np.left_shift(1, q_slot[keep] * key_side.slots + k_slot[keep])
        # One visit per kernel-block pair, its slot pairs' bits together (each pair is listed once).
        keys, inverse = np.unique(rows * (padded // block_k) + cols, return_inverse=True)
        sub = np.zeros(len(keys), np.int64)
        np.add.at(sub, inverse, bit)
        rows, cols = keys // (padded // block_k), keys % (padded // block_k)
        partial = sub != (1 << sub_bits) - 1
        if causal:
            partial |= cols * block_k + block_k - 1 > rows * block_q  # crosses the diagonal
        visits.append((rows, cols, partial))
        sub_masks.append(sub)
    with_sub_blocks = sub_bits > 1
    return BlockLayout.from_visits(
        visits, block_q=block_q, block_k=block_k, num_q_blocks=padded // block_q, num_k_blocks=padded // block_k,
        left=None, right=0 if causal else None, sub_block=slot if with_sub_blocks else None,
        sub_masks=sub_masks if with_sub_blocks else None,
    )


@functools.lru_cache(maxsize=64)
def bigbird_bias_columns(spec: BlockSparseSpec, slot: int, layout: BlockLayout):
    """`BigBirdPattern.visit_bias_columns`: int32 tables shaped as `layout.codes` and `layout.t_codes`."""
    if layout.block_q > slot or layout.block_k > slot:
        raise NotImplementedError(
            f"a per-visit bias column per visit needs kernel blocks within one slot of {slot}, got "
            f"({layout.block_q}, {layout.block_k}); blocks spanning slots find theirs from visit_bias_key_slots"
        )
    key_slots = bigbird_bias_key_slots(spec)
    tables = []
    for offsets, codes, transposed in ((layout.offsets, layout.codes, False), (layout.t_offsets, layout.t_codes, True)):
        table = np.zeros(codes.shape, np.int32)
        for h in range(codes.shape[0]):
            total = offsets[h, -1]
            owner, other, _ = layout.entries(h, transposed)
            q_tile, k_tile = (np.asarray(x, np.int64) for x in ((other, owner) if transposed else (owner, other)))
            a, b = q_tile * layout.block_q // slot, k_tile * layout.block_k // slot
            match = key_slots[h, a] == b[:, None]
            if np.any(match.sum(-1) != 1):
                raise AssertionError("a BigBird layout visit is not exactly one entry of its row's key list")
            table[h, :total] = match.argmax(-1) * slot + k_tile * layout.block_k - b * slot
        table.setflags(write=False)  # cached and shared, as the layout's own arrays
        tables.append(table)
    return tuple(tables)


@functools.lru_cache(maxsize=64)
def bigbird_bias_key_slots(spec: BlockSparseSpec) -> np.ndarray:
    """`BigBirdPattern.visit_bias_key_slots`: int32 `[heads, num_blocks, entries]`."""
    query_blocks, key_blocks, key_used = block_sparse_lib.kernel_key_lists(spec)
    heads, _, entries = key_blocks.shape
    table = np.full((heads, spec.num_blocks, entries), spec.num_blocks, np.int32)
    table[:, query_blocks] = np.where(key_used, key_blocks, spec.num_blocks)
    table.setflags(write=False)
    return table


@dataclasses.dataclass(frozen=True)
class _SlotBlocks:
    """The kernel blocks of one axis of a BigBird layout: blocks of `block` positions over slots of `slot`."""

    seq_len: int
    block_size: int
    num_blocks: int
    slot: int
    block: int

    @property
    def slots(self) -> int:
        """Slots per kernel block: 1 when the block lies within one."""
        return max(1, self.block // self.slot)

    @functools.cached_property
    def real(self) -> np.ndarray:
        """bool `[kernel blocks over the slots]`: kernel blocks holding at least one real token."""
        if self.block >= self.slot:
            # Whole slots: every pattern block holds a token (num_blocks covers seq_len, no more).
            return np.ones(-(-self.num_blocks // self.slots), bool)
        starts = np.arange(self.num_blocks * self.slot // self.block) * self.block
        pattern_block, offset = starts // self.slot, starts % self.slot
        return (offset < self.block_size) & (pattern_block * self.block_size + offset < self.seq_len)

    def expand(self, a: np.ndarray):
        """(kernel block, slot within it, index into a) of each kernel block covering pattern blocks `a`."""
        if self.block >= self.slot:
            return a // self.slots, a % self.slots, np.arange(len(a))
        per_slot = self.slot // self.block
        blocks = (a[:, None] * per_slot + np.arange(per_slot)).reshape(-1)
        return blocks, np.zeros(len(blocks), np.int64), np.repeat(np.arange(len(a)), per_slot)
