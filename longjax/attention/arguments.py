"""Validation of attention-op arguments, shared by every implementation.

Each public op checks its inputs here once, before dispatch, so every
implementation sees the same normalised options and every bad input gets the
same error naming the argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_qkv(q, k, v) -> None:
    """Checks that q, k, v are `[batch, seq, heads, head_dim]` of one shape and dtype."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{name} must have shape [batch, seq, heads, head_dim], got shape "
                f"{getattr(x, 'shape', None)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must have the same shape, got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k and v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )


def check_token_mask(name: str, mask, batch: int, seq: int) -> None:
    """Checks a per-token boolean mask of shape `[batch, seq]`."""
    if mask is None:
        return
    shape = getattr(mask, "shape", None)
    if shape != (batch, seq):
        raise ValueError(f"{name} must have shape [batch, seq] = {(batch, seq)}, got {shape}")
    if mask.dtype != jnp.bool_:
        raise ValueError(f"{name} must be a boolean array, got dtype {mask.dtype}")


def check_scale(scale) -> None:
    """scale is static (a Python or NumPy number): the kernels specialise on it."""
    if scale is None:
        return
    if (
        not isinstance(scale, (int, float, np.floating, np.integer))
        or isinstance(scale, bool)
        or not np.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"scale must be a positive finite Python number or None, got {scale!r}")


@dataclasses.dataclass(frozen=True)
class SlidingWindowSpec:
    """The static description of a Longformer pattern, after validation.

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


def parse_sliding_window(window, dilation, causal, num_heads: int) -> SlidingWindowSpec:
    """Normalises `window`, `dilation` and `causal` into a `SlidingWindowSpec`."""
    if isinstance(window, (bool, np.bool_)):
        raise ValueError(f"window must be an int or a (left, right) tuple, got {window!r}")
    if isinstance(window, (int, np.integer)):
        left, right = int(window), int(window)
        if causal:
            right = 0
    elif isinstance(window, Sequence) and len(window) == 2 and all(
        isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in window
    ):
        left, right = int(window[0]), int(window[1])
        if causal and right != 0:
            raise ValueError(
                f"window=(left, right) must have right == 0 when causal=True, got {window!r}"
            )
    else:
        raise ValueError(f"window must be an int or a (left, right) tuple of ints, got {window!r}")
    if left < 0 or right < 0:
        raise ValueError(f"window must be non-negative, got {window!r}")

    if isinstance(dilation, (int, np.integer)) and not isinstance(dilation, bool):
        dilations = (int(dilation),) * num_heads
    elif isinstance(dilation, Sequence) and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dilation
    ):
        dilations = tuple(int(d) for d in dilation)
        if len(dilations) != num_heads:
            raise ValueError(
                f"dilation must have one entry per head ({num_heads}), got {len(dilations)}: "
                f"{tuple(dilation)!r}"
            )
    else:
        raise ValueError(f"dilation must be an int or a sequence of ints, got {dilation!r}")
    if any(d < 1 for d in dilations):
        raise ValueError(f"dilation must be >= 1, got {dilation!r}")
    return SlidingWindowSpec(left=left, right=right, dilation=dilations, causal=bool(causal))


def check_global_qkv(global_qkv, global_mask, q) -> None:
    """Checks Longformer's separate global projections against q."""
    if global_qkv is None:
        return
    if global_mask is None:
        raise ValueError("global_qkv was given without global_mask; global_mask says which tokens are global")
    if not isinstance(global_qkv, (tuple, list)) or len(global_qkv) != 3:
        raise ValueError("global_qkv must be a tuple (q_g, k_g, v_g)")
    for name, x in zip(("q_g", "k_g", "v_g"), global_qkv):
        if getattr(x, "shape", None) != q.shape or x.dtype != q.dtype:
            raise ValueError(
                f"global_qkv {name} must match q (shape {q.shape}, dtype {q.dtype}), got "
                f"shape {getattr(x, 'shape', None)}, dtype {getattr(x, 'dtype', None)}"
            )


def check_max_global_tokens(max_global_tokens, seq: int) -> None:
    if max_global_tokens is None:
        return
    if not isinstance(max_global_tokens, (int, np.integer)) or isinstance(max_global_tokens, bool):
        raise ValueError(f"max_global_tokens must be an int or None, got {max_global_tokens!r}")
    if not 1 <= max_global_tokens <= seq:
        raise ValueError(f"max_global_tokens must be in [1, seq={seq}], got {max_global_tokens}")


