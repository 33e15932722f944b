"""The kernels lower for GPU (Triton) and TPU (Mosaic) at realistic sizes, on a CPU-only machine.

`jax.export` traces and lowers the forward and the gradient programs for
`platforms=['cuda']` and `['tpu']`: the Pallas kernels go through the Triton
and Mosaic lowerings (block shapes, dtypes, every primitive the kernels use),
which is what a CPU machine can prove without an accelerator. Only tracing and
lowering run, so these are cheap.

With no block sizes passed, both lowerings are traced and the exported
platform keeps its own (`jax.lax.platform_dependent`): the same call exports
for either platform.

Triton custom calls carry no serialisation-compatibility guarantee, so the
export check for that target is disabled. From JAX 0.11 the Triton lowering
asks for the target GPU; an abstract mesh names one (an H100).
"""

from __future__ import annotations

import contextlib

import jax
import jax.extend
import jax.numpy as jnp
import pytest
from jax import export

from kernels_pallas.block_sparse_flash import GpuBlockSizes, TpuBlockSizes
from kernels_pallas.gpu_resources import TRITON_CALL
from longjax.attention import RelativePositions, block_sparse_attention, sliding_window_attention
from tests.kernels import gpu_cases

SEQ, HEADS = 8192, 4
TARGETS = {
    "cuda": (GpuBlockSizes(), TRITON_CALL),
    "tpu": (TpuBlockSizes(), "tpu_custom_call"),
}


def _ops(block_sizes):
    # block_sizes None: not passed at all, as a user exporting with the defaults would.
    return gpu_cases.block_sparse_ops(block_sizes)


def _export(fn, platform, args):
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if platform == "cuda" else []
    with gpu_cases.target_gpu() if platform == "cuda" else contextlib.nullcontext():
        exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    return exported.mlir_module()


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("platform", list(TARGETS))
@pytest.mark.parametrize("op", list(_ops(None)))
def test_forward_and_gradient_lower(op, platform, head_dim):
    block_sizes, call = TARGETS[platform]
    fn = _ops(block_sizes)[op]
    x = jax.ShapeDtypeStruct((1, SEQ, HEADS, head_dim), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((1, SEQ), jnp.bool_)

    def grad(q, k, v, g, p):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, g, p).astype(jnp.float32)), (0, 1, 2))(q, k, v)

    dilated = op == "band_causal_dilated"
    for program, kernels in ((fn, 1), (grad, 3)):
        text = _export(program, platform, (x, x, x, mask, mask))
        # One pallas_call per kernel (forward; forward, dq and dk/dv), per dilation group.
        assert text.count(f"@{call}(") == kernels * (2 if dilated else 1)
        # No seq x seq array anywhere.
        assert f"{SEQ}x{SEQ}" not in text


OTHER_CALL = {"cuda": "tpu_custom_call", "tpu": TRITON_CALL}


@pytest.mark.parametrize("platform", list(TARGETS))
@pytest.mark.parametrize("op", list(_ops(None)))
def test_default_block_sizes_follow_the_exported_platform(op, platform):
    # No block sizes: the lowered platform picks its lowering and defaults at lowering time.
    _, call = TARGETS[platform]
    fn = _ops(None)[op]
    x = jax.ShapeDtypeStruct((1, SEQ, HEADS, 64), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((1, SEQ), jnp.bool_)

    def grad(q, k, v, g, p):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, g, p).astype(jnp.float32)), (0, 1, 2))(q, k, v)

    dilated = op == "band_causal_dilated"
    text = _export(grad, platform, (x, x, x, mask, mask))
    assert text.count(f"@{call}(") == 3 * (2 if dilated else 1)
    assert OTHER_CALL[platform] not in text


