"""Small helpers shared by the Pallas kernel families."""

from __future__ import annotations

import jax


def round_up(x: int, m: int) -> int:
    """The smallest multiple of m that is >= x."""
    return -(-x // m) * m


def resolve_interpret(interpret: bool | None) -> bool:
    """None means interpret mode on a CPU backend and the compiled lowering elsewhere."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)
