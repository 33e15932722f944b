"""Sequence parallelism for the attention ops: q, k, v sharded along the sequence over a mesh axis.

The ops run under `jax.shard_map`, manual over the sequence axis only (other mesh axes, such as
the batch's, stay with the compiler), on the mesh of the context (`jax.set_mesh`). Shard s of n
holds positions `[s L, (s + 1) L)`, `L = seq / n`. What crosses devices:

* Sliding window: the `left` keys and values before the shard and the `right` after it (window
  times the largest dilation, in positions), from the neighbours by `lax.ppermute`, one permute
  per shard the window reaches, each carrying only the positions needed. K and V are never
  all-gathered. The band then runs on the shard extended by its halos (the halo rows are
  queries too, discarded after). Global tokens are few: their keys and values (and, for the
  global queries' rows, their queries) are gathered into slots by a `psum` of each shard's
  own; every shard scores the global queries against its keys, and the partial rows are
  merged across shards by log-sum-exp (`partial_softmax`), then written by the shard owning
  each global token.
* BigBird: the shards' rows attend a static list of key blocks, so each shard fetches exactly
  the blocks it needs from the others (window neighbours, random blocks, global blocks), one
  `ppermute` per shard distance, each sender choosing its blocks from a static table by its
  axis index. Its rows then run as one unsharded pattern over the blocks it holds
  (`block_sparse`'s own scan); the global blocks' rows are merged across shards as above.
* FAVOR+, bidirectional: the key stabiliser by `pmax` and the `[features, head_dim]` state and
  normaliser by `psum`. Causal: an exclusive prefix over the shards of their states (all-gathered,
  n states per shard, masked to the shards before), each rescaled to the running maximum before
  the shard; nothing from a later shard enters a shard's result.

The backward passes are JAX's transposes of these collectives (a `ppermute` back the other way,
a `psum` broadcast), so gradients need no code of their own.

Layout: `[batch, seq, heads, head_dim]`, as the public ops.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from kernels_pallas.common import MASK_VALUE
from longjax.attention import block_sparse as block_sparse_lib
from longjax.attention import favor as favor_lib
from longjax.attention import global_tokens, partial_softmax
from longjax.attention.partial_softmax import PartialAttention
from longjax.attention.relative import RelativePositions
from longjax.attention.specs import BlockSparseSpec, SlidingWindowSpec


def check_sequence_axis(sequence_axis: str, seq: int) -> int:
    """The size of `sequence_axis` in the context's mesh, after checking it shards `seq` evenly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(
            f"sequence_axis={sequence_axis!r} needs a mesh in context (`with jax.set_mesh(mesh):`), and there is none"
        )
    if sequence_axis not in mesh.axis_names:
        raise ValueError(f"sequence_axis={sequence_axis!r} is not an axis of the mesh in context {mesh.axis_names}")
    size = mesh.shape[sequence_axis]
    if seq % size:
        raise ValueError(
            f"sequence_axis={sequence_axis!r}: the sequence length ({seq}) must be a multiple of the axis size ({size})"
        )
    return size


