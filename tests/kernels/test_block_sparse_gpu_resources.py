"""The block-sparse Triton kernels fit an H100 at a head_dim that is not a power of two, and with chosen blocks.

As `test_gpu_resources.py` (which covers the ops at head_dim 64 and 128 with
their default window): the gradient program is exported for CUDA and each
Triton kernel compiled for sm_90 with the pinned `triton` and `ptxas -v`.
Here head_dim 96, whose q, k, v stay 96 wide in HBM while the kernels' tiles
are 128 wide and masked, for the wide band of the shared cases and for a
narrow band whose blocks the cost model shrinks (`block_sparse_tuning`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from kernels_pallas.gpu_resources import TRITON_CALL
from longjax.attention import sliding_window_attention
from tests.kernels import gpu_cases

pytest.importorskip("triton", reason="needs the pinned triton of the gpu-check extra")

HEAD_DIM = 96


def _narrow_band_gradient(dtype) -> str:
    """The CUDA export of the gradient of a window-32 band (chosen blocks: see test_block_sparse_tuning)."""
    x = jax.ShapeDtypeStruct((1, gpu_cases.SEQ, gpu_cases.HEADS, HEAD_DIM), dtype)
    mask = jax.ShapeDtypeStruct((1, gpu_cases.SEQ), jnp.bool_)

    def loss(q, k, v, padding_mask):
        out = sliding_window_attention(q, k, v, window=32, padding_mask=padding_mask, impl="pallas", interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    with gpu_cases.target_gpu():
        exported = export.export(
            jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(x, x, x, mask)
    return exported.mlir_module()


@pytest.mark.parametrize("case", ["band-bf16", "narrow_band-f32"])
def test_head_dim_96_fits_hopper(case):
    if case == "band-bf16":
        text = gpu_cases.exported_gradient("band", "bf16", HEAD_DIM)
    else:
        text = _narrow_band_gradient(jnp.float32)
    kernels = gpu_cases.export_kernels(text)
    # The head is not padded in HBM: every array the program holds is 96 wide, none 128.
    heads = gpu_cases.HEADS
    assert f"x{heads}x{HEAD_DIM}x" in text and f"x{heads}x128x" not in text
    names = {kernel.name for kernel in kernels}
    report = gpu_cases.hopper_problems(kernels)
    assert {"block_sparse_flash_fwd", "block_sparse_flash_dq", "block_sparse_flash_dkv"} <= names, names
    assert not report, "\n".join(report)