def check_block_size(block_size) -> None:
    if block_size is None:
        return
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")


def check_kernel_options(interpret, block_sizes) -> None:
    """The options of Pallas implementations: interpret is None or a bool; block_sizes
    None or a block-size dataclass instance, whose fields its kernel family validates."""
    if interpret is not None and not isinstance(interpret, (bool, np.bool_)):
        raise ValueError(f"interpret must be None, True or False, got {interpret!r}")
    if block_sizes is not None and (
        not dataclasses.is_dataclass(block_sizes) or isinstance(block_sizes, type)
    ):
        raise ValueError(
            f"block_sizes must be None or a kernel family's block-size dataclass instance, got {block_sizes!r}"
        )


def is_int(x) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class BlockSparseSpec:
    """The static description of a BigBird pattern, after validation.

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


def check_block_sparse_shape(block_size, num_window_blocks, num_random_blocks) -> None:
    if not is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not is_int(num_window_blocks) or num_window_blocks < 1 or num_window_blocks % 2 == 0:
        raise ValueError(
            f"num_window_blocks must be a positive odd int (2s + 1), got {num_window_blocks!r}"
        )
    if not is_int(num_random_blocks) or num_random_blocks < 0:
        raise ValueError(f"num_random_blocks must be an int >= 0, got {num_random_blocks!r}")


def normalize_global_blocks(global_blocks, num_blocks: int) -> tuple[int, ...]:
    """Sorted distinct block indices; negative ones count from the end."""
    if not isinstance(global_blocks, Sequence) or not all(is_int(g) for g in global_blocks):
        raise ValueError(f"global_blocks must be a sequence of ints, got {global_blocks!r}")
    for g in global_blocks:
        if not -num_blocks <= g < num_blocks:
            raise ValueError(
                f"global_blocks entry {g} is out of range for {num_blocks} blocks "
                f"(valid: {-num_blocks} .. {num_blocks - 1})"
            )
    return tuple(sorted({int(g) % num_blocks for g in global_blocks}))


def check_random_layout(random_layout, num_heads: int, num_blocks: int, num_random_blocks: int) -> np.ndarray:
    """The layout as int32 numpy, checked for shape and range; it must be concrete."""
    try:
        layout = np.asarray(random_layout)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError("random_layout must be concrete (a NumPy array), not traced") from e
    expected = (num_heads, num_blocks, num_random_blocks)
    if layout.shape != expected:
        raise ValueError(
            f"random_layout must have shape [heads, blocks, num_random_blocks] = {expected}, got {layout.shape}"
        )
    if layout.size and not np.issubdtype(layout.dtype, np.integer):
        raise ValueError(f"random_layout must hold integers, got dtype {layout.dtype}")
    if layout.size and (layout.min() < -1 or layout.max() >= num_blocks):
        raise ValueError(
            f"random_layout entries must be block indices in [0, {num_blocks}) or -1, "
            f"got range [{layout.min()}, {layout.max()}]"
        )
    return layout.astype(np.int32)


def check_favor(projection, feature_map, chunk_size, num_heads: int, head_dim: int, feature_maps):
    """Validates FAVOR+ options; projection is `[features, head_dim]` or `[heads, features, head_dim]`."""
    shape = getattr(projection, "shape", None)
    if shape is None or len(shape) not in (2, 3):
        raise ValueError(
            f"projection must be [features, head_dim] or [heads, features, head_dim], got shape {shape}"
        )
    if shape[-1] != head_dim:
        raise ValueError(f"projection last dim must equal head_dim={head_dim}, got shape {shape}")
    if len(shape) == 3 and shape[0] != num_heads:
        raise ValueError(f"projection must have one entry per head ({num_heads}), got shape {shape}")
    if shape[-2] < 1:
        raise ValueError(f"projection must have at least one feature, got shape {shape}")
    if not jnp.issubdtype(projection.dtype, jnp.floating):
        raise ValueError(f"projection must be floating-point, got dtype {projection.dtype}")
    if feature_map not in feature_maps:
        raise ValueError(f"feature_map must be one of {feature_maps}, got {feature_map!r}")
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
