"""The programs whose Triton kernels must fit a Hopper GPU: every public op with `impl='pallas'`.

Shared by `test_gpu_resources.py` and `experiments/kernel_resources.py` (which prints the table).
Each case is a gradient program (value and gradients wrt q, k and v), so its
export holds the forward, dq and dk/dv kernels of the op.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax import export

from kernels_pallas import gpu_resources
from kernels_pallas.gpu_resources import TRITON_CALL
from kernels_pallas.block_sparse_flash import GpuBlockSizes
from longjax.attention import RelativePositions, block_sparse_attention, favor_attention, sliding_window_attention

SEQ, HEADS, FEATURES = 4096, 4, 256
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
HEAD_DIMS = (64, 128)


def block_sparse_ops(block_sizes=None):
    """The block-sparse public ops with `impl='pallas'`, as `(q, k, v, global_mask, padding_mask)`
    functions; block_sizes None: not passed at all, as a user exporting with the defaults would."""
    kernel = dict(impl="pallas", interpret=False)
    if block_sizes is not None:
        kernel["block_sizes"] = block_sizes
    return {
        "band": lambda q, k, v, g, p: sliding_window_attention(
            q, k, v, window=256, global_mask=g, padding_mask=p, max_global_tokens=8, **kernel
        ),
        "band_causal_dilated": lambda q, k, v, g, p: sliding_window_attention(
            q, k, v, window=256, dilation=(1, 1, 2, 2), causal=True, padding_mask=p, **kernel
        ),
        "bigbird": lambda q, k, v, g, p: block_sparse_attention(
            q, k, v, block_size=64, padding_mask=p, seed=0, **kernel
        ),
        "bigbird_causal_globals": lambda q, k, v, g, p: block_sparse_attention(
            q, k, v, block_size=64, causal=True, global_mask=g, max_global_tokens=8, seed=0, **kernel
        ),
    }


def _ops():
    """Every op as `(q, k, v, mask, projection)`: the mask is the padding and the global tokens."""
    kernel = dict(impl="pallas", interpret=False)
    ops = {
        name: (lambda fn: lambda q, k, v, m, w: fn(q, k, v, m, m))(fn) for name, fn in block_sparse_ops().items()
    }
    return ops | {
        "favor_causal": lambda q, k, v, m, w: favor_attention(
            q, k, v, projection=w, causal=True, padding_mask=m, **kernel
        ),
        "favor_bidirectional": lambda q, k, v, m, w: favor_attention(
            q, k, v, projection=w, padding_mask=m, **kernel
        ),
    }


OPS = tuple(_ops())

# Transformer-XL relative positions computed in the op (`relative=`): the Triton kernels' banded
# bias (window 256, per-head dilation or none) and BigBird's per-visit bias. None: BigBird.
RELATIVE_OPS = {"band_relative": (1, 1, 1, 1), "band_relative_dilated": (1, 1, 2, 2), "bigbird_relative": None}
RELATIVE_WINDOW = 256


def relative_gradient(op: str, dtype, head_dim: int) -> str:
    """The CUDA export of `value_and_grad` of a `RELATIVE_OPS` op wrt q, k, v, the position queries
    and the offset embeddings (the dilated band causal, the plain band not; BigBird causal)."""
    dilation = RELATIVE_OPS[op]
    dtype = DTYPES.get(dtype, dtype)
    x = jax.ShapeDtypeStruct((1, SEQ, HEADS, head_dim), dtype)
    # BigBird's random blocks reach any offset: its table covers the sequence.
    reach = SEQ - 1 if dilation is None else max(dilation) * RELATIVE_WINDOW
    table = jax.ShapeDtypeStruct((2 * reach + 1, HEADS, head_dim), dtype)
    mask = jax.ShapeDtypeStruct((1, SEQ), jnp.bool_)
    # The Triton kernels only: block_sizes=None on a CPU host would trace the Mosaic lowering too.
    options = dict(impl="pallas", interpret=False, block_sizes=GpuBlockSizes())

    def loss(q, k, v, queries, embeddings, padding_mask):
        relative = RelativePositions(queries, embeddings)
        if dilation is None:
            out = block_sparse_attention(
                q, k, v, block_size=64, causal=True, padding_mask=padding_mask, relative=relative, **options
            )
        else:
            out = sliding_window_attention(
                q, k, v, window=RELATIVE_WINDOW, dilation=dilation, causal=len(set(dilation)) > 1,
                padding_mask=padding_mask, relative=relative, **options,
            )
        return jnp.sum(out.astype(jnp.float32))

    with target_gpu():
        exported = export.export(
            jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))), platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(x, x, x, x, table, mask)
    return exported.mlir_module()


def target_gpu():
    """The abstract H100 a CUDA export names: from JAX 0.11 the Triton lowering asks for its target."""
    if not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def exported_gradient(op: str, dtype: str, head_dim: int) -> str:
    """The module text of `value_and_grad` of the op wrt q, k, v (and, for `RELATIVE_OPS`, the
    position queries and embeddings), exported for CUDA."""
    if op in RELATIVE_OPS:
        return relative_gradient(op, dtype, head_dim)
    fn = _ops()[op]
    x = jax.ShapeDtypeStruct((1, SEQ, HEADS, head_dim), DTYPES[dtype])
    mask = jax.ShapeDtypeStruct((1, SEQ), jnp.bool_)
    projection = jax.ShapeDtypeStruct((FEATURES, head_dim), jnp.float32)

    def loss(q, k, v, m, w):
        return jnp.sum(fn(q, k, v, m, w).astype(jnp.float32))

    program = jax.value_and_grad(loss, argnums=(0, 1, 2))
    with target_gpu():
        exported = export.export(
            jax.jit(program), platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
        )(x, x, x, mask, projection)
    return exported.mlir_module()


def export_kernels(module_text: str) -> list:
    """The distinct Triton kernels of a CUDA export; skips the calling test where it carries no Triton IR."""
    import pytest

    try:
        kernels = gpu_resources.triton_kernels(module_text)
    except (ValueError, ImportError) as e:
        # jaxlib >= 0.11 compiles Triton while lowering (a GPU is needed), and may not carry the
        # private Triton dialect bindings this reads with: no IR to check here.
        pytest.skip(f"no Triton IR in the CUDA export with jax {jax.__version__}: {e}")
    return list({kernel.ir: kernel for kernel in kernels}.values())


def hopper_problems(kernels) -> list[str]:
    """Each kernel compiled for sm_90: what does not fit (shared memory, spills), one line each.

    A matmul that misses the tensor cores fails the calling test at once.
    """
    report = []
    for kernel in kernels:
        resources = gpu_resources.compile_for_hopper(kernel)
        assert resources.tensor_core_dots > 0, f"{kernel.name}: no matmul reached the tensor cores"
        report += [f"{kernel.name} ({resources.programs} programs): {p}" for p in resources.problems()]
    return report
