"""Pallas kernels for longjax's attention patterns, one family per module.

Each family follows the anatomy in shared/STYLE.md: a frozen block-size
dataclass per backend, a validating public wrapper, a `jax.custom_vjp` wiring
forward and backward, the `pallas_call` builders, and `interpret=` threaded
through so the kernels run on CPU in tests.
"""
