"""The Mosaic (TPU) lowering of the block-sparse flash kernels: forward, dq and dk/dv.

The grid walks a flattened list of visits per head `(batch, head, visit)`,
with the list scalar-prefetched into SMEM (compacted to the smallest ints,
`block_layout.VisitTables`, and checked against the chips' budgets before
lowering, `tpu_footprint`) and used by the BlockSpec index maps, so only
visited blocks are DMA'd; accumulators live in VMEM scratch across the visits
of a row. Blocks are multiples of 8 (sublanes), best multiples of 128.
Float32 inputs keep float32 matmuls (`Precision.HIGHEST`).

As splash attention: a grid step DMAs a whole key block and computes it in
sub-blocks of `block_k_compute` keys (an unrolled loop), skipping sub-blocks
the band does not reach and masking only those it cuts or that hold an
invalid key; row statistics are lane-dense: the forward's running max and sum
are `[block_q, NUM_LANES]` (replicated along lanes) and it writes the
log-sum-exp as `[block_q, NUM_LANES]` blocks; the backward reads the
log-sum-exp and row terms as rows `[NUM_SUBLANES, block_q]` (replicated along
sublanes), and its dk/dv kernel works on transposed scores `[keys, queries]`
so they broadcast without a relayout.

A layout with sub-blocks (`BlockLayout.sub_block`: BigBird's slots when a
kernel block spans several, so tiles stay 128 wide for 64-token BigBird
blocks) has a bitmask per visit in a fifth table; a partial visit's mask is
then built from it in-kernel with iota, as the band's
(`block_sparse_visit.sub_block_pairs`), and intersected with the band and key
validity.

A banded score bias (Transformer-XL's relative positions, `block_sparse_flash`'s
`bias=`, column `left - i + j` of query i's row for key j) is read per row
block: the forward and dq kernels take the query block's rows
`[block_q, Wp]` (the band's width rounded up to whole lanes), resident across
the row's visits, and cut each key sub-block's tile out of them with one
strided lane rotation (`pltpu.roll`, row r rotated by r more than row r - 1:
Transformer-XL's relative shift) and a static slice. The dk/dv kernel, whose
rows are key blocks, takes the same terms rearranged by key (`_bias_by_key`:
row j, column `right + i - j`) and cuts its transposed tiles the same way.
The dq kernel accumulates the bias gradient into its row block with the
inverse rotation (a stride of `Wp - 1`, i.e. -1 modulo the width).

A per-visit bias (BigBird's relative positions) comes as the same row
blocks: query slot a's rows hold, at columns `e * slot ..`, the keys of key
slot `key_slots[a, e]` (the pattern's `visit_bias_key_slots`, a sixth
scalar-prefetch table). A visit finds the entry e of each (query slot, key
slot) pair it covers by a scalar search of the query slot's few entries, and
cuts the pair's tile with one plain lane rotation of the query slot's rows
to `e * slot` (plus where the key block starts, for blocks within a slot);
the key slots' lanes are selected and the query slots stacked. The dq kernel
adds the gradient back with the inverse rotations. The dk/dv kernel takes the
visited query block's rows (as it takes its queries), cuts the tile the same
way and transposes it to its `[keys, queries]` scores. A table per query slot,
not per visit, keeps SMEM within budget at 128K tokens and 16 heads.

`forward` and `backward` take `[batch, seq, heads, head_dim]` arrays padded to
the call's kernel length and the call's static configuration
(`block_sparse_flash._Config`); `footprints` gives each kernel's SMEM and VMEM.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import block_layout, tpu_footprint
from kernels_pallas import block_sparse_visit as visit
from kernels_pallas.common import MASK_VALUE

NUM_LANES = tpu_footprint.NUM_LANES
NUM_SUBLANES = tpu_footprint.NUM_SUBLANES


def _params():
    # Batch and heads split across cores; the visit axis carries the accumulators.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def key_compute_block(block_k: int, requested: int | None = None) -> int:
    """The keys a kernel computes at once within a DMA'd key block of `block_k`.

    `requested` when given: a multiple of 8 dividing block_k. Else NUM_LANES
    when block_k is a multiple of it (a 512-key block runs as four 128-key
    sub-blocks, splash's `block_kv_compute`), else the whole block.
    """
    if requested is None:
        return NUM_LANES if block_k % NUM_LANES == 0 else block_k
    if requested < 1 or requested % NUM_SUBLANES or block_k % requested:
        raise ValueError(f"block_k_compute must be a positive multiple of 8 dividing {block_k}, got {requested}")
    return requested


@dataclasses.dataclass(frozen=True)
class _Walk:
    """How a TPU kernel reads its visit list (`block_layout.VisitTables`, scalar-prefetched into SMEM).

    The tables are (row_base, row_offset, codes, sub_masks), then the
    per-(batch, key sub-block) validity flags: the five scalar-prefetch refs of
    every TPU kernel.
    """

    length: int  # visits per head: the grid's last axis
    per_head: bool  # one visit list per head (else one shared by all heads)
    total: int  # visits in the tables

    @classmethod
    def of(cls, tables: block_layout.VisitTables) -> _Walk:
        total = tables.codes.shape[0]
        return cls(length=tables.length, per_head=total > tables.length, total=total)

    def index(self, hi, e):
        return (hi * self.length if self.per_head else 0) + e

    def row(self, base_ref, offset_ref, i):
        chunk = lax.shift_right_logical(i, _ROW_CHUNK_BITS)
        return base_ref[chunk].astype(jnp.int32) + offset_ref[i].astype(jnp.int32)

    def col(self, codes_ref, i):
        return lax.shift_right_logical(codes_ref[i].astype(jnp.int32), block_layout.CODE_SHIFT)

    def sub_mask(self, sub_ref):
        """int32: the current grid step's sub-mask (its bits; int8 and int16 sign-extend above them)."""
        return sub_ref[self.index(pl.program_id(1), pl.program_id(2))].astype(jnp.int32)

    def maps(self, rows_are_q: bool):
        """(q block, k block) index of grid step `(bi, hi, e)`, from the prefetched tables."""

        def q_block(hi, e, base, offset, codes):
            i = self.index(hi, e)
            return self.row(base, offset, i) if rows_are_q else self.col(codes, i)

        def k_block(hi, e, base, offset, codes):
            i = self.index(hi, e)
            return self.col(codes, i) if rows_are_q else self.row(base, offset, i)

        return q_block, k_block

    def position(self, base_ref, offset_ref, codes_ref):
        """(row, col, code, first, last) of the current grid step's visit.

        A visit is its row's first when the previous visit of its head has
        another row, its last when the next one has (the tables keep no flags).
        """
        e = pl.program_id(2)
        i = self.index(pl.program_id(1), e)
        row = self.row(base_ref, offset_ref, i)
        prev = self.row(base_ref, offset_ref, jnp.maximum(i - 1, 0))
        nxt = self.row(base_ref, offset_ref, jnp.minimum(i + 1, self.total - 1))
        first = jnp.logical_or(e == 0, prev != row)
        last = jnp.logical_or(e == self.length - 1, nxt != row)
        code = codes_ref[i].astype(jnp.int32)
        return row, lax.shift_right_logical(code, block_layout.CODE_SHIFT), code, first, last


_ROW_CHUNK_BITS = block_layout.ROW_CHUNK.bit_length() - 1
assert 1 << _ROW_CHUNK_BITS == block_layout.ROW_CHUNK


def _spec(block_shape, block_of, tail: int, per_batch: bool = True):
    """A BlockSpec over `[batch, heads, blocks..., ...]` (`per_batch` False: `[batch, ...]` without heads).

    `block_of(hi, e, *tables)` gives the block index on the blocked axis;
    `tail` zeros follow it.
    """

    def index_map(bi, hi, e, base, offset, codes, *other_tables):
        del other_tables  # sub-masks, key flags and a per-visit bias's columns: read in the kernels
        lead = (bi, hi) if per_batch else (bi,)
        return lead + (block_of(hi, e, base, offset, codes),) + (0,) * tail

    return pl.BlockSpec(block_shape, index_map)


def _tables(layout: block_layout.BlockLayout, transposed: bool, valid, block_kc: int, pattern=None):
    """(walk, the scalar-prefetch operands) of a kernel walking `layout` (transposed: by key block):
    the five tables of every kernel, and with a per-visit bias (`pattern` given) its key slots."""
    tables = layout.visit_tables(transposed)
    # 0/1 per (batch, key sub-block): int8 in SMEM.
    kflags = visit.key_block_flags(valid, block_kc).astype(jnp.int8).reshape(-1)
    prefetch = (*(jnp.asarray(a) for a in tables.arrays), kflags)
    if pattern is not None:
        prefetch += (jnp.asarray(_key_slots(pattern)),)
    return _Walk.of(tables), prefetch


def _key_slots(pattern) -> np.ndarray:
    """The pattern's `visit_bias_key_slots` flattened, in the smallest int."""
    return block_layout.smallest_int(np.asarray(pattern.visit_bias_key_slots()).reshape(-1))


@dataclasses.dataclass(frozen=True)
class _VisitBias:
    """What a kernel needs to find a per-visit bias's columns: the pattern's slots and key lists."""

    slot: int
    num_slots: int  # query slots of the key-slot table (the pattern's blocks)
    entries: int
    heads: int  # heads of the key-slot table (1: shared by all)

    @classmethod
    def of(cls, pattern) -> _VisitBias:
        heads, num_slots, entries = np.shape(pattern.visit_bias_key_slots())
        return cls(slot=pattern.slot, num_slots=num_slots, entries=entries, heads=heads)

    def columns(self, key_slots_ref, qb, kb, block_q: int, block_k: int, sub) -> list:
        """int32 scalars: per (query slot i, key slot j) pair of the visit of blocks (qb, kb), at
        `i * n_k + j` (n_k: the key block's slots, 1 within a slot), the bias column of the pair's
        first key in its query slot's rows.

        A pair the visit does not attend (its sub-mask bit off; a slot past the pattern's, whose
        key slot `num_blocks` also marks unused entries) gets whatever column its search ends
        on, read modulo the rows' width: its scores are masked, so neither its bias nor its
        gradient counts.
        """
        slot = self.slot
        n_q, n_k = (1, 1) if sub is None else (sub.sub_blocks_q, sub.sub_blocks_k)
        head = pl.program_id(1) if self.heads > 1 else 0
        found = []
        # lax.div, not //: the blocks' positions are non-negative, and floor division's sign
        # correction has no Mosaic lowering off a TPU host (export from a CPU one).
        for i in range(n_q):
            a = jnp.minimum(lax.div(qb * block_q, slot) + i, self.num_slots - 1)
            row = (head * self.num_slots + a) * self.entries
            for j in range(n_k):
                b = lax.div(kb * block_k, slot) + j
                entry = jnp.int32(0)
                for e in range(self.entries):
                    entry = jnp.where(key_slots_ref[row + e].astype(jnp.int32) == b, e, entry)
                # A key block within a slot starts inside it; one of whole slots starts at slot j's start.
                start = kb * block_k - b * slot if block_k < slot else 0
                found.append(entry * slot + start)
        return found


@dataclasses.dataclass(frozen=True)
class _SubBlocks:
    """A layout's sub-blocks as the kernels build their masks (`block_sparse_visit.sub_block_pairs`)."""

    sub_block: int
    sub_blocks_q: int
    sub_blocks_k: int

    @classmethod
    def of(cls, layout: block_layout.BlockLayout) -> _SubBlocks | None:
        if layout.sub_block is None:
            return None
        return cls(layout.sub_block, layout.sub_blocks_q, layout.sub_blocks_k)

    def pairs(self, shape, sub_mask, k_first: int, keys_axis: int = 1):
        return visit.sub_block_pairs(shape, sub_mask, k_first=k_first, sub_block=self.sub_block,
                                     sub_blocks_q=self.sub_blocks_q, sub_blocks_k=self.sub_blocks_k,
                                     keys_axis=keys_axis)


def _valid_rows(valid, block_k):
    """int32 `[batch, key_blocks, NUM_SUBLANES, block_k]`: per key block a row, replicated along sublanes.

    A legal Mosaic block whatever block_k (its last two dims are whole), and
    the sublane-replicated form splash's kernels read key-side ids in.
    """
    b, n = valid.shape
    rows = valid.astype(jnp.int32).reshape(b, n // block_k, 1, block_k)
    return jnp.broadcast_to(rows, (b, n // block_k, NUM_SUBLANES, block_k))


def _row_terms(x, block_q):
    """float32 `[batch, heads, q_blocks, NUM_SUBLANES, block_q]` of a `[batch, heads, seq]` per-row term.

    Queries along lanes: one (8, block_q) tile per query block instead of a
    `(block_q, 1)` column that pads each value to a 128-lane row.
    """
    b, h, n = x.shape
    rows = x.astype(jnp.float32).reshape(b, h, n // block_q, 1, block_q)
    return jnp.broadcast_to(rows, (b, h, n // block_q, NUM_SUBLANES, block_q))


def bias_lanes(width: int, tile: int) -> int:
    """The lanes of a banded bias's row blocks: its `width` columns, and at least the `tile` columns
    a kernel cuts out of them (its key compute block, or for dk/dv its query block), in whole lanes
    (a multiple of 128). Columns are read modulo this width, so any width covering the band is exact."""
    return -(-max(width, tile) // NUM_LANES) * NUM_LANES


def _bias_tile_width(kind: str, block_q: int, block_kc: int, per_visit: bool = False) -> int:
    """The columns a kernel cuts from its bias rows per tile: its key compute block, or dk/dv's query
    block (a banded bias by key; a per-visit one is cut by query and transposed)."""
    return block_q if kind == "dkv" and not per_visit else block_kc


def _per_visit(config, bias_width) -> bool:
    """Whether a call's bias is per visit (the pattern has `visit_bias_key_slots`), not banded."""
    return bias_width is not None and getattr(config.pattern, "visit_bias_key_slots", None) is not None


def _block_specs(kind, block_q, block_k, head_dim, dtype, bias_width=None, block_kc=None, per_visit=False):
    """(inputs, outputs, scratch) of a kernel as (block shape, dtype): what `footprints` counts."""
    f32, i32 = jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)
    q_blk, k_blk = ((block_q, head_dim), dtype), ((block_k, head_dim), dtype)
    lanes, rows = ((block_q, NUM_LANES), f32), ((NUM_SUBLANES, block_q), f32)
    valid_rows, valid_col = ((NUM_SUBLANES, block_k), i32), ((block_k, 1), i32)
    bias = []
    if bias_width is not None:
        tile = _bias_tile_width(kind, block_q, block_k if block_kc is None else block_kc, per_visit)
        bias = [((block_k if kind == "dkv" and not per_visit else block_q, bias_lanes(bias_width, tile)), f32)]
    if kind == "forward":
        return [q_blk, k_blk, k_blk, valid_rows, *bias], [q_blk, lanes], [lanes, lanes, ((block_q, head_dim), f32)]
    if kind == "dq":
        return [q_blk, k_blk, k_blk, valid_rows, q_blk, rows, rows, *bias], [q_blk, *bias], [((block_q, head_dim), f32)]
    return [q_blk, k_blk, k_blk, valid_col, q_blk, rows, rows, *bias], [k_blk, k_blk], [((block_k, head_dim), f32)] * 2


def footprints(config, batch: int, head_dim: int, dtype, bias_width=None) -> dict[str, tpu_footprint.Footprint]:
    """The SMEM and VMEM each TPU kernel of a call holds (its block specs, scratch and tables); with a
    bias of `bias_width` columns (banded, or per visit for a pattern with `visit_bias_key_slots`), its
    row blocks too, and a per-visit bias's key-slot table."""
    out = {}
    dtype = jnp.dtype(dtype)
    per_visit = _per_visit(config, bias_width)
    for kind, layout, transposed, compute in (
        ("forward", config.forward_layout, False, config.block_k_compute),
        ("dq", config.backward_layout, False, config.block_k_compute),
        ("dkv", config.backward_layout, True, config.block_k_compute),
    ):
        n_sub = layout.block_k // key_compute_block(layout.block_k, compute)
        smem = (*layout.visit_tables(transposed).arrays, ((batch * layout.num_k_blocks * n_sub,), jnp.int8))
        if per_visit:
            smem += (_key_slots(config.pattern),)
        ins, outs, scratch = _block_specs(
            kind, layout.block_q, layout.block_k, head_dim, dtype, bias_width,
            key_compute_block(layout.block_k, compute), per_visit,
        )
        out[kind] = tpu_footprint.footprint(
            f"block_sparse_flash_{'fwd' if kind == 'forward' else kind}",
            smem_arrays=smem, inputs=ins, outputs=outs, scratch=scratch,
        )
    return out


def _check_footprint(config, kind: str, batch: int, head_dim: int, dtype, bias_width=None) -> None:
    # Before lowering: an SMEM overflow would otherwise surface only on the chip, VMEM as a compile error.
    fp = footprints(config, batch, head_dim, dtype, bias_width)[kind]
    layout = config.forward_layout if kind == "forward" else config.backward_layout
    tpu_footprint.check(
        fp, f"a call with {layout.num_q_blocks} query blocks of {layout.block_q}, {layout.layout_heads} layout "
        f"head(s) and {layout.total_entries():,} visits, batch {batch}, head_dim {head_dim},",
    )


def _lanes(x, width: int):
    """`x` `[rows, NUM_LANES]`, equal along lanes, as `[rows, width]` (tiled, not lane-broadcast, when it can)."""
    if width == NUM_LANES:
        return x
    if width % NUM_LANES == 0:
        return jnp.tile(x, (1, width // NUM_LANES))
    if width < NUM_LANES:
        return x[:, :width]
    return jnp.broadcast_to(x[:, :1], (x.shape[0], width))


def _bias_rows(bias, tile: int):
    """A banded bias `[batch, seq, heads, width]` as the rows of a kernel cutting `tile`-column tiles:
    float32 `[batch, heads, seq, Wp]` (`Wp = bias_lanes(width, tile)`; the columns past the band are zeros)."""
    width = bias.shape[-1]
    rows = jnp.swapaxes(bias.astype(jnp.float32), 1, 2)
    return jnp.pad(rows, ((0, 0), (0, 0), (0, 0), (0, bias_lanes(width, tile) - width)))


def _bias_by_key(bias, left: int, right: int):
    """The banded bias by key: `[batch, seq, heads, width]` with row j, column `right + i - j` holding
    the bias of query i and key j (`bias[i, left - i + j]`); zeros where i is outside the sequence.

    A shear of the column-reversed bias: column u of key j reads row `j + u - right`. Done as
    one pad and reshape (row u of the transposed array shifted u places), which autodiff
    differentiates as it is.
    """
    b, n, h, width = bias.shape
    reversed_ = jnp.flip(bias, axis=3)  # column u: offset i - j = u - right
    by_column = jnp.transpose(reversed_, (0, 2, 3, 1))  # [b, h, width, n], column u's values by query i
    # Row u must read query j + u - right at position j: pad `right` zeros in front, `left` behind,
    # then shift row u left by u places (flatten with rows one longer, re-cut).
    padded = jnp.pad(by_column, ((0, 0), (0, 0), (0, 0), (right, left + 1)))
    length = n + width
    flat = padded.reshape(b, h, width * length)
    flat = jnp.pad(flat, ((0, 0), (0, 0), (0, width)))
    sheared = flat.reshape(b, h, width, length + 1)[..., :n]
    return jnp.transpose(sheared, (0, 3, 1, 2))


def _bias_rotation(row_first, column_first, side: int, lanes: int):
    """The `_bias_tile` rotation placing, at tile pair (r, c), the bias row's column `side + (column_first + c)
    - (row_first + r)`: `(row_first - column_first - side) mod lanes`. Rows of queries and columns of keys
    with side `left` (the bias's columns `left - i + j`); by key, rows of keys and columns of queries
    with side `right` (`_bias_by_key`'s `right + i - j`)."""
    return jnp.remainder(row_first - column_first - side, lanes)


def _bias_tile(rows, shift, keys: int):
    """The `[rows, keys]` bias tile whose pair (r, c) reads column `(c - shift - r) mod Wp` of `rows`
    `[rows, Wp]`: one strided lane rotation (Transformer-XL's relative shift) and a static slice."""
    return pltpu.roll(rows, shift, 1, stride=1, stride_axis=0)[:, :keys]


def _bias_gradient(d_scores, shift, lanes: int):
    """The inverse of `_bias_tile`: `[rows, Wp]` holding `d_scores[r, c]` at column `(c - shift - r) mod Wp`.

    Row r is rotated by `-shift - r`: the stride `Wp - 1` is -1 modulo the width (a rotation
    takes only non-negative amounts).
    """
    rows, keys = d_scores.shape
    padded = jnp.concatenate([d_scores, jnp.zeros((rows, lanes - keys), d_scores.dtype)], axis=1)
    return pltpu.roll(padded, jnp.remainder(-shift, lanes), 1, stride=lanes - 1, stride_axis=0)


def _slot_pieces(sub, rows: int, k_first: int, keys: int, columns):
    """The slot pairs a per-visit bias tile is made of, by query slot: `[(row slice, [(lanes, shift),
    ...]), ...]`, one `(lanes, shift)` per key slot j the tile's keys `k_first .. k_first + keys` of
    the key block reach, `lanes` the bool `[1, keys]` of the tile's columns in key slot j (None: all
    of them) and `shift` the pair's first column minus the tile column it lands at (traced int32)."""
    if sub is None:
        return [(slice(0, rows), [(None, columns[0] + k_first)])]
    slot, n_k = sub.sub_block, sub.sub_blocks_k
    slot_rows = rows // sub.sub_blocks_q
    # Static: the key slots of the tile (one when the key block lies within a slot).
    first_j, last_j = min(k_first // slot, n_k - 1), min((k_first + keys - 1) // slot, n_k - 1)
    key_slot = lax.div(k_first + lax.broadcasted_iota(jnp.int32, (1, keys), 1), slot)  # as in _VisitBias.columns
    return [
        (slice(i * slot_rows, (i + 1) * slot_rows),
         [(None if first_j == last_j else key_slot == j, columns[i * n_k + j] + k_first - j * slot)
          for j in range(first_j, last_j + 1)])
        for i in range(sub.sub_blocks_q)
    ]


def _visit_tile(rows, columns, k_first: int, keys: int, sub):
    """The `[rows, keys]` per-visit bias tile of keys `k_first ..` of a visit: per slot pair, the query
    slot's rows `[slot rows, Wp]` rotated to the pair's first column (one lane rotation) and the
    key slot's lanes taken; the query slots stacked."""
    lanes = rows.shape[-1]
    stacked = []
    for part, pairs in _slot_pieces(sub, rows.shape[0], k_first, keys, columns):
        tile = None
        for in_slot, shift in pairs:
            piece = pltpu.roll(rows[part], jnp.remainder(-shift, lanes), 1)[:, :keys]
            tile = piece if tile is None else jnp.where(in_slot, piece, tile)
        stacked.append(tile)
    return stacked[0] if len(stacked) == 1 else jnp.concatenate(stacked, axis=0)


def _add_visit_gradient(d_bias_ref, d_scores, columns, k_first: int, sub):
    """The inverse of `_visit_tile`, added into `d_bias_ref` `[rows, Wp]`: `d_scores` `[rows, keys]`
    back at each slot pair's columns (the inverse rotations)."""
    rows, keys = d_scores.shape
    lanes = d_bias_ref.shape[-1]
    for part, pairs in _slot_pieces(sub, rows, k_first, keys, columns):
        for in_slot, shift in pairs:
            piece = d_scores[part] if in_slot is None else jnp.where(in_slot, d_scores[part], 0.0)
            padded = jnp.concatenate([piece, jnp.zeros((piece.shape[0], lanes - keys), piece.dtype)], axis=1)
            d_bias_ref[part, :] += pltpu.roll(padded, jnp.remainder(shift, lanes), 1)


def _sub_blocks(code, kflags_ref, *, qb, kb, block_q, block_k, block_kc, num_k_blocks, left, right, sub, body):
    """Runs `body(c, masked)` for each key sub-block c of a visit that has work, masked only where needed.

    A full visit runs every sub-block; a partial one (cut by the band) only
    those the band reaches, masking those it cuts, or all of them when the
    layout has sub-block masks (`sub` not None: a partial visit may leave out
    sub-block pairs inside the band). A sub-block holding an invalid key (its
    flag, one per (batch, key sub-block)) is masked. Skipping a sub-block the
    band misses is exact: all its weights would be zero.
    """
    compute = (code & block_layout.CODE_COMPUTE) != 0
    partial = (code & block_layout.CODE_PARTIAL) != 0
    q_first, k_first, n_sub = qb * block_q, kb * block_k, block_k // block_kc
    flag_base = (pl.program_id(0) * num_k_blocks + kb) * n_sub
    for c in range(n_sub):
        k_lo = k_first + c * block_kc
        # Least and greatest key - query of the sub-block against the query block.
        least, most = k_lo - (q_first + block_q - 1), k_lo + block_kc - 1 - q_first
        reaches, inside = jnp.bool_(True), jnp.bool_(True)
        if left is not None:
            reaches, inside = reaches & (most >= -left), inside & (least >= -left)
        if right is not None:
            reaches, inside = reaches & (least <= right), inside & (most <= right)
        run = compute & (jnp.logical_not(partial) | reaches)
        invalid_key = kflags_ref[flag_base + c].astype(jnp.int32) != 0
        cut = jnp.bool_(True) if sub is not None else jnp.logical_not(inside)
        mask = (partial & cut) | invalid_key
        pl.when(run & mask)(functools.partial(body, c, True))
        pl.when(run & jnp.logical_not(mask))(functools.partial(body, c, False))


def forward(q, k, v, valid, config, bias=None):
    layout = config.forward_layout
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [batch, heads, seq, d]
    b, h, n, d = qt.shape
    bq, bk = layout.block_q, layout.block_k
    bkc = key_compute_block(bk, config.block_k_compute)
    width = visit.bias_width(bias)
    per_visit = _per_visit(config, width)
    _check_footprint(config, "forward", b, d, q.dtype, width)
    walk, prefetch = _tables(layout, False, valid, bkc, config.pattern if per_visit else None)
    q_of, k_of = walk.maps(rows_are_q=True)
    kernel = functools.partial(
        _forward_kernel, block_q=bq, block_k=bk, block_kc=bkc, num_k_blocks=layout.num_k_blocks, walk=walk,
        left=layout.left, right=layout.right, sub=_SubBlocks.of(layout), qk_scale=config.scale * visit.LOG2E,
        dots=visit.dots_for(config.backend, q.dtype), has_bias=bias is not None,
        visit_bias=_VisitBias.of(config.pattern) if per_visit else None,
    )
    q_spec = _spec((None, None, bq, d), q_of, 1)
    bias_specs, bias_args = [], []
    if bias is not None:
        bias_args = [_bias_rows(bias, _bias_tile_width("forward", bq, bkc))]
        bias_specs = [_spec((None, None, bq, bias_args[0].shape[-1]), q_of, 1)]
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(b, h, walk.length),
            in_specs=[q_spec, _spec((None, None, bk, d), k_of, 1), _spec((None, None, bk, d), k_of, 1),
                      _spec((None, None, NUM_SUBLANES, bk), k_of, 2, per_batch=False), *bias_specs],
            out_specs=[q_spec, _spec((None, None, bq, NUM_LANES), q_of, 1)],
            scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32), pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype), jax.ShapeDtypeStruct((b, h, n, NUM_LANES), jnp.float32)],
        compiler_params=_params(),
        interpret=config.interpret,
        name="block_sparse_flash_fwd" if bias is None else "block_sparse_flash_bias_fwd",
    )(*prefetch, qt, kt, vt, _valid_rows(valid, bk), *bias_args)
    return jnp.swapaxes(out, 1, 2), lse[..., 0]


def _forward_kernel(
    base_ref, offset_ref, codes_ref, sub_ref, kflags_ref, *refs,
    block_q, block_k, block_kc, num_k_blocks, walk, left, right, sub, qk_scale, dots, has_bias, visit_bias,
):
    key_slots_ref, refs = (refs[0], refs[1:]) if visit_bias is not None else (None, refs)
    q_ref, k_ref, v_ref, valid_ref, *refs = refs
    bias_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs if has_bias else (None, *refs)
    qb, kb, code, first, last = walk.position(base_ref, offset_ref, codes_ref)
    # Read here, not in the masked bodies: a grid position is read outside conditionals.
    sub_mask = None if sub is None else walk.sub_mask(sub_ref)
    columns = None if key_slots_ref is None else visit_bias.columns(key_slots_ref, qb, kb, block_q, block_k, sub)

    @pl.when(first)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def body(c, masked):
        keys = slice(c * block_kc, (c + 1) * block_kc)
        bias = None
        if columns is not None:
            bias = _visit_tile(bias_ref[...], columns, c * block_kc, block_kc, sub)
        elif bias_ref is not None:
            shift = _bias_rotation(qb * block_q, kb * block_k + c * block_kc, left, bias_ref.shape[-1])
            bias = _bias_tile(bias_ref[...], shift, block_kc)
        s = visit.scores(q_ref[...], k_ref[keys, :], qk_scale, dots, bias)
        if masked:
            pairs = None if sub is None else sub.pairs(s.shape, sub_mask, c * block_kc)
            s = visit.masked(s, qb * block_q, kb * block_k + c * block_kc, valid_ref[:1, keys], left, right,
                             pairs=pairs)
        # visit.online_update with the running max and sum replicated along lanes.
        m_prev, l_prev, acc = m_ref[...], l_ref[...], acc_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - _lanes(m_next, block_kc))
        m_ref[...] = m_next
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = _lanes(alpha, acc.shape[1]) * acc + dots(p, v_ref[keys, :], visit.NN)

    _sub_blocks(code, kflags_ref, qb=qb, kb=kb, block_q=block_q, block_k=block_k, block_kc=block_kc,
                num_k_blocks=num_k_blocks, left=left, right=right, sub=sub, body=body)

    @pl.when(last)
    def _write():
        # visit.finalize, lane-dense: a row whose running max is still MASK_VALUE attended nothing.
        m, l, acc = m_ref[...], l_ref[...], acc_ref[...]
        has_key = m > MASK_VALUE / 2
        l_safe = jnp.where(has_key, l, 1.0)
        width = acc.shape[1]
        o_ref[...] = jnp.where(_lanes(has_key, width), acc / _lanes(l_safe, width), 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has_key, (m + jnp.log2(l_safe)) / visit.LOG2E, MASK_VALUE)


def backward(q, k, v, valid, do, lse2, row_term, config, bias=None):
    """(dq, dk, dv) without a bias; (dq, dk, dv, d_bias) with one (float32, the bias's shape)."""
    layout = config.backward_layout
    qt, kt, vt, dot_ = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, do))
    b, h, _, d = qt.shape
    bq, bk = layout.block_q, layout.block_k
    bkc = key_compute_block(bk, config.block_k_compute)
    lse2, row_term = _row_terms(lse2, bq), _row_terms(row_term, bq)
    width = visit.bias_width(bias)
    per_visit = _per_visit(config, width)
    static = dict(block_q=bq, block_k=bk, block_kc=bkc, num_k_blocks=layout.num_k_blocks, left=layout.left,
                  right=layout.right, sub=_SubBlocks.of(layout), qk_scale=config.scale * visit.LOG2E,
                  scale=config.scale, dots=visit.dots_for(config.backend, q.dtype), has_bias=bias is not None,
                  visit_bias=_VisitBias.of(config.pattern) if per_visit else None)
    if bias is not None:
        by_query = _bias_rows(bias, _bias_tile_width("dq", bq, bkc))
        # Per visit, dk/dv reads the visited query blocks' rows too; banded, the terms by key.
        by_key = None if per_visit else _bias_rows(
            _bias_by_key(bias, layout.left, layout.right), _bias_tile_width("dkv", bq, bkc)
        )
    outputs = []
    for kind, transposed in (("dq", False), ("dkv", True)):
        _check_footprint(config, kind, b, d, q.dtype, width)
        walk, prefetch = _tables(layout, transposed, valid, bkc, config.pattern if per_visit else None)
        q_of, k_of = walk.maps(rows_are_q=not transposed)
        q_spec, k_spec = _spec((None, None, bq, d), q_of, 1), _spec((None, None, bk, d), k_of, 1)
        rows_spec = _spec((None, None, None, NUM_SUBLANES, bq), q_of, 2)
        bias_specs, bias_args = [], []
        if kind == "dq":
            kernel, out_specs = _dq_kernel, [q_spec]
            out_shape, scratch = [jax.ShapeDtypeStruct(qt.shape, q.dtype)], [pltpu.VMEM((bq, d), jnp.float32)]
            valid_spec = _spec((None, None, NUM_SUBLANES, bk), k_of, 2, per_batch=False)
            valid_in = _valid_rows(valid, bk)
            if bias is not None:
                # The query block's bias rows in, and their gradient out, resident across the row.
                bias_args, bias_specs = [by_query], [_spec((None, None, bq, by_query.shape[-1]), q_of, 1)]
                out_specs = out_specs + bias_specs
                out_shape = out_shape + [jax.ShapeDtypeStruct(by_query.shape, jnp.float32)]
        else:
            kernel, out_specs = _dkv_kernel, [k_spec, k_spec]
            out_shape = [jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)]
            scratch = [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]
            # Keys along sublanes, as the transposed scores: a column, read once per key block (the row).
            valid_spec, valid_in = _spec((None, bk, 1), k_of, 1, per_batch=False), valid.astype(jnp.int32)[..., None]
            if per_visit:
                bias_args, bias_specs = [by_query], [_spec((None, None, bq, by_query.shape[-1]), q_of, 1)]
            elif bias is not None:
                bias_args, bias_specs = [by_key], [_spec((None, None, bk, by_key.shape[-1]), k_of, 1)]
        name = f"block_sparse_flash_{kind}" if bias is None else f"block_sparse_flash_bias_{kind}"
        result = pl.pallas_call(
            functools.partial(kernel, walk=walk, **static),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=len(prefetch),
                grid=(b, h, walk.length),
                in_specs=[q_spec, k_spec, k_spec, valid_spec, q_spec, rows_spec, rows_spec, *bias_specs],
                out_specs=out_specs,
                scratch_shapes=scratch,
            ),
            out_shape=out_shape,
            compiler_params=_params(),
            interpret=config.interpret,
            name=name,
        )(*prefetch, qt, kt, vt, valid_in, dot_, lse2, row_term, *bias_args)
        outputs.extend(result)
    grads = tuple(jnp.swapaxes(x, 1, 2) for x in (outputs[0], *outputs[-2:]))
    if bias is None:
        return grads
    # The rows' lanes past the band, and rows no visit reached, hold zeros or what no pair reads.
    return grads + (jnp.swapaxes(outputs[1][..., :width], 1, 2),)


def _dq_kernel(
    base_ref, offset_ref, codes_ref, sub_ref, kflags_ref, *refs,
    block_q, block_k, block_kc, num_k_blocks, walk, left, right, sub, qk_scale, scale, dots, has_bias, visit_bias,
):
    key_slots_ref, refs = (refs[0], refs[1:]) if visit_bias is not None else (None, refs)
    q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, rt_ref, *refs = refs
    if has_bias:
        bias_ref, dq_ref, d_bias_ref, acc_ref = refs
    else:
        (dq_ref, acc_ref), bias_ref, d_bias_ref = refs, None, None
    qb, kb, code, first, last = walk.position(base_ref, offset_ref, codes_ref)
    # Read here, not in the masked bodies: a grid position is read outside conditionals.
    sub_mask = None if sub is None else walk.sub_mask(sub_ref)
    columns = None if key_slots_ref is None else visit_bias.columns(key_slots_ref, qb, kb, block_q, block_k, sub)

    @pl.when(first)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        if d_bias_ref is not None:
            d_bias_ref[...] = jnp.zeros(d_bias_ref.shape, jnp.float32)

    def body(c, masked):
        keys = slice(c * block_kc, (c + 1) * block_kc)
        k = k_ref[keys, :]
        bias = shift = None
        if columns is not None:
            bias = _visit_tile(bias_ref[...], columns, c * block_kc, block_kc, sub)
        elif bias_ref is not None:
            shift = _bias_rotation(qb * block_q, kb * block_k + c * block_kc, left, bias_ref.shape[-1])
            bias = _bias_tile(bias_ref[...], shift, block_kc)
        s = visit.scores(q_ref[...], k, qk_scale, dots, bias)
        if masked:
            pairs = None if sub is None else sub.pairs(s.shape, sub_mask, c * block_kc)
            s = visit.masked(s, qb * block_q, kb * block_k + c * block_kc, valid_ref[:1, keys], left, right,
                             pairs=pairs)
        # The row terms as columns (queries along sublanes), as splash's dq kernel reads its logsumexp.
        lse2, row_term = jnp.expand_dims(lse_ref[0], -1), jnp.expand_dims(rt_ref[0], -1)
        _, ds = visit.probs_and_dscores(s, lse2, row_term, do_ref[...], v_ref[keys, :], dots)
        acc_ref[...] += dots(ds, k, visit.NN)
        if d_bias_ref is not None:
            # ds is the gradient of the natural-log logits `scale * (q.k + bias)`: the bias's is ds * scale.
            if columns is not None:
                _add_visit_gradient(d_bias_ref, ds * scale, columns, c * block_kc, sub)
            else:
                d_bias_ref[...] += _bias_gradient(ds * scale, shift, d_bias_ref.shape[-1])

    _sub_blocks(code, kflags_ref, qb=qb, kb=kb, block_q=block_q, block_k=block_k, block_kc=block_kc,
                num_k_blocks=num_k_blocks, left=left, right=right, sub=sub, body=body)

    @pl.when(last)
    def _write():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    base_ref, offset_ref, codes_ref, sub_ref, kflags_ref, *refs,
    block_q, block_k, block_kc, num_k_blocks, walk, left, right, sub, qk_scale, scale, dots, has_bias, visit_bias,
):
    key_slots_ref, refs = (refs[0], refs[1:]) if visit_bias is not None else (None, refs)
    q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, rt_ref, *refs = refs
    bias_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs if has_bias else (None, *refs)
    kb, qb, code, first, last = walk.position(base_ref, offset_ref, codes_ref)
    sub_mask = None if sub is None else walk.sub_mask(sub_ref)
    columns = None if key_slots_ref is None else visit_bias.columns(key_slots_ref, qb, kb, block_q, block_k, sub)

    @pl.when(first)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def body(c, masked):
        # Transposed scores [keys, queries], as splash's dk/dv kernel: the row terms broadcast
        # along sublanes and dk, dv are plain (NN) products.
        keys = slice(c * block_kc, (c + 1) * block_kc)
        q, do = q_ref[...], do_ref[...]
        bias_t = None
        if columns is not None:
            # The visited query block's rows: the tile by query, transposed to the scores' [keys, queries].
            bias_t = _visit_tile(bias_ref[...], columns, c * block_kc, block_kc, sub).T
        elif bias_ref is not None:
            # By key: the key sub-block's rows, the query block's columns.
            shift = _bias_rotation(kb * block_k + c * block_kc, qb * block_q, right, bias_ref.shape[-1])
            bias_t = _bias_tile(bias_ref[keys, :], shift, block_q)
        s = visit.scores(k_ref[keys, :], q, qk_scale, dots, bias_t)
        if masked:
            pairs = None if sub is None else sub.pairs(s.shape, sub_mask, c * block_kc, keys_axis=0)
            s = visit.masked(s, qb * block_q, kb * block_k + c * block_kc, valid_ref[keys, :], left, right,
                             keys_axis=0, pairs=pairs)
        p, ds = visit.probs_and_dscores(s, lse_ref[:1, :], rt_ref[:1, :], v_ref[keys, :], do, dots)
        dv_acc[keys, :] += dots(p, do, visit.NN)
        dk_acc[keys, :] += dots(ds, q, visit.NN)

    _sub_blocks(code, kflags_ref, qb=qb, kb=kb, block_q=block_q, block_k=block_k, block_kc=block_kc,
                num_k_blocks=num_k_blocks, left=left, right=right, sub=sub, body=body)

    @pl.when(last)
    def _write():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)
