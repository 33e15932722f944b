"""Every Pallas GPU kernel fits an H100/H200: compiled here for sm_90 with the pinned `triton` and `ptxas -v`.

For each public op with `impl='pallas'` (`gpu_cases.OPS`), dtype and head
size, the gradient program is exported for CUDA and each distinct Triton
kernel in it (forward, dq, dk/dv) is compiled: shared memory must stay within
Hopper's 232,448 B per block, nothing may spill, and every matmul must run on
the tensor cores. `experiments/kernel_resources.py` prints the same figures
as a table.
"""

from __future__ import annotations

import pytest

from tests.kernels import gpu_cases

# The `gpu-check` extra pins it; CI installs it, so this only skips outside CI's environment.
pytest.importorskip("triton", reason="needs the pinned triton of the gpu-check extra")

CASES = [
    pytest.param(op, dtype, head_dim, id=f"{op}-{dtype}-d{head_dim}")
    for op in gpu_cases.OPS for dtype in gpu_cases.DTYPES for head_dim in gpu_cases.HEAD_DIMS
]


def _kernels(op, dtype, head_dim):
    return gpu_cases.export_kernels(gpu_cases.exported_gradient(op, dtype, head_dim))


@pytest.mark.parametrize("op,dtype,head_dim", CASES)
def test_kernels_fit_hopper(op, dtype, head_dim):
    report = gpu_cases.hopper_problems(_kernels(op, dtype, head_dim))
    assert not report, "\n".join(report)


def test_gradient_program_holds_forward_and_backward_kernels():
    # The check above is only as good as its coverage: forward, dq and dk/dv all present.
    names = {k.name for k in _kernels("band", "bf16", 64)}
    assert {"block_sparse_flash_fwd", "block_sparse_flash_dq", "block_sparse_flash_dkv"} <= names, names
    names = {k.name for k in _kernels("favor_causal", "bf16", 64)}
    assert {"favor_causal_fwd", "favor_causal_bwd_dq", "favor_causal_bwd_dkv"} <= names, names
