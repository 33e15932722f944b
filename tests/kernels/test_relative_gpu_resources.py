"""The Triton kernels with a score bias (Transformer-XL relative positions) fit an H100.

As `test_gpu_resources.py`: the gradient programs of `sliding_window_attention`
(a banded bias) and `block_sparse_attention` (BigBird, a per-visit bias) with
`relative=` (wrt q, k, v, the position queries and the offset embeddings) are
exported for CUDA and each Triton kernel compiled for sm_90 with the pinned
`triton` and `ptxas -v`: shared memory within Hopper's 232,448 B per block, no
spills, matmuls on the tensor cores. The bias tiles are gathered with
integer-array loads and the dq kernel scatters their gradients, so these are
kernels of their own (`block_sparse_flash_bias_*`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from kernels_pallas.block_sparse_flash import GpuBlockSizes
from kernels_pallas.gpu_resources import TRITON_CALL
from longjax.attention import block_sparse_attention, sliding_window_attention
from longjax.attention.relative import RelativePositions
from tests.kernels import gpu_cases

pytest.importorskip("triton", reason="needs the pinned triton of the gpu-check extra")

WINDOW = 256


def _relative_gradient(dtype, head_dim: int, dilation) -> str:
    """The CUDA export of a relative-position gradient: a band with `dilation`, or BigBird (None)."""
    x = jax.ShapeDtypeStruct((1, gpu_cases.SEQ, gpu_cases.HEADS, head_dim), dtype)
    # BigBird's random blocks reach any offset: its table covers the sequence.
    reach = gpu_cases.SEQ - 1 if dilation is None else max(dilation) * WINDOW
    table = jax.ShapeDtypeStruct((2 * reach + 1, gpu_cases.HEADS, head_dim), dtype)
    mask = jax.ShapeDtypeStruct((1, gpu_cases.SEQ), jnp.bool_)
    # block_sizes=None on a CPU host would trace the Mosaic lowering too, which refuses the bias.
    options = dict(impl="pallas", interpret=False, block_sizes=GpuBlockSizes())

    def loss(q, k, v, queries, embeddings, padding_mask):
        relative = RelativePositions(queries, embeddings)
        if dilation is None:
            out = block_sparse_attention(
                q, k, v, block_size=64, causal=True, padding_mask=padding_mask, relative=relative, **options
            )
        else:
            out = sliding_window_attention(
                q, k, v, window=WINDOW, dilation=dilation, causal=len(set(dilation)) > 1,
                padding_mask=padding_mask, relative=relative, **options,
            )
        return jnp.sum(out.astype(jnp.float32))

    with gpu_cases.target_gpu():
        exported = export.export(
            jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))), platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(x, x, x, x, table, mask)
    return exported.mlir_module()


@pytest.mark.parametrize(
    "dtype,head_dim,dilation",
    [
        pytest.param(jnp.bfloat16, 64, (1, 1, 1, 1), id="bf16-d64"),
        pytest.param(jnp.float32, 128, (1, 1, 2, 2), id="f32-d128-dilated"),
        pytest.param(jnp.float32, 64, None, id="bigbird-f32-d64"),
    ],
)
def test_relative_kernels_fit_hopper(dtype, head_dim, dilation):
    text = _relative_gradient(dtype, head_dim, dilation)
    kernels = gpu_cases.export_kernels(text)
    names = {kernel.name for kernel in kernels}
    report = gpu_cases.hopper_problems(kernels)
    assert {"block_sparse_flash_bias_fwd", "block_sparse_flash_bias_dq", "block_sparse_flash_bias_dkv"} <= names, names
    assert not report, "\n".join(report)