def halo(x, axis_name: str, *, left: int, right: int):
    """`x` `[batch, L, ...]` (this shard) extended by `left` positions before it and `right` after.

    Each side comes from the shards it reaches, one `ppermute` per shard, carrying only the
    positions used. Positions before the sequence's start or after its end are zeros.
    """
    n = lax.axis_size(axis_name)
    length = x.shape[1]

    def from_shard(hop: int, piece):
        """`piece` as the shard `hop` shards before this one holds it (negative `hop`: after); zeros
        where there is no such shard."""
        if abs(hop) >= n:
            return jnp.zeros_like(piece)
        perm = [(i, i + hop) for i in range(n) if 0 <= i + hop < n]
        return lax.ppermute(piece, axis_name, perm)

    before = []
    for hop in range(-(-left // length), 0, -1):  # the farthest shard first
        need = min(length, left - (hop - 1) * length)
        before.append(from_shard(hop, x[:, length - need:]))
    after = []
    for hop in range(1, -(-right // length) + 1):
        need = min(length, right - (hop - 1) * length)
        after.append(from_shard(-hop, x[:, :need]))
    return jnp.concatenate(before + [x] + after, axis=1)


def _reaches(spec: SlidingWindowSpec, length: int, n: int) -> tuple[int, int]:
    """Positions the window reaches before and after a shard, clipped to the sequence."""
    widest = max(spec.dilation)
    limit = (n - 1) * length
    return min(spec.left * widest, limit), min(spec.right * widest, limit)


def _gather_slots(x, local_positions, owned, axis_name):
    """`x` `[batch, heads, L, head_dim]` at the global slots, from the shards owning them: `[batch, heads, slots, head_dim]`.

    The result is the same on every shard, but is typed per-shard (`pcast`): the global passes'
    custom gradients return per-shard cotangents, which the cast's transpose (a `psum`) adds up.
    """
    index = jnp.clip(local_positions, 0, x.shape[2] - 1)[:, None, :, None]
    mine = jnp.where(owned[:, None, :, None], jnp.take_along_axis(x, index, axis=2), 0)
    gathered = lax.psum(mine, axis_name)
    return lax.pcast(gathered, axis_name, to="varying")


def _merge_across(part: PartialAttention, axis_name) -> jax.Array:
    """The normalised attention over the union of every shard's disjoint key set, from each shard's part."""
    # The shift cancels; it only keeps the exponentials in range, so it carries no gradient.
    top = lax.pmax(lax.stop_gradient(part.lse), axis_name)
    weight = jnp.exp(part.lse - top)
    total = lax.psum(weight, axis_name)
    return lax.psum(part.out * weight[..., None], axis_name) / total[..., None]


def _sliding_window_shard(
    q, k, v, global_mask, global_qkv, padding_mask, relative_queries, embeddings, *, spec, scale,
    max_global_tokens, band, axis_name,
):
    """One shard's Longformer attention; q, k, v `[batch, L, heads, head_dim]`, masks `[batch, L]`.

    relative_queries (sharded like q) and embeddings (whole): the relative positions, or None.
    """
    n = lax.axis_size(axis_name)
    length = q.shape[1]
    left, right = _reaches(spec, length, n)
    key_valid = global_tokens.local_key_valid(q, global_mask, padding_mask)
    extend = lambda x: halo(x, axis_name, left=left, right=right)
    # Halo rows are queries of the band too, discarded below: zeros save sending them.
    pad_rows = lambda x: jnp.pad(x, [(0, 0), (left, right), (0, 0), (0, 0)])
    q_ext = pad_rows(q)
    relative = None
    if relative_queries is not None:
        # Offsets do not depend on where the shard starts, so the band's term needs no shift. The
        # table is typed per-shard: each shard's gradient of it is partial, and the cast's
        # transpose (a psum) adds them up.
        relative = RelativePositions(pad_rows(relative_queries), lax.pcast(embeddings, axis_name, to="varying"))
    part = band(q_ext, extend(k), extend(v), extend(key_valid), spec=spec, scale=scale, relative=relative)
    part = PartialAttention(part.out[:, :, left:left + length], part.lse[:, :, left:left + length])
    to_bhnd = lambda x: jnp.swapaxes(x, 1, 2)
    if global_mask is None:
        return global_tokens.finish(to_bhnd(part.out), padding_mask, q.dtype)

    out = _add_global_tokens(
        part, to_bhnd(q), to_bhnd(k), to_bhnd(v), global_mask=global_mask,
        global_qkv=None if global_qkv is None else tuple(map(to_bhnd, global_qkv)),
        padding_mask=padding_mask, max_global_tokens=max_global_tokens, causal=spec.causal, scale=scale,
        axis_name=axis_name,
    )
    return global_tokens.finish(to_bhnd(out), padding_mask, q.dtype)


def _global_slots_here(is_global, max_global_tokens, axis_name):
    """The global slots of the whole sequence, from this shard's `[batch, L]` mask: positions relative
    to this shard (`[batch, slots]`), used, owned here, and each row's overflow."""
    length = is_global.shape[1]
    # The masks are [batch, seq] booleans, not keys or values: every shard sees every global's position.
    everywhere = lax.all_gather(is_global, axis_name, axis=1, tiled=True)
    positions, used, overflow = global_tokens.global_slots(everywhere, max_global_tokens)
    local_positions = positions - lax.axis_index(axis_name) * length
    owned = used & (local_positions >= 0) & (local_positions < length)
    return local_positions, used, owned, overflow


def _rows_of_global_queries(out, q_sel, k, v, padding_mask, local_positions, used, owned, *, causal, scale, axis_name):
    """`out` with the rows of the global queries `q_sel` (gathered into slots) that this shard owns
    replaced by their attention over every key of every shard."""
    rows = global_tokens.from_gathered_queries(
        q_sel, k, v, padding_mask, local_positions, used, causal=causal, scale=scale,
    )
    return global_tokens.set_rows(out, local_positions, owned, _merge_across(rows, axis_name))


def _add_global_tokens(
    part, qh, kh, vh, *, global_mask, global_qkv, padding_mask, max_global_tokens, causal, scale, axis_name,
):
    """`global_tokens.add_global_tokens` on one shard (`[batch, heads, L, head_dim]`): every query
    against the gathered global keys, merged with `part`; the global queries' rows merged across
    shards. float32 `[batch, heads, L, head_dim]`."""
    is_global = global_mask if padding_mask is None else global_mask & padding_mask
    local_positions, used, owned, overflow = _global_slots_here(is_global, max_global_tokens, axis_name)
    k_g, v_g = (_gather_slots(x, local_positions, owned, axis_name) for x in (kh, vh))
    part = partial_softmax.merge(
        part, global_tokens.to_gathered_keys(qh, k_g, v_g, local_positions, used, causal=causal, scale=scale)
    )
    gq, gk, gv = (qh, kh, vh) if global_qkv is None else global_qkv
    out = _rows_of_global_queries(
        part.out, _gather_slots(gq, local_positions, owned, axis_name), gk, gv, padding_mask, local_positions,
        used, owned, causal=causal, scale=scale, axis_name=axis_name,
    )
    return jnp.where(overflow[:, None, None, None], jnp.nan, out)


def _shard_map(fn, axis_name: str, arrays: dict, replicated: dict | None = None, *, check_vma: bool = True):
    """`fn(**arrays, **replicated)` under `jax.shard_map` over `axis_name` of the context's mesh:
    every entry of `arrays` sharded along its axis 1 (seq), `replicated` whole on every shard,
    None entries passed through."""
    replicated = replicated or {}
    names = [name for name, x in arrays.items() if x is not None]
    sharded = lambda x: PartitionSpec(None, axis_name)
    in_specs = (
        tuple(jax.tree_util.tree_map(sharded, arrays[name]) for name in names),
        jax.tree_util.tree_map(lambda x: PartitionSpec(), replicated),
    )

    def body(xs, whole):
        return fn(**{**arrays, **dict(zip(names, xs))}, **whole)

    mapped = jax.shard_map(
        body, in_specs=in_specs, out_specs=PartitionSpec(None, axis_name), axis_names=frozenset({axis_name}),
        check_vma=check_vma,
    )
    return mapped(tuple(arrays[name] for name in names), replicated)


def sliding_window_sharded(
    q, k, v, *, spec: SlidingWindowSpec, global_mask, global_qkv, padding_mask, scale, max_global_tokens,
    band, sequence_axis: str, check_vma: bool = True, relative=None,
):
    """`sliding_window_attention` with the sequence sharded over `sequence_axis`.

    Arguments as the op's, already checked; `max_global_tokens` resolved when `global_mask` is
    given; `band(q, k, v, key_valid, *, spec, scale, relative) -> PartialAttention` is the implementation's
    band (XLA or kernels). `check_vma=False` for a band whose `pallas_call`s declare no
    per-axis variance of their outputs; every value the shards exchange is then used by
    per-shard (varying) computations only, so the collectives' transposes are still exact (the
    sharded-vs-unsharded gradient tests cover it). Returns `[batch, seq, heads, head_dim]`,
    sharded like q.
    """
    check_sequence_axis(sequence_axis, q.shape[1])
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else float(scale)

    def fn(q, k, v, global_mask, global_qkv, padding_mask, relative_queries, embeddings):
        return _sliding_window_shard(
            q, k, v, global_mask, global_qkv, padding_mask, relative_queries, embeddings, spec=spec,
            scale=scale, max_global_tokens=max_global_tokens, band=band, axis_name=sequence_axis,
        )

    arrays = dict(
        q=q, k=k, v=v, global_mask=global_mask, global_qkv=global_qkv, padding_mask=padding_mask,
        relative_queries=None if relative is None else relative.queries,
    )
    replicated = dict(embeddings=None if relative is None else relative.embeddings)
    return _shard_map(fn, sequence_axis, arrays, replicated, check_vma=check_vma)


@dataclasses.dataclass(frozen=True)
class _BlockFetch:
    """Which key blocks each shard of a BigBird pattern fetches, and its layout over what it holds.

    Shard s keeps, in order: one zero block (where padded rows write), the blocks it fetches, by
    hop (`hops[i]`: from shard s - hops[i]; `send[i][t]`: the local indices of the blocks shard t
    sends), then its own blocks. Its sparse rows (`query_blocks[s]`, `key_blocks[s]`,
    `key_used[s]`, as `block_sparse.key_block_lists` but numbered in that layout, padded with
    rows that attend nothing) then run as one unsharded pattern over it. A causal pattern fetches
    only blocks of earlier shards, which sit before its own, so position order is kept.
    """

    hops: tuple[int, ...]
    send: tuple[np.ndarray, ...]  # per hop: int32 [shards, fetched]
    held_blocks: int  # blocks before the shard's own: 1 + everything fetched
    query_blocks: np.ndarray  # int32 [shards, rows]
    key_blocks: np.ndarray  # int32 [shards, heads, rows, keys_per_row]
    key_used: np.ndarray  # bool, the same shape


def _block_fetch(spec: BlockSparseSpec, shards: int) -> _BlockFetch:
    """The static fetch plan of `spec` over `shards` shards of `num_blocks / shards` blocks."""
    local = spec.num_blocks // shards
    query_blocks, key_blocks, key_used = block_sparse_lib.key_block_lists(spec)
    rows = [np.nonzero(query_blocks // local == s)[0] for s in range(shards)]
    needs = []  # per shard: {hop: sorted global block ids fetched from shard s - hop}
    for s in range(shards):
        wanted = set(key_blocks[:, rows[s]][key_used[:, rows[s]]].tolist())
        by_hop: dict[int, list[int]] = {}
        for block in sorted(wanted):
            if block // local != s:
                by_hop.setdefault(s - block // local, []).append(block)
        needs.append(by_hop)
    hops = tuple(sorted({hop for by_hop in needs for hop in by_hop}))
    counts = {hop: max(len(by_hop.get(hop, ())) for by_hop in needs) for hop in hops}
    send = []
    for hop in hops:
        table = np.zeros((shards, counts[hop]), np.int32)
        for t in range(shards):
            if 0 <= t + hop < shards:
                blocks = needs[t + hop].get(hop, [])
                table[t, :len(blocks)] = np.asarray(blocks, np.int32) - t * local
        send.append(table)
    held = 1 + sum(counts.values())
    heads, _, per_row = key_blocks.shape
    most_rows = max(1, max(len(r) for r in rows))
    q_table = np.zeros((shards, most_rows), np.int32)  # padded rows: the zero block
    k_table = np.zeros((shards, heads, most_rows, per_row), np.int32)
    used_table = np.zeros((shards, heads, most_rows, per_row), bool)
    for s in range(shards):
        where = {}
        start = 1
        for hop in hops:
            for i, block in enumerate(needs[s].get(hop, [])):
                where[block] = start + i
            start += counts[hop]
        for block in range(s * local, (s + 1) * local):
            where[block] = held + block - s * local
        r = rows[s]
        used = key_used[:, r]
        q_table[s, :len(r)] = held + query_blocks[r] - s * local
        # Every attended block is held (KeyError otherwise); unattended entries point at the zero block.
        k_table[s, :, :len(r)] = np.vectorize(lambda b, u: where[int(b)] if u else 0, otypes=[np.int32])(
            key_blocks[:, r], used
        )
        used_table[s, :, :len(r)] = used
    return _BlockFetch(hops, tuple(send), held, q_table, k_table, used_table)


def _bigbird_shard(q, k, v, global_mask, padding_mask, *, spec, scale, max_global_tokens, fetch, axis_name):
    """One shard's BigBird attention; q, k, v `[batch, L, heads, head_dim]`, masks `[batch, L]`."""
    n = lax.axis_size(axis_name)
    shard = lax.axis_index(axis_name)
    size = spec.block_size
    length = q.shape[1]
    to_bhnd = lambda x: jnp.swapaxes(x, 1, 2)
    qh, kh, vh = to_bhnd(q), to_bhnd(k), to_bhnd(v)
    key_valid = global_tokens.local_key_valid(q, global_mask, padding_mask)

    def held(x, axis: int):
        """`x` blocked along `axis` (`[..., L / block, block, ...]`): the zero block, the fetched blocks, its own."""
        pieces = [jnp.zeros_like(jnp.take(x, np.asarray([0]), axis=axis))]
        for hop, table in zip(fetch.hops, fetch.send):
            piece = jnp.take(x, jnp.asarray(table)[shard], axis=axis)
            perm = [(t, t + hop) for t in range(n) if 0 <= t + hop < n]
            pieces.append(lax.ppermute(piece, axis_name, perm))
        pieces.append(x)
        joined = jnp.concatenate(pieces, axis=axis)
        return joined.reshape(joined.shape[:axis] + (-1,) + joined.shape[axis + 2:])

    blocked = lambda x, axis: x.reshape(x.shape[:axis] + (-1, size) + x.shape[axis + 1:])
    k_held, v_held = held(blocked(kh, 2), 2), held(blocked(vh, 2), 2)
    valid_held = held(blocked(key_valid, 1), 1)
    before = fetch.held_blocks * size
    q_held = jnp.pad((qh * scale).astype(qh.dtype), [(0, 0), (0, 0), (before, 0), (0, 0)])
    out, lse = block_sparse_lib.sparse_part(
        q_held, k_held, v_held, valid_held,
        *(jnp.asarray(table)[shard] for table in (fetch.query_blocks, fetch.key_blocks, fetch.key_used)),
        size, spec.causal,
    )
    part = PartialAttention(out[:, :, before:], lse[:, :, before:])
    if global_mask is not None:
        out = _add_global_tokens(
            part, qh, kh, vh, global_mask=global_mask, global_qkv=None, padding_mask=padding_mask,
            max_global_tokens=max_global_tokens, causal=spec.causal, scale=scale, axis_name=axis_name,
        )
    else:
        out = part.out
    positions = block_sparse_lib.global_block_positions(spec, n * length)
    if positions is not None:
        # The global blocks' queries attend every key: gathered, scored here, merged across shards.
        local_positions = jnp.broadcast_to(jnp.asarray(positions) - shard * length, (q.shape[0], len(positions)))
        owned = (local_positions >= 0) & (local_positions < length)
        used = jnp.ones(local_positions.shape, bool)
        out = _rows_of_global_queries(
            out, _gather_slots(qh, local_positions, owned, axis_name), kh, vh, padding_mask, local_positions,
            used, owned, causal=spec.causal, scale=scale, axis_name=axis_name,
        )
    return global_tokens.finish(to_bhnd(out), padding_mask, q.dtype)


def block_sparse_sharded(
    q, k, v, *, spec: BlockSparseSpec, global_mask, padding_mask, scale, max_global_tokens, sequence_axis: str,
):
    """`block_sparse_attention`'s XLA implementation with the sequence sharded over `sequence_axis`.

    Every key block a shard's rows attend that another shard holds (window neighbours, random
    blocks, global blocks) comes by one `ppermute` per shard distance, carrying only those
    blocks; the global blocks' rows are merged across shards. Needs seq a multiple of
    `block_size` times the axis size. Returns `[batch, seq, heads, head_dim]`, sharded like q.
    """
    shards = check_sequence_axis(sequence_axis, q.shape[1])
    if q.shape[1] % (spec.block_size * shards):
        raise ValueError(
            f"sequence_axis={sequence_axis!r}: the sequence length ({q.shape[1]}) must be a multiple of "
            f"block_size ({spec.block_size}) times the axis size ({shards}), so that shards hold whole blocks"
        )
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else float(scale)
    fetch = _block_fetch(spec, shards)

    def fn(q, k, v, global_mask, padding_mask):
        return _bigbird_shard(
            q, k, v, global_mask, padding_mask, spec=spec, scale=scale, max_global_tokens=max_global_tokens,
            fetch=fetch, axis_name=sequence_axis,
        )

    arrays = dict(q=q, k=k, v=v, global_mask=global_mask, padding_mask=padding_mask)
    return _shard_map(fn, sequence_axis, arrays)


class _AcrossShards(favor_lib.SequenceCombine):
    """FAVOR+'s combinations over the shards of a mesh axis."""

    def __init__(self, axis_name: str):
        self.axis_name = axis_name

    def max(self, x):
        return lax.pmax(x, self.axis_name)

    def sum(self, x):
        return lax.psum(x, self.axis_name)

    def own(self, x):
        return lax.pcast(x, self.axis_name, to="varying")

    def before(self, block_max, key_sums):
        """The exclusive prefix over shards: the keys of the shards before this one, each shard's
        sums rescaled from its own running maximum to the one before this shard."""
        shard = lax.axis_index(self.axis_name)
        gather = lambda x: lax.all_gather(x, self.axis_name, axis=0)  # [shards, ...]
        earlier = jnp.arange(lax.axis_size(self.axis_name)) < shard
        mask = lambda x: earlier.reshape((-1,) + (1,) * (x.ndim - 1))
        maxes = gather(lax.stop_gradient(block_max))
        max_before = jnp.max(jnp.where(mask(maxes), maxes, MASK_VALUE), axis=0)
        # Shard t's keys as of its end: its running maximum there is the max over shards <= t.
        end_max = jnp.maximum(max_before, block_max)
        kv, normaliser = key_sums(end_max)
        end_maxes = gather(end_max)
        # Masked in the exponent (later shards' maxima may exceed max_before), so exactly 0.
        weight = jnp.exp(jnp.where(mask(end_maxes), end_maxes - max_before, MASK_VALUE))
        state = jnp.sum(gather(kv) * weight[..., None, None], axis=0)
        normaliser = jnp.sum(gather(normaliser) * weight[..., None], axis=0)
        return state, normaliser, max_before


def favor_sharded(q, k, v, *, padding_mask, sequence_axis: str, **options):
    """`favor_attention`'s XLA implementation with the sequence sharded over `sequence_axis`.

    `options` as `favor.favor_xla`'s (projection, feature_map, causal, scale, chunk_size).
    Returns `[batch, seq, heads, head_dim]`, sharded like q.
    """
    check_sequence_axis(sequence_axis, q.shape[1])
    projection = options.pop("projection")

    def fn(q, k, v, padding_mask, projection):
        return favor_lib.favor_xla(
            q, k, v, projection=projection, padding_mask=padding_mask, combine=_AcrossShards(sequence_axis),
            **options,
        )

    return _shard_map(fn, sequence_axis, dict(q=q, k=k, v=v, padding_mask=padding_mask), dict(projection=projection))
