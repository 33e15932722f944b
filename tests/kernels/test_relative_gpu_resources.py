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

import pytest

from tests.kernels import gpu_cases

pytest.importorskip("triton", reason="needs the pinned triton of the gpu-check extra")


@pytest.mark.parametrize(
    "op,dtype,head_dim",
    [
        pytest.param("band_relative", "bf16", 64, id="bf16-d64"),
        # A 128 x 64 float32 forward: with 4 warps its gathered bias tile spilled 328 B.
        pytest.param("band_relative", "f32", 64, id="f32-d64"),
        pytest.param("band_relative_dilated", "f32", 128, id="f32-d128-dilated"),
        pytest.param("bigbird_relative", "f32", 64, id="bigbird-f32-d64"),
    ],
)
def test_relative_kernels_fit_hopper(op, dtype, head_dim):
    text = gpu_cases.relative_gradient(op, dtype, head_dim)
    kernels = gpu_cases.export_kernels(text)
    names = {kernel.name for kernel in kernels}
    report = gpu_cases.hopper_problems(kernels)
    assert {"block_sparse_flash_bias_fwd", "block_sparse_flash_bias_dq", "block_sparse_flash_bias_dkv"} <= names, names
    assert not report, "\n".join(report)
