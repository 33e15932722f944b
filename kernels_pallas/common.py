"""Constants and small helpers shared by the Pallas kernel families.

`longjax.attention`'s XLA implementations compute the same quantities, so they
import the constants and helpers they share with the kernels from here: the
kernels import nothing of longjax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The score of a key that is not attended, and the log-sum-exp of a row that
# attends nothing: finite, so that a fully masked row gives exp(0) (then
# zeroed) instead of exp(-inf - -inf) = NaN.
MASK_VALUE = -1e30

# Added to every FAVOR+ ReLU feature (Performer's generalised-kernel
# stabiliser), so a row whose projections are all negative still has a
# positive normaliser.
RELU_EPSILON = 1e-3


def is_int(x) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def round_up(x: int, m: int) -> int:
    """The smallest multiple of m that is >= x."""
    return -(-x // m) * m


def next_power_of_two(x: int) -> int:
    """The smallest power of two that is >= x (1 for x <= 1)."""
    return 1 << max(0, (x - 1).bit_length())


def resolve_interpret(interpret: bool | None) -> bool:
    """None means interpret mode on a CPU backend and the compiled lowering elsewhere."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def backward_row_terms(out, lse, d_out, d_lse):
    """Per-row quantities of a flash-attention backward pass: (row_term, lse with empty rows at +1e30).

    `d s_j = p_j (dp_j + row_term)` with `row_term = d_lse - sum(d_out * out)`:
    d lse / d s_j = p_j, so the lse cotangent enters beside flash attention's
    usual rowsum. Rows that attended nothing get lse = +1e30, so that
    exp(score - lse) is 0 for every key without masking each weight.

    Args:
      out: float32 `[..., rows, head_dim]`, the normalised forward output.
      lse: float32 `[..., rows]`, its log-sum-exp (`MASK_VALUE` for empty rows).
      d_out, d_lse: their cotangents, shaped like out and lse.
    """
    row_term = d_lse.astype(jnp.float32) - jnp.sum(d_out.astype(jnp.float32) * out, axis=-1)
    return row_term, jnp.where(lse > MASK_VALUE / 2, lse, -MASK_VALUE)
