"""The block layout a block-sparse flash kernel walks: which key blocks each query block visits.

A layout says, per layout head and query block, which key blocks the kernel
visits, and whether each visit is *full* (every query-key pair of the two
blocks is allowed: no masking work) or *partial* (the kernel computes the mask
in-kernel from the layout's band: `-left <= key - query <= right`, either side
unbounded when None). A layout may also divide its blocks into *sub-blocks* of
`sub_block` positions (BigBird's slots, when a kernel block spans several):
a partial visit then carries a bitmask of the (query sub-block, key sub-block)
pairs it attends, which the kernel applies with the band. Key validity
(padding, the token-level global keys that
are attended elsewhere, the padded tail) is not part of the static layout: it
is a per-token vector the kernel applies to the blocks that need it.

The kernel consumes only this type, as splash attention consumes its
`MaskInfo`; turning an attention pattern (a band, a BigBird layout) into one
is the pattern's business (`longjax.attention.kernel_layouts`), through
`BlockLayout.from_visits`. Layouts come in compressed-sparse-row form, by
query block (the forward and dq kernels) and transposed, by key block (the
dk/dv kernel: which query blocks see each key block), and flattened into one
visit list per head for the TPU grid, whose scalar-memory form
(`VisitTables`: a row per visit as chunk base + int8 offset, column and flags
packed in one code, the sub-block bitmask, each table in its smallest int) is
what the TPU kernels read.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

# Flags of the flattened (TPU) entry lists.
FLAG_PARTIAL = 1  # apply the band mask
FLAG_FIRST = 2  # first visit of its row: initialise the accumulators
FLAG_LAST = 4  # last visit of its row: write the row's outputs
FLAG_COMPUTE = 8  # a real visit (not filler for an empty row or a short head)

# The widest sub-block bitmask of a visit: sub-blocks per query block x per key block. The TPU
# tables hold it in 8 or 16 bits, and the kernel builds the mask from it in one vector shift.
MAX_SUB_MASK_BITS = 16


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """The blocks a block-sparse flash kernel visits, with CSR indexing.

    Equality and hashing are by identity: the patterns cache their layouts
    per static configuration, so one configuration gives one object, usable
    as a static argument under jit. Build one with `from_visits`; its arrays
    are read-only.

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
      sub_block: None, or the sub-block length: each kernel block is a whole
        number of sub-blocks or lies within one (`sub_blocks_q`, `sub_blocks_k`
        per block), and a partial visit attends only the (query sub-block a,
        key sub-block b) pairs whose bit `a * sub_blocks_k + b` is set in its
        sub-mask, intersected with the band.
      sub_masks, t_sub_masks: int32 `[layout_heads, entries]`, the sub-masks
        by the entries of `codes` and `t_codes`; None without sub-blocks.
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
    sub_block: int | None = None
    sub_masks: np.ndarray | None = None
    t_sub_masks: np.ndarray | None = None

    @classmethod
    def from_visits(
        cls,
        visits: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
        *,
        block_q: int,
        block_k: int,
        num_q_blocks: int,
        num_k_blocks: int,
        left: int | None,
        right: int | None,
        sub_block: int | None = None,
        sub_masks: Sequence[np.ndarray] | None = None,
    ) -> BlockLayout:
        """The layout of the given visits, one `(rows, cols, partial)` triple per layout head.

        Args:
          visits: per layout head, int arrays of equal length: query block,
            key block, and 1 where the visit is partial (masked in-kernel by
            the band `left`, `right`, and the sub-mask), 0 where it is full.
            Any order; each block pair at most once (a repeat would count its
            keys twice).
          block_q, block_k, num_q_blocks, num_k_blocks, left, right: as the
            attributes.
          sub_block: as the attribute; None: no sub-blocks.
          sub_masks: with sub_block, per layout head an int array by visit:
            the bitmask of its attended sub-block pairs (see the attribute),
            nonzero, and every bit set for a full visit.
        """
        if (sub_block is None) != (sub_masks is None):
            raise ValueError("sub_block and sub_masks go together: give both or neither")
        bits = _check_sub_blocks(sub_block, block_q, block_k) if sub_block is not None else 0
        per_head = []
        for h, (rows, cols, partial) in enumerate(visits):
            rows, cols, partial = (np.asarray(x, np.int64).reshape(-1) for x in (rows, cols, partial))
            if not len(rows) == len(cols) == len(partial):
                raise ValueError(
                    f"rows, cols and partial must have one length, got {len(rows)}, {len(cols)}, {len(partial)}"
                )
            sub = np.ones(len(rows), np.int64) if sub_masks is None else np.asarray(sub_masks[h], np.int64).reshape(-1)
            if len(sub) != len(rows):
                raise ValueError(f"sub_masks[{h}] must have one entry per visit ({len(rows)}), got {len(sub)}")
            if sub_block is not None and len(sub) and (
                sub.min() < 1 or sub.max() >= 1 << bits or np.any((partial == 0) & (sub != (1 << bits) - 1))
            ):
                raise ValueError(
                    f"sub-masks must be nonzero {bits}-bit masks, all ones for full visits, got [{sub.min()}, "
                    f"{sub.max()}]"
                )
            if len(rows) and (
                rows.min() < 0 or rows.max() >= num_q_blocks or cols.min() < 0 or cols.max() >= num_k_blocks
            ):
                raise ValueError(
                    f"visits must lie in [0, {num_q_blocks}) x [0, {num_k_blocks}) blocks, got rows "
                    f"[{rows.min()}, {rows.max()}] and cols [{cols.min()}, {cols.max()}]"
                )
            order = np.lexsort((cols, rows))
            rows, cols, partial, sub = rows[order], cols[order], partial[order], sub[order]
            repeated = (rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1])
            if np.any(repeated):
                at = int(np.flatnonzero(repeated)[0])
                raise ValueError(f"block pair {(int(rows[at]), int(cols[at]))} is visited twice")
            per_head.append(_csr(rows, cols, (partial != 0).astype(np.int64), sub, num_q_blocks, num_k_blocks))
        if not per_head:
            raise ValueError("visits must give at least one layout head")
        entries = max(1, max(len(h[1]) for h in per_head))
        pad = lambda x: np.pad(x, (0, entries - len(x)))
        names = ("offsets", "codes", "t_offsets", "t_codes", "sub_masks", "t_sub_masks")
        arrays = {
            name: np.stack([h[i] if name.endswith("offsets") else pad(h[i]) for h in per_head])
            for i, name in enumerate(names)
            if sub_block is not None or "sub_masks" not in name
        }
        for array in arrays.values():
            array.setflags(write=False)
        return cls(
            block_q=block_q, block_k=block_k, num_q_blocks=num_q_blocks, num_k_blocks=num_k_blocks,
            left=left, right=right, sub_block=sub_block, **arrays,
        )

    @property
    def layout_heads(self) -> int:
        """1 when every head shares the layout, else the number of heads."""
        return self.offsets.shape[0]

    @property
    def padded_len(self) -> int:
        return self.num_q_blocks * self.block_q

    @property
    def sub_blocks_q(self) -> int:
        """Sub-blocks per query block (1 without sub-blocks or when the block lies within one)."""
        return max(1, self.block_q // self.sub_block) if self.sub_block else 1

    @property
    def sub_blocks_k(self) -> int:
        """Sub-blocks per key block (1 without sub-blocks or when the block lies within one)."""
        return max(1, self.block_k // self.sub_block) if self.sub_block else 1

    def entries(self, head: int = 0, transposed: bool = False):
        """(row, column, partial) int arrays of one layout head's visits, in row order."""
        offsets = self.t_offsets if transposed else self.offsets
        codes = self.t_codes if transposed else self.codes
        counts = np.diff(offsets[head])
        rows = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        code = codes[head, : offsets[head, -1]]
        return rows, code >> 1, code & 1

    def entry_sub_masks(self, head: int = 0, transposed: bool = False) -> np.ndarray:
        """int array: the sub-mask of each of `entries(head, transposed)`; all ones without sub-blocks."""
        offsets = self.t_offsets if transposed else self.offsets
        if self.sub_block is None:
            return np.ones(offsets[head, -1], np.int32)
        masks = self.t_sub_masks if transposed else self.sub_masks
        return masks[head, : offsets[head, -1]]

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
        return self._flat[transposed][:3]

    def flattened_sub_masks(self, transposed: bool = False) -> np.ndarray:
        """int32 `[layout_heads, length]`: the sub-mask of each of `flattened(transposed)`'s visits, 0 for fillers."""
        return self._flat[transposed][3]

    def total_entries(self) -> int:
        return int(self.offsets[:, -1].sum())

    @functools.cached_property
    def _tables(self):
        return {t: _visit_tables(self, t) for t in (False, True)}

    def visit_tables(self, transposed: bool = False) -> VisitTables:
        """The flattened visits compacted for TPU scalar memory (`VisitTables`)."""
        return self._tables[transposed]


# Bits of `VisitTables.codes`: `code = (column << CODE_SHIFT) | compute | partial`.
CODE_PARTIAL = 1
CODE_COMPUTE = 2
CODE_SHIFT = 2
# Visits per entry of `VisitTables.row_base`: every row has at least one visit, so the
# row advances by 0 or 1 per visit and a chunk's offsets from its base are < 128 (int8).
ROW_CHUNK = 128


def smallest_int(array: np.ndarray) -> np.ndarray:
    """The array in the smallest of int8, int16 and int32 that holds its (non-negative) values.

    As splash attention's `downcast_smem_data`: scalar memory is small, and
    these tables are all of it that a call uses.
    """
    array = np.asarray(array)
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        raise ValueError(f"tables hold values in [0, 2**31), got [{array.min()}, {array.max()}]")
    top = int(array.max()) if array.size else 0
    for dtype in (np.int8, np.int16, np.int32):
        if top <= np.iinfo(dtype).max:
            return array.astype(dtype)
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True, eq=False)
class VisitTables:
    """The flattened visits as a TPU grid reads them from scalar memory, each table in its smallest int.

    Visit `i = head * length + e` (per_head layouts; else `i = e`) is at row
    `row_base[i // ROW_CHUNK] + row_offset[i]` and column `codes[i] >> CODE_SHIFT`,
    partial if `codes[i] & CODE_PARTIAL`, a real visit (not filler) if
    `codes[i] & CODE_COMPUTE`, attending the sub-block pairs whose bits are set in
    `sub_masks[i]` when partial and the layout has sub-blocks. A visit is the first of its row when the row
    differs from the previous visit's (or e = 0), the last when it differs from
    the next one's (or e = length - 1): no flag table is needed. Each head's
    list is padded with fillers to a multiple of ROW_CHUNK so no chunk spans two heads.

    Attributes:
      length: visits per head (grid steps).
      row_base: `[layout_heads * length / ROW_CHUNK]`, the row at each chunk's start.
      row_offset: int8 `[layout_heads * length]`, the row minus its chunk's base (< ROW_CHUNK).
      codes: `[layout_heads * length]`.
      sub_masks: `[layout_heads * length]`, each bitmask's bits in an int8 or
        int16 (the bit pattern: bit 7 or 15 reads as the sign); for a layout
        without sub-blocks a single 0, never read (the kernels' operand list
        stays the same).
    """

    length: int
    row_base: np.ndarray
    row_offset: np.ndarray
    codes: np.ndarray
    sub_masks: np.ndarray

    @property
    def arrays(self):
        return self.row_base, self.row_offset, self.codes, self.sub_masks

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)


