"""The rules of the attention ops' arguments, stated once.

Each public op checks its inputs here once, before dispatch, so every
implementation sees the same normalised options and every bad input gets the
same error naming the argument. The option rules take the name to report:
the ops pass the argument's name, and `longjax.models.config` passes the
config path of the value (`model.attention.window`, ...), so a model config
is held to the very rules of the op it configures, when it is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.common import is_int
from longjax.attention.specs import SlidingWindowSpec

Implementation = Literal["xla", "pallas", "reference"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "pallas", "reference")
FEATURE_MAPS: tuple[str, ...] = ("softmax", "relu")


def _is_int_sequence(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and all(is_int(v) for v in x)


# --- option rules, shared with the model config ---------------------------------------------------


def check_impl(impl, *, name: str = "impl") -> None:
    if impl is not None and impl not in IMPLEMENTATIONS:
        raise ValueError(f"{name} must be None or one of {IMPLEMENTATIONS}, got {impl!r}")


def check_bool(value, *, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_int(value, *, name: str, minimum: int = 1, optional: bool = False) -> None:
    """An int (not a bool) >= minimum; also None when optional."""
    if value is None and optional:
        return
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


def check_window(window, *, causal: bool = False, name: str = "window") -> tuple[int, int]:
    """`window` (w keys each side, or `(left, right)`) as (left, right); causal takes no right side."""
    allowed = "an int >= 0 or a (left, right) pair of ints >= 0"
    if is_int(window):
        left, right = int(window), 0 if causal else int(window)
    elif _is_int_sequence(window) and len(window) == 2:
        left, right = int(window[0]), int(window[1])
        if causal and right != 0:
            raise ValueError(f"{name}=(left, right) must have right == 0 when causal=True, got {window!r}")
    else:
        raise ValueError(f"{name} must be {allowed}, got {window!r}")
    if left < 0 or right < 0:
        raise ValueError(f"{name} must be non-negative ({allowed}), got {window!r}")
    return left, right


def check_dilation(dilation, num_heads: int | None = None, *, name: str = "dilation") -> tuple[int, ...]:
    """One dilation per head (an int applies to every head); None num_heads skips the count."""
    allowed = "an int >= 1 or one int >= 1 per head"
    if is_int(dilation):
        dilations = (int(dilation),) * (1 if num_heads is None else num_heads)
    elif _is_int_sequence(dilation):
        dilations = tuple(int(d) for d in dilation)
        if num_heads is not None and len(dilations) != num_heads:
            raise ValueError(
                f"{name} must be an int or one int per head, with one entry per head ({num_heads}); "
                f"got {len(dilations)}: {tuple(dilation)!r}"
            )
    else:
        raise ValueError(f"{name} must be {allowed}, got {dilation!r}")
    if any(d < 1 for d in dilations):
        raise ValueError(f"{name} must be >= 1 ({allowed}), got {dilation!r}")
    return dilations


def check_max_global_tokens(max_global_tokens, seq: int | None = None, *, name: str = "max_global_tokens") -> None:
    """None or an int >= 1; at most seq when the sequence length is known (op time)."""
    check_int(max_global_tokens, name=name, optional=True)
    if seq is not None and max_global_tokens is not None and max_global_tokens > seq:
        raise ValueError(f"{name} must be in [1, seq={seq}], got {max_global_tokens}")


def check_num_window_blocks(num_window_blocks, *, name: str = "num_window_blocks") -> None:
    if not is_int(num_window_blocks) or num_window_blocks < 1 or num_window_blocks % 2 == 0:
        raise ValueError(f"{name} must be a positive odd int (2s + 1), got {num_window_blocks!r}")


def check_global_blocks(global_blocks, *, name: str = "global_blocks") -> None:
    """A sequence of block indices; their range needs the number of blocks (`normalize_global_blocks`)."""
    if not _is_int_sequence(global_blocks):
        raise ValueError(
            f"{name} must be a sequence of ints (block indices, negative from the end), got {global_blocks!r}"
        )


def check_feature_map(feature_map, *, name: str = "feature_map") -> None:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"{name} must be one of {FEATURE_MAPS}, got {feature_map!r}")


# --- the ops' arguments -------------------------------------------------------------------------


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


def parse_sliding_window(window, dilation, causal, num_heads: int) -> SlidingWindowSpec:
    """Normalises `window`, `dilation` and `causal` into a `SlidingWindowSpec`."""
    left, right = check_window(window, causal=causal)
    dilations = check_dilation(dilation, num_heads)
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


def check_kernel_options(interpret, block_sizes) -> None:
    """The options of Pallas implementations: interpret is None or a bool; block_sizes
    None or a block-size dataclass instance, whose type and fields its kernel family checks."""
    if interpret is not None and not isinstance(interpret, (bool, np.bool_)):
        raise ValueError(f"interpret must be None, True or False, got {interpret!r}")
    if block_sizes is not None and (
        not dataclasses.is_dataclass(block_sizes) or isinstance(block_sizes, type)
    ):
        raise ValueError(
            f"block_sizes must be None or a kernel family's block-size dataclass instance, got {block_sizes!r}"
        )


def normalize_global_blocks(global_blocks, num_blocks: int) -> tuple[int, ...]:
    """Sorted distinct block indices; negative ones count from the end."""
    check_global_blocks(global_blocks)
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


def check_favor(projection, feature_map, chunk_size, num_heads: int, head_dim: int) -> None:
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
    check_feature_map(feature_map)
    check_int(chunk_size, name="chunk_size", optional=True)