def _pallas_block_rows(jaxpr) -> list[tuple[int, int]]:
    """(q block rows, k block rows) of each pallas_call in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            q, k = eqn.params["grid_mapping"].block_mappings[:2]
            rows = lambda mapping: [getattr(d, "block_size", None) for d in mapping.block_shape][-2]
            found.append((rows(q), rows(k)))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if isinstance(inner, jax.extend.core.Jaxpr):
                found += _pallas_block_rows(inner)
    return found


@pytest.mark.parametrize("block_size", [64, 32])
def test_bigbird_short_blocks_lower_with_128_tiles_for_tpu(block_size):
    # The Mosaic defaults take 128-position kernel blocks of 2 (or 4) BigBird blocks, the visits
    # masked by slot-pair bits in-kernel: the forward, dq and dk/dv kernels all tile q and k by 128.
    x = jax.ShapeDtypeStruct((1, SEQ, HEADS, 64), jnp.bfloat16)
    fn = lambda q, k, v: block_sparse_attention(
        q, k, v, block_size=block_size, causal=True, seed=0, impl="pallas", interpret=False,
        block_sizes=TpuBlockSizes(),
    )
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))
    assert _pallas_block_rows(jax.make_jaxpr(grad)(x, x, x).jaxpr) == [(128, 128)] * 3
    assert _export(grad, "tpu", (x, x, x)).count("@tpu_custom_call(") == 3


@pytest.mark.parametrize("block_sizes", [TpuBlockSizes(), None], ids=["tpu-blocks", "default-blocks"])
def test_sliding_window_relative_lowers_for_tpu(block_sizes):
    # Transformer-XL's term on the Mosaic kernels: the banded bias's 513 columns (window 256 a side)
    # as 640-lane row blocks, cut per tile by strided lane rotations. Without block sizes both
    # lowerings are traced (each takes the banded bias) and the TPU export keeps Mosaic's.
    x = jax.ShapeDtypeStruct((1, SEQ, HEADS, 64), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((2 * 256 + 1, HEADS, 64), jnp.bfloat16)

    def loss(q, k, v, queries, embeddings):
        out = sliding_window_attention(
            q, k, v, window=256, relative=RelativePositions(queries, embeddings), impl="pallas", interpret=False,
            **({} if block_sizes is None else {"block_sizes": block_sizes}),
        )
        return jnp.sum(out.astype(jnp.float32))

    text = _export(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), "tpu", (x, x, x, x, table))
    assert text.count("@tpu_custom_call(") == 3 and TRITON_CALL not in text
    assert f"{SEQ}x{SEQ}" not in text


@pytest.mark.parametrize(
    "block_sizes", [TpuBlockSizes(), None, TpuBlockSizes(block_q=128, block_k=32, block_q_bwd=32, block_k_bwd=128)],
    ids=["tpu-blocks", "default-blocks", "mixed-blocks"],
)
def test_bigbird_relative_lowers_for_tpu(block_sizes):
    # BigBird's term on the Mosaic kernels: the per-visit bias (6 entries of 64-position slots) as
    # row blocks cut by a lane rotation per (query slot, key slot) pair of each 128-wide tile, the
    # pair's entry found in a sixth scalar-prefetch table. Without block sizes both lowerings are
    # traced (each takes the per-visit bias) and the TPU export keeps Mosaic's. Mixed blocks: a
    # two-slot query block against 32-key blocks within a slot, and dk/dv's transposed tiles of them.
    x = jax.ShapeDtypeStruct((1, SEQ, HEADS, 64), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((2 * SEQ - 1, HEADS, 64), jnp.bfloat16)

    def loss(q, k, v, queries, embeddings):
        out = block_sparse_attention(
            q, k, v, block_size=64, seed=0, relative=RelativePositions(queries, embeddings), impl="pallas",
            interpret=False, **({} if block_sizes is None else {"block_sizes": block_sizes}),
        )
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    if block_sizes == TpuBlockSizes():
        assert _pallas_block_rows(jax.make_jaxpr(grad)(x, x, x, x, table).jaxpr) == [(128, 128)] * 3
    text = _export(grad, "tpu", (x, x, x, x, table))
    assert text.count("@tpu_custom_call(") == 3 and TRITON_CALL not in text
    assert f"{SEQ}x{SEQ}" not in text