def _bit_patterns(masks: np.ndarray, bits: int) -> np.ndarray:
    """Bitmasks of up to `bits` bits as the bit patterns of int8 or int16 (SMEM holds signed ints)."""
    unsigned, signed = (np.uint8, np.int8) if bits <= 8 else (np.uint16, np.int16)
    assert bits <= 8 * np.dtype(unsigned).itemsize and masks.min(initial=0) >= 0 and masks.max(initial=0) < 1 << bits
    return masks.astype(unsigned).view(signed)


def _visit_tables(layout: BlockLayout, transposed: bool) -> VisitTables:
    rows, cols, flags = layout.flattened(transposed)
    sub = layout.flattened_sub_masks(transposed)
    heads, length = rows.shape
    padded = -(-length // ROW_CHUNK) * ROW_CHUNK
    # Fillers repeat the last visit, computing nothing: no new block is fetched, and the row's
    # outputs are written at the head's last step, which is still that row.
    pad = lambda x, fill: np.concatenate([x, np.repeat(fill, padded - length, axis=1)], axis=1)
    rows, cols = pad(rows, rows[:, -1:]), pad(cols, cols[:, -1:])
    flags, sub = pad(flags, np.zeros((heads, 1), flags.dtype)), pad(sub, np.zeros((heads, 1), sub.dtype))
    codes = (cols.astype(np.int64) << CODE_SHIFT) | np.where(flags & FLAG_COMPUTE, CODE_COMPUTE, 0) | np.where(
        flags & FLAG_PARTIAL, CODE_PARTIAL, 0
    )
    rows = rows.reshape(-1)
    base = rows[::ROW_CHUNK]
    offset = rows - np.repeat(base, ROW_CHUNK)
    assert offset.min() >= 0 and offset.max() < ROW_CHUNK, "a row without visits"
    if layout.sub_block is None:
        sub = np.zeros(1, np.int8)
    else:
        sub = _bit_patterns(sub.reshape(-1), layout.sub_blocks_q * layout.sub_blocks_k)
    tables = VisitTables(
        length=padded, row_base=smallest_int(base), row_offset=offset.astype(np.int8),
        codes=smallest_int(codes.reshape(-1)), sub_masks=sub,
    )
    for array in tables.arrays:
        array.setflags(write=False)
    return tables


def _flatten(layout: BlockLayout, transposed: bool):
    n_rows = layout.num_k_blocks if transposed else layout.num_q_blocks
    per_head = []
    for h in range(layout.layout_heads):
        rows, cols, partial = layout.entries(h, transposed)
        sub = layout.entry_sub_masks(h, transposed).astype(np.int32)
        counts = np.bincount(rows, minlength=n_rows)
        empty = np.flatnonzero(counts == 0)
        flags = FLAG_COMPUTE | partial.astype(np.int32)
        # Fillers for empty rows: no compute, but their outputs must be written.
        none = np.zeros(len(empty), np.int32)
        rows = np.concatenate([rows, empty.astype(np.int32)])
        cols, flags, sub = (np.concatenate([x, none]) for x in (cols, flags, sub))
        order = np.argsort(rows, kind="stable")
        rows, cols, flags, sub = rows[order], cols[order], flags[order], sub[order]
        starts = np.ones(len(rows), bool)
        starts[1:] = rows[1:] != rows[:-1]
        ends = np.ones(len(rows), bool)
        ends[:-1] = rows[1:] != rows[:-1]
        flags = flags | np.where(starts, FLAG_FIRST, 0) | np.where(ends, FLAG_LAST, 0)
        per_head.append((rows, cols, flags, sub))
    length = max(len(r) for r, _, _, _ in per_head)
    out = np.zeros((4, layout.layout_heads, length), np.int32)
    for h, (rows, cols, flags, sub) in enumerate(per_head):
        pad = length - len(rows)
        out[0, h] = np.concatenate([rows, np.full(pad, rows[-1], np.int32)])
        out[1, h] = np.concatenate([cols, np.full(pad, cols[-1], np.int32)])
        out[2, h] = np.concatenate([flags, np.zeros(pad, np.int32)])
        out[3, h] = np.concatenate([sub, np.zeros(pad, np.int32)])
    return out[0], out[1], out[2], out[3]


def _check_sub_blocks(sub_block: int, block_q: int, block_k: int) -> int:
    """The bits of a visit's sub-mask; ValueError unless each block is whole sub-blocks or within one."""
    if not isinstance(sub_block, int) or sub_block < 1:
        raise ValueError(f"sub_block must be a positive int, got {sub_block!r}")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block % sub_block and sub_block % block:
            raise ValueError(f"{name}={block} must be a multiple or a divisor of sub_block={sub_block}")
    bits = max(1, block_q // sub_block) * max(1, block_k // sub_block)
    if bits > MAX_SUB_MASK_BITS:
        raise ValueError(
            f"blocks ({block_q}, {block_k}) of {sub_block}-position sub-blocks need {bits}-bit sub-masks, "
            f"over {MAX_SUB_MASK_BITS}"
        )
    return bits


def _csr(rows, cols, partial, sub, n_rows: int, n_cols: int):
    """int32 CSR offsets, codes and sub-masks of one head's visits, by row and transposed.

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
    return offsets, codes, t_offsets, t_codes, sub.astype(np.int32), sub[order].astype(np.int32)
