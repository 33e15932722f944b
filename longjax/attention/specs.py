"""The static descriptions of the sparse patterns, after validation.

The public ops (`api.py`) turn their arguments into these once, and every
implementation (XLA, Pallas, the dense reference) reads the pattern from
them. Both are frozen, hashable by content, and usable as cache keys
(`kernel_layouts` caches the kernels' block layouts per spec).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class SlidingWindowSpec:
    """A Longformer pattern.

    Attributes:
      left: keys attended before the query, counted in dilated steps.
      right: keys attended after the query, counted in dilated steps (0 when causal).
      dilation: one dilation per head.
      causal: whether keys after the query are excluded everywhere, globals included.
    """

    left: int
    right: int
    dilation: tuple[int, ...]
    causal: bool


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparseSpec:
    """A BigBird pattern.

    Equality and hashing are by content, the random layout by its shape and
    bytes: the spec keeps a read-only int32 copy of the layout it is given, so
    its hash cannot go stale.

    Attributes:
      block_size: tokens per block.
      num_blocks: blocks covering the sequence (the last one may be partial).
      window_radius: s, with num_window_blocks = 2s + 1.
      global_blocks: sorted, distinct, non-negative global block indices.
      random_layout: int32 `[heads, num_blocks, num_random_blocks]`, -1 = none.
      causal: no key after the query.
    """

    block_size: int
    num_blocks: int
    window_radius: int
    global_blocks: tuple[int, ...]
    random_layout: np.ndarray
    causal: bool

    def __post_init__(self):
        layout = np.array(self.random_layout, np.int32)  # a copy: the caller's array stays writable
        layout.setflags(write=False)
        object.__setattr__(self, "random_layout", layout)
        object.__setattr__(self, "global_blocks", tuple(int(g) for g in self.global_blocks))

    @functools.cached_property
    def _key(self) -> tuple:
        return (
            self.block_size, self.num_blocks, self.window_radius, self.global_blocks, self.causal,
            self.random_layout.shape, self.random_layout.tobytes(),
        )

    def __eq__(self, other):
        if not isinstance(other, BlockSparseSpec):
            return NotImplemented
        return self._key == other._key

    def __hash__(self):
        return hash(self._key)
