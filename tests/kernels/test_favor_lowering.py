"""The FAVOR+ kernels lower for GPU (Triton) and TPU (Mosaic) from this CPU host, at the sizes
they are for: seq 16384, 256 features, head_dim 64 and 128, bfloat16, forward and gradient.

Tracing and lowering only (`jax.export`); compiling needs the accelerator.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.favor import favor_attention_pallas

SEQ, FEATURES, HEADS = 16384, 256, 2
# The Triton kernel is an opaque custom call without serialisation guarantees:
# exporting it is allowed explicitly.
TRITON_CALL = "__gpu$xla.gpu.triton"
KERNEL_CALLS = {"cuda": TRITON_CALL, "tpu": "tpu_custom_call"}


def _export(fn, platform, *args):
    # Triton lowering needs a GPU model; on a CPU host an abstract H100 stands in.
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.export.export(
            jax.jit(fn), platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(*args)


@pytest.mark.parametrize("gradient", [False, True], ids=["forward", "gradient"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_the_accelerator(platform, head_dim, causal, gradient):
    x = jax.ShapeDtypeStruct((1, SEQ, HEADS, head_dim), jnp.bfloat16)
    projection = jax.ShapeDtypeStruct((FEATURES, head_dim), jnp.float32)

    def attention(q, k, v, p):
        # No block sizes: the platform picks its kernels when lowering.
        return favor_attention_pallas(q, k, v, projection=p, causal=causal, interpret=False)

    if gradient:
        loss = lambda *xs: jnp.sum(attention(*xs).astype(jnp.float32))
        fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    else:
        fn = attention
    module = _export(fn, platform, x, x, x, projection).mlir_module()
    kernels = module.count(KERNEL_CALLS[platform])
    other = KERNEL_CALLS["tpu" if platform == "cuda" else "cuda"]
    # Forward: the chunk states and the output pass (causal), or the key partial sums and the query
    # pass; the gradient adds the recomputed chunk states, the per-row terms, dq and dk/dv (causal),
    # or the query and key gradient passes.
    assert kernels == 2 + ((4 if causal else 2) if gradient else 0), kernels
    assert other not in module
    # No [seq, features] array outside the kernels.
    assert not re.search(rf"\b{SEQ}x{FEATURES}x", module) and not re.search(rf"x{SEQ}x{FEATURES}x", module)
