"""Token-level global attention beside a sparse pattern, shared by the sparse ops.

Global tokens are few: every query against the global keys, and the global
queries against every key, are dense passes over `max_global_tokens` slots,
linear in seq. The first merges with the sparse part through the log-sum-exp
(global keys are removed from the sparse part's keys, so each key counts
once); the second overwrites the rows of global queries. A row with more
global tokens than slots comes out as NaN rather than silently wrong.

The same two passes serve globals at static positions, the same in every row
(BigBird's global blocks on the block-sparse kernels): `to_keys_at` and
`from_queries_at` need no slots, hence no bound.

Both passes run in chunks of the sequence (`chunk_length`), so their float32
scores, probabilities and cotangents are `[chunk, globals]` per batch and head,
never `[seq, globals]`: queries in chunks against the global keys, keys in
chunks for the global queries (chunk results merged by log-sum-exp). Their
backward passes go by chunk too, recomputing each chunk's probabilities from
the saved log-sum-exp as FlashAttention's does, so only `[seq, head_dim]`
arrays (inputs, outputs and their gradients) grow with seq. Short inputs take
one chunk: the plain dense pass, differentiated by JAX.

Layout: `[batch, heads, seq, head_dim]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.common import MASK_VALUE
from longjax.attention import partial_softmax
from longjax.attention.partial_softmax import PartialAttention

# The chunk rule's budget: float32 scores per batch and head in one chunk (1 MiB). At 16 heads
# that is 16 MiB per score-sized temporary, whatever the sequence length.
CHUNK_SCORES = 1 << 18
# The shortest chunk, so that very many globals do not make the chunk loop very long.
MIN_CHUNK = 128


def chunk_length(length: int, num_globals: int) -> int:
    """Positions (queries or keys) per chunk of a dense global pass over `length` positions.

    `length` itself while `length * num_globals <= CHUNK_SCORES`: one chunk, the plain dense
    pass, for tests and short inputs. Beyond, the largest power of two `c` with
    `c * num_globals <= CHUNK_SCORES`, but at least `MIN_CHUNK`: e.g. 2048 for 128 globals,
    so sequences longer than 2048 are cut into 2048-position chunks (the last one moved back
    to end at `length`, see `_chunk_starts`).
    """
    if length * num_globals <= CHUNK_SCORES:
        return length
    fits = max(1, CHUNK_SCORES // num_globals)
    return max(MIN_CHUNK, 1 << (fits.bit_length() - 1))


def _chunk_starts(length: int, chunk: int):
    """Where the chunks of a `length`-position pass start, as int32 `(reads, owns)` `[num_chunks]`.

    Chunk i reads positions `[reads[i], reads[i] + chunk)` and owns those from `owns[i] = i * chunk`
    on. The last chunk is moved back to end at `length` (reading a few positions that the chunk
    before owns) rather than padded: no copy of q, k or v, and a position counts in the chunk
    that owns it only.
    """
    owns = np.arange(-(-length // chunk), dtype=np.int32) * chunk
    return jnp.asarray(np.minimum(owns, length - chunk)), jnp.asarray(owns)


def _dot(subscripts: str, a, b):
    """A two-operand einsum in the operands' dtype, accumulated in float32."""
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


def _slice(x, start, chunk: int, axis: int = 2):
    return jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=axis)


def _add_at(total, update, start, axis: int = 2):
    """`total` with `update` added along `axis` from `start` on (`update` is zero where not owned)."""
    summed = _slice(total, start, update.shape[axis], axis) + update.astype(total.dtype)
    return jax.lax.dynamic_update_slice_in_dim(total, summed, start, axis=axis)


def local_key_valid(q, global_mask, padding_mask):
    """bool `[batch, seq]`: the keys the sparse part attends (real, and not global)."""
    valid = jnp.ones(q.shape[:2], bool) if padding_mask is None else padding_mask
    return valid if global_mask is None else valid & ~global_mask


