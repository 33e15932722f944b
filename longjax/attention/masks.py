"""Exact boolean attention masks, written straight from each pattern's definition.

These are the oracle's masks: dense `[.., seq, seq]` arrays for tests,
benchmarks and debugging. They deliberately share no code with the fast
implementations, so a bug in a fast path cannot hide by being shared.
Every mask is True where a query (row) may attend a key (column).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def _relative_positions(seq_len: int):
    """`[seq, seq]` int32 array of key position minus query position."""
    pos = jnp.arange(seq_len, dtype=jnp.int32)
    return pos[None, :] - pos[:, None]


def causal_mask(seq_len: int):
    """`[seq, seq]`: key j allowed for query i when j <= i."""
    return _relative_positions(seq_len) <= 0


def dilated_window_mask(seq_len: int, *, left: int, right: int, dilation: int = 1):
    """`[seq, seq]`: query i attends key j when j - i = dilation * t, t in [-left, right]."""
    rel = _relative_positions(seq_len)
    return (rel % dilation == 0) & (rel >= -left * dilation) & (rel <= right * dilation)


def padding_key_mask(padding_mask):
    """`[batch, 1, 1, seq]`: padded keys (padding_mask False) are never attended."""
    return padding_mask[:, None, None, :]


def padding_query_mask(padding_mask):
    """`[batch, 1, seq, 1]`: padded queries attend nothing."""
    return padding_mask[:, None, :, None]


def sliding_window_mask(
    seq_len: int,
    *,
    left: int,
    right: int,
    dilation: Sequence[int],
    causal: bool = False,
    global_mask=None,
    padding_mask=None,
):
    """The full Longformer pattern as a dense mask.

    Args:
      seq_len: sequence length.
      left, right: window extent on each side, in dilated steps.
      dilation: one dilation per head.
      causal: exclude every key after the query, global keys included.
      global_mask: optional bool `[batch, seq]`; a global query attends every key,
        every query attends the global keys.
      padding_mask: optional bool `[batch, seq]`, True for real tokens.

    Returns:
      bool `[batch or 1, heads, seq, seq]`.
    """
    local = jnp.stack(
        [dilated_window_mask(seq_len, left=left, right=right, dilation=d) for d in dilation]
    )[None]
    return _with_globals_causal_padding(local, seq_len, causal, global_mask, padding_mask)


def _with_globals_causal_padding(mask, seq_len, causal, global_mask, padding_mask):
    """Adds token-level globals to a `[.., heads, seq, seq]` pattern, then applies causal and padding.

    Global tokens see, and are seen by, every key; causal and padding then remove
    keys, globals included.
    """
    if global_mask is not None:
        mask = mask | global_mask[:, None, :, None] | global_mask[:, None, None, :]
    if causal:
        mask = mask & causal_mask(seq_len)
    if padding_mask is not None:
        mask = mask & padding_key_mask(padding_mask) & padding_query_mask(padding_mask)
    return mask


def block_sparse_mask(
    seq_len: int,
    *,
    block_size: int,
    window_radius: int,
    global_blocks: Sequence[int],
    random_layout,
    causal: bool = False,
    global_mask=None,
    padding_mask=None,
):
    """The full BigBird pattern as a dense mask.

    Query block a of head h sees every block if a is global; otherwise the
    blocks within `window_radius` of a, the global blocks and the blocks listed
    in `random_layout[h, a]` (-1 = none). Token-level `global_mask` tokens see
    and are seen by everything; then causal and padding apply.

    Args:
      seq_len: sequence length; blocks are `ceil(seq_len / block_size)`.
      global_blocks: block indices, negative ones counted from the end.
      random_layout: int `[heads, blocks, r]`.

    Returns:
      bool `[batch or 1, heads, seq, seq]`.
    """
    layout = np.asarray(random_layout)
    heads, num_blocks = layout.shape[:2]
    globals_ = {g % num_blocks for g in global_blocks}
    allowed = np.zeros((heads, num_blocks, num_blocks), bool)
    for h in range(heads):
        for a in range(num_blocks):
            for b in range(num_blocks):
                allowed[h, a, b] = (
                    a in globals_
                    or b in globals_
                    or abs(a - b) <= window_radius
                    or b in set(layout[h, a].tolist())
                )
    token_block = np.arange(seq_len) // block_size
    mask = jnp.asarray(allowed[:, token_block][:, :, token_block])[None]
    return _with_globals_causal_padding(mask, seq_len, causal, global_mask, padding_mask)
