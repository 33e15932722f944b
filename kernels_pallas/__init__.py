"""Pallas kernels for longjax's attention patterns, one family per module.

Each family follows the anatomy in shared/STYLE.md: a frozen block-size
dataclass per backend, a public wrapper that checks what the kernels impose
and fills defaults, a `jax.custom_vjp` wiring forward and backward, the
`pallas_call` builders, and `interpret=` threaded through so the kernels run
on CPU in tests.

A leaf package: it imports JAX, NumPy and its own modules, nothing of longjax.
The kernels take their own input types (the block-sparse kernels a
`block_layout.BlockLayout`, through the small `block_sparse_flash.Pattern`
protocol); `longjax.attention` turns its patterns and arguments into them, and
imports the constants and helpers it shares with the kernels from `common`.
"""
