"""Attention ops of longjax: `[batch, seq, heads, head_dim]` in, same shape out."""

from longjax.attention import arguments
from longjax.attention import masks
from longjax.attention import reference
from longjax.attention import relative
from longjax.attention.api import block_sparse_attention
from longjax.attention.api import favor_attention
from longjax.attention.api import sliding_window_attention
from longjax.attention.arguments import IMPLEMENTATIONS
from longjax.attention.arguments import Implementation
from longjax.attention.block_sparse import bigbird_random_layout
from longjax.attention.favor import favor_projection
from longjax.attention.reference import dense_attention
from longjax.attention.relative import RelativePositions

__all__ = [
    "IMPLEMENTATIONS",
    "Implementation",
    "RelativePositions",
    "arguments",
    "bigbird_random_layout",
    "block_sparse_attention",
    "dense_attention",
    "favor_attention",
    "favor_projection",
    "masks",
    "reference",
    "relative",
    "sliding_window_attention",
]