def global_slots(is_global, num_slots: int):
    """Positions of the global tokens of each row, in order, padded to `num_slots`.

    Returns (positions int32 `[batch, slots]`, slot_used bool `[batch, slots]`,
    overflow bool `[batch]` where a row has more globals than slots).
    """
    positions = jnp.argsort(~is_global, axis=-1, stable=True)[:, :num_slots].astype(jnp.int32)
    used = jnp.take_along_axis(is_global, positions, axis=-1)
    overflow = jnp.sum(is_global, axis=-1) > num_slots
    return positions, used, overflow


# Every query against the global keys.


def _keys_mask(first_row: int | jax.Array, rows: int, positions, used, causal):
    """bool `[batch, 1, rows, slots]`: which global keys the queries from `first_row` on attend."""
    mask = used[:, None, None, :]
    if causal:
        row_ids = first_row + jnp.arange(rows)
        mask = mask & (positions[:, None, None, :] <= row_ids[None, None, :, None])
    return mask


def _keys_dense(q_rows, first_row, k_g, v_g, positions, used, causal, scale) -> PartialAttention:
    """Queries `[batch, heads, rows, head_dim]` from `first_row` on against the global keys `k_g`, `v_g`."""
    scores = _dot("bhnd,bhgd->bhng", q_rows, k_g)
    mask = _keys_mask(first_row, q_rows.shape[2], positions, used, causal)
    probs, lse = partial_softmax.masked_softmax(scores * scale, mask)
    out = _dot("bhng,bhgd->bhnd", probs.astype(v_g.dtype), v_g)
    return PartialAttention(out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _keys_chunked(q, k_g, v_g, positions, used, causal, scale, chunk):
    """`_keys_dense` of every query, queries in chunks: (out, lse)."""
    return _keys_chunked_fwd(q, k_g, v_g, positions, used, causal, scale, chunk)[0]


def _keys_chunked_fwd(q, k_g, v_g, positions, used, causal, scale, chunk):
    def step(part, xs):
        read, _ = xs
        chunk_part = _keys_dense(_slice(q, read, chunk), read, k_g, v_g, positions, used, causal, scale)
        # Rows the chunk reads but does not own are recomputed equal: overwriting them is harmless.
        return PartialAttention(*(jax.lax.dynamic_update_slice_in_dim(x, c, read, axis=2)
                                  for x, c in zip(part, chunk_part))), None

    n = q.shape[2]
    # Carries made like q (zeros_like keeps a shard_map value's per-shard type, jnp.zeros would not).
    empty = PartialAttention(jnp.zeros_like(q, jnp.float32), jnp.zeros_like(q, jnp.float32, shape=q.shape[:3]))
    part, _ = jax.lax.scan(step, empty, _chunk_starts(n, chunk))
    return part, (q, k_g, v_g, positions, used, part)


def _keys_chunked_bwd(causal, scale, chunk, residuals, d_part):
    """By query chunk, probabilities recomputed from the saved lse (FlashAttention's backward)."""
    q, k_g, v_g, positions, used, part = residuals
    d_out, d_lse = d_part
    # The softmax backward's row term: sum_j p_j dp_j = d_out . out.
    delta = jnp.sum(d_out * part.out, axis=-1)

    def step(carry, xs):
        d_q, d_kg, d_vg = carry
        read, owns = xs
        q_c = _slice(q, read, chunk)
        scores = _dot("bhnd,bhgd->bhng", q_c, k_g) * scale
        mask = _keys_mask(read, chunk, positions, used, causal)
        # Rows owned by the chunk before count there only.
        mask = mask & (read + jnp.arange(chunk) >= owns)[None, None, :, None]
        # where, not a product: a masked score may overflow exp, and an empty row's lse is MASK_VALUE.
        probs = jnp.where(mask, jnp.exp(scores - _slice(part.lse, read, chunk)[..., None]), 0.0)
        d_out_c = _slice(d_out, read, chunk).astype(v_g.dtype)
        d_probs = _dot("bhnd,bhgd->bhng", d_out_c, v_g)
        # d lse / d score = prob, so the lse's cotangent joins the row term.
        row_term = _slice(d_lse - delta, read, chunk)[..., None]
        d_scores = probs * (d_probs + row_term) * scale
        d_vg = d_vg + _dot("bhng,bhnd->bhgd", probs.astype(v_g.dtype), d_out_c)
        d_kg = d_kg + _dot("bhng,bhnd->bhgd", d_scores.astype(q.dtype), q_c)
        d_q_c = _dot("bhng,bhgd->bhnd", d_scores.astype(k_g.dtype), k_g)
        return (_add_at(d_q, d_q_c, read), d_kg, d_vg), None

    zeros = (jnp.zeros_like(q), jnp.zeros_like(k_g, jnp.float32), jnp.zeros_like(v_g, jnp.float32))
    (d_q, d_kg, d_vg), _ = jax.lax.scan(step, zeros, _chunk_starts(q.shape[2], chunk))
    return d_q, d_kg.astype(k_g.dtype), d_vg.astype(v_g.dtype), None, None


_keys_chunked.defvjp(_keys_chunked_fwd, _keys_chunked_bwd)


def _to_global_keys(q, k, v, positions, used, causal, scale) -> PartialAttention:
    """Every query against the global keys (the part of its key set outside the band).

    Queries go in chunks of `chunk_length`, with a backward by chunk too, so no
    `[seq, slots]` array is whole.
    """
    gather = lambda x: jnp.take_along_axis(x, positions[:, None, :, None], axis=2)
    return to_gathered_keys(q, gather(k), gather(v), positions, used, causal=causal, scale=scale)


def to_gathered_keys(q, k_g, v_g, positions, used, *, causal: bool, scale: float) -> PartialAttention:
    """Every query against global keys already gathered into slots.

    Args:
      q: `[batch, heads, rows, head_dim]`, row i at position i.
      k_g, v_g: `[batch, heads, slots, head_dim]`.
      positions: int32 `[batch, slots]`, the slots' positions in q's row numbering (for the causal
        mask; they may lie outside `[0, rows)`, as a sequence shard's do).
      used: bool `[batch, slots]`.

    Returns:
      float32 out `[batch, heads, rows, head_dim]` and lse `[batch, heads, rows]`, with queries in
      chunks of `chunk_length` (and a backward by chunk) past one chunk. Under `shard_map` the
      inputs must all be per-shard values (`lax.pcast(..., to='varying')`): the chunked pass's
      custom gradient returns per-shard cotangents.
    """
    chunk = chunk_length(q.shape[2], positions.shape[1])
    if chunk >= q.shape[2]:
        return _keys_dense(q, 0, k_g, v_g, positions, used, causal, scale)
    return PartialAttention(*_keys_chunked(q, k_g, v_g, positions, used, causal, float(scale), chunk))


# The global queries against every key.


def _rows_mask(key_valid, first_key, owns, positions, used, causal):
    """bool `[batch, 1, slots, keys]`: the keys from `first_key` on that the global queries attend.

    key_valid: bool `[batch, keys]`; keys before `owns` belong to another chunk;
    positions, used: the queries' slots `[batch, slots]`.
    """
    keys = first_key + jnp.arange(key_valid.shape[1])
    mask = used[:, None, :, None] & (key_valid & (keys >= owns))[:, None, None, :]
    if causal:
        mask = mask & (keys[None, None, None, :] <= positions[:, None, :, None])
    return mask


def _rows_dense(q_sel, k_keys, v_keys, key_valid, first_key, owns, positions, used, causal, scale):
    """The global queries `q_sel` `[batch, heads, slots, head_dim]` against one run of keys."""
    scores = _dot("bhgd,bhnd->bhgn", q_sel, k_keys)
    mask = _rows_mask(key_valid, first_key, owns, positions, used, causal)
    probs, lse = partial_softmax.masked_softmax(scores * scale, mask)
    out = _dot("bhgn,bhnd->bhgd", probs.astype(v_keys.dtype), v_keys)
    return PartialAttention(out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _rows_chunked(q_sel, k, v, key_valid, positions, used, causal, scale, chunk):
    """`_rows_dense` over every key, keys in chunks merged by log-sum-exp: float32 (out, lse)."""
    return _rows_chunked_fwd(q_sel, k, v, key_valid, positions, used, causal, scale, chunk)[0]


def _rows_chunked_fwd(q_sel, k, v, key_valid, positions, used, causal, scale, chunk):
    def step(part, xs):
        read, owns = xs
        chunk_part = _rows_dense(
            q_sel, _slice(k, read, chunk), _slice(v, read, chunk), _slice(key_valid, read, chunk, 1),
            read, owns, positions, used, causal, scale,
        )
        return partial_softmax.merge(part, chunk_part), None

    empty = PartialAttention(
        jnp.zeros_like(q_sel, jnp.float32), jnp.full_like(q_sel, MASK_VALUE, jnp.float32, shape=q_sel.shape[:3])
    )
    part, _ = jax.lax.scan(step, empty, _chunk_starts(k.shape[2], chunk))
    return part, (q_sel, k, v, key_valid, positions, used, part)


def _rows_chunked_bwd(causal, scale, chunk, residuals, d_part):
    """By key chunk, probabilities recomputed from the saved lse (FlashAttention's backward)."""
    q_sel, k, v, key_valid, positions, used, part = residuals
    d_out, d_lse = d_part
    # The softmax backward's row term, sum_j p_j dp_j = d_out . out; d lse / d score = prob, so
    # the lse's cotangent joins it.
    row_term = d_lse[..., None] - jnp.sum(d_out * part.out, axis=-1, keepdims=True)
    d_out = d_out.astype(v.dtype)

    def step(carry, xs):
        d_q, d_k, d_v = carry
        read, owns = xs
        k_c, v_c = _slice(k, read, chunk), _slice(v, read, chunk)
        scores = _dot("bhgd,bhnd->bhgn", q_sel, k_c) * scale
        mask = _rows_mask(_slice(key_valid, read, chunk, 1), read, owns, positions, used, causal)
        # where, not a product: a masked score may overflow exp, and an empty row's lse is MASK_VALUE.
        probs = jnp.where(mask, jnp.exp(scores - part.lse[..., None]), 0.0)
        d_probs = _dot("bhgd,bhnd->bhgn", d_out, v_c)
        d_scores = probs * (d_probs + row_term) * scale
        d_q = d_q + _dot("bhgn,bhnd->bhgd", d_scores.astype(k.dtype), k_c)
        d_k_c = _dot("bhgn,bhgd->bhnd", d_scores.astype(q_sel.dtype), q_sel)
        d_v_c = _dot("bhgn,bhgd->bhnd", probs.astype(v.dtype), d_out)
        return (d_q, _add_at(d_k, d_k_c, read), _add_at(d_v, d_v_c, read)), None

    zeros = (jnp.zeros_like(q_sel, jnp.float32), jnp.zeros_like(k), jnp.zeros_like(v))
    (d_q, d_k, d_v), _ = jax.lax.scan(step, zeros, _chunk_starts(k.shape[2], chunk))
    return d_q.astype(q_sel.dtype), d_k, d_v, None, None, None


_rows_chunked.defvjp(_rows_chunked_fwd, _rows_chunked_bwd)


def _from_global_queries(q, k, v, key_valid, positions, used, causal, scale):
    """Global queries against every key: `[batch, heads, slots, head_dim]`, normalised."""
    q_sel = jnp.take_along_axis(q, positions[:, None, :, None], axis=2)
    return from_gathered_queries(q_sel, k, v, key_valid, positions, used, causal=causal, scale=scale).out


def from_gathered_queries(q_sel, k, v, key_valid, positions, used, *, causal: bool, scale: float):
    """Global queries already gathered into slots against every key `key_valid` allows.

    Args:
      q_sel: `[batch, heads, slots, head_dim]`.
      k, v: `[batch, heads, keys, head_dim]`, key j at position j.
      key_valid: bool `[batch, keys]`, or None for every key.
      positions: int32 `[batch, slots]`, the queries' positions in the keys' numbering (for the
        causal mask; they may lie outside `[0, keys)`, as a sequence shard's do).
      used: bool `[batch, slots]`.

    Returns:
      float32 out `[batch, heads, slots, head_dim]` and lse `[batch, heads, slots]`. Keys go in
      chunks of `chunk_length`, merged by log-sum-exp, with a backward by chunk too, so no
      `[slots, seq]` array is whole. Under `shard_map` the inputs must all be per-shard values,
      as for `to_gathered_keys`.
    """
    n = k.shape[2]
    key_valid = jnp.ones((k.shape[0], n), bool) if key_valid is None else key_valid
    chunk = chunk_length(n, positions.shape[1])
    if chunk >= n:
        return _rows_dense(q_sel, k, v, key_valid, 0, 0, positions, used, causal, scale)
    return PartialAttention(*_rows_chunked(q_sel, k, v, key_valid, positions, used, causal, float(scale), chunk))


def add_global_tokens(
    part: PartialAttention, q, k, v, *, global_mask, global_qkv, padding_mask, max_global_tokens,
    causal: bool, scale: float,
):
    """Completes a sparse partial attention with the global tokens.

    Args:
      part: the sparse part, computed without the global keys.
      q, k, v: `[batch, heads, seq, head_dim]`.
      global_mask, padding_mask: bool `[batch, seq]` (padding_mask may be None).
      global_qkv: None or `(q_g, k_g, v_g)` in q's layout, used by global queries.
      max_global_tokens: the static number of global slots.

    Returns:
      float32 `[batch, heads, seq, head_dim]`.
    """
    is_global = global_mask if padding_mask is None else global_mask & padding_mask
    positions, used, overflow = global_slots(is_global, max_global_tokens)
    out = partial_softmax.merge(part, _to_global_keys(q, k, v, positions, used, causal, scale)).out
    gq, gk, gv = (q, k, v) if global_qkv is None else global_qkv
    global_out = _from_global_queries(gq, gk, gv, padding_mask, positions, used, causal, scale)
    out = set_rows(out, positions, used, global_out)
    return jnp.where(overflow[:, None, None, None], jnp.nan, out)


def set_rows(out, positions, keep, rows):
    """`out` `[batch, heads, seq, head_dim]` with `rows` `[batch, heads, slots, head_dim]` written at
    `positions` `[batch, slots]` where `keep` (bool, same shape); other slots write nothing."""
    target = jnp.where(keep, positions, out.shape[2])  # out of bounds: dropped
    return jax.vmap(lambda o, t, g: o.at[:, t].set(g, mode="drop"))(out, target, rows)


def to_keys_at(q, k, v, positions, key_valid, *, causal: bool, scale: float) -> PartialAttention:
    """Every query against the keys at static `positions` that `key_valid` allows.

    Args:
      q, k, v: `[batch, heads, seq, head_dim]`.
      positions: int NumPy `[g]`, distinct positions, the same for every row.
      key_valid: bool `[batch, seq]`.

    Returns:
      float32 out `[batch, heads, seq, head_dim]` and lse `[batch, heads, seq]`.
    """
    positions = np.asarray(positions, np.int32)
    slots = jnp.broadcast_to(jnp.asarray(positions), (q.shape[0], len(positions)))
    return _to_global_keys(q, k, v, slots, key_valid[:, positions], causal, scale)


def from_queries_at(q, k, v, positions, key_valid, *, causal: bool, scale: float):
    """The queries at static `positions` against every key `key_valid` allows (None: every key).

    Returns:
      float32 `[batch, heads, g, head_dim]`, normalised, for `positions` int NumPy `[g]`.
    """
    positions = np.asarray(positions, np.int32)
    slots = jnp.broadcast_to(jnp.asarray(positions), (q.shape[0], len(positions)))
    return _from_global_queries(q, k, v, key_valid, slots, jnp.ones(slots.shape, bool), causal, scale)


def finish(out, padding_mask, dtype):
    """Zeroes padded query rows of a `[batch, seq, heads, head_dim]` output and casts it."""
    if padding_mask is not None:
        out = jnp.where(padding_mask[:, :, None, None], out, 0.0)
    return out.astype(dtype)


def resolve_max_global_tokens(global_mask, padding_mask, max_global_tokens):
    """The static number of global slots: given, or counted from a concrete mask."""
    if max_global_tokens is not None:
        return max_global_tokens
    try:
        is_global = np.asarray(global_mask)
        if padding_mask is not None:
            is_global = is_global & np.asarray(padding_mask)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(
            "max_global_tokens must be given when global_mask is traced (under jit or vmap): "
            "it fixes the shape of the global-token passes"
        ) from e
    return max(1, int(is_global.sum(axis=-1).max()))
