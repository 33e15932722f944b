"""The sequence-parallel cases, run in a child process with 8 simulated CPU devices.

`python -m tests.attention.sequence_parallel_cases OUT_DIR` writes, per case, `CASE.npz` with the
output and the gradients of q, k, v (of `sum(out * cotangent)`) of the op unsharded (`want_*`) and
sharded over the mesh's `sequence` axis (`got_*`), and `hlo_CASE.txt`, the compiled HLO of the
sharded value-and-gradient, for the cases `HLO_CASES` names. `test_sequence_parallel.py` compares
them. The device count has to be set before JAX starts, hence the child process.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Only in the child: the test process imports this module for its case names, and its own
    # subprocesses must not inherit 8 devices.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from kernels_pallas.block_sparse_flash import TpuBlockSizes  # noqa: E402
from longjax.attention import api, global_tokens  # noqa: E402
from longjax.attention.relative import RelativePositions  # noqa: E402

BATCH, SEQ, HEADS, HEAD_DIM = 2, 64, 2, 8
# Two meshes of the 8 devices: the sequence over all of them (shards of 8 positions), or over 4
# with the batch over the other 2 (shards of 16), which the op leaves to the compiler.
MESHES = {"seq8": (1, 8), "data2_seq4": (2, 4)}


def _masks():
    globals_ = np.zeros((BATCH, SEQ), bool)
    globals_[0, [0, 21, 40]] = True  # in shards 0, 2 and 5 of 8
    globals_[1, [33]] = True
    padding = np.ones((BATCH, SEQ), bool)
    padding[1, 45:] = False  # row 1 ends inside a shard; its last shards are all padding
    return jnp.asarray(globals_), jnp.asarray(padding)


def _chunked(op):
    """`op` with the global-token passes cut into chunks of 2 positions: their long-shard path
    (`global_tokens.chunk_length`), which short test shards would not reach."""

    def run(q, k, v, **kwargs):
        saved = global_tokens.CHUNK_SCORES, global_tokens.MIN_CHUNK
        global_tokens.CHUNK_SCORES, global_tokens.MIN_CHUNK = 4, 2
        try:
            return op(q, k, v, **kwargs)
        finally:
            global_tokens.CHUNK_SCORES, global_tokens.MIN_CHUNK = saved

    return run


def _cases():
    """name -> (mesh name, op(q, k, v, sequence_axis=...) -> out)."""
    globals_, padding = _masks()
    projection = jax.random.normal(jax.random.key(7), (16, HEAD_DIM), jnp.float32)
    head_projection = jax.random.normal(jax.random.key(8), (HEADS, 12, HEAD_DIM), jnp.float32)
    sw = functools.partial(api.sliding_window_attention, impl="xla")
    # Transformer-XL positions: the position queries follow q and the table (whole on every shard)
    # follows v, so the gradients of both reach the compared ones.
    table = jax.random.normal(jax.random.key(9), (2 * (SEQ - 1) + 1, HEADS, HEAD_DIM), jnp.float32)
    position_bias = jax.random.normal(jax.random.key(10), (HEADS, HEAD_DIM), jnp.float32)
    relative = lambda q, v: RelativePositions(q + position_bias, table + jnp.mean(v, axis=(0, 1)))
    favor = functools.partial(api.favor_attention, impl="xla")
    bigbird = functools.partial(api.block_sparse_attention, impl="xla")
    return {
        # Sliding window: within one shard, one hop each way.
        "window_inside_shard": ("seq8", lambda q, k, v, **kw: sw(q, k, v, window=3, **kw)),
        # Wider than a shard: two hops each way.
        "window_two_shards": ("seq8", lambda q, k, v, **kw: sw(q, k, v, window=13, **kw)),
        # Asymmetric and dilated per head: reaches 40 positions back (5 shards), 8 ahead.
        "asymmetric_dilated": (
            "seq8", lambda q, k, v, **kw: sw(q, k, v, window=(20, 4), dilation=(1, 2), **kw),
        ),
        # Beyond the sequence: every shard reaches every other.
        "window_beyond_sequence": ("data2_seq4", lambda q, k, v, **kw: sw(q, k, v, window=100, **kw)),
        "window_zero": ("seq8", lambda q, k, v, **kw: sw(q, k, v, window=0, **kw)),
        "relative_dilated_padding": (
            "data2_seq4",
            lambda q, k, v, **kw: sw(
                q, k, v, window=(7, 3), dilation=(1, 3), padding_mask=padding, relative=relative(q, v), **kw
            ),
        ),
        "relative_causal_two_shards": (
            "seq8", lambda q, k, v, **kw: sw(q, k, v, window=13, causal=True, relative=relative(q, v), **kw),
        ),
        "padding": ("data2_seq4", lambda q, k, v, **kw: sw(q, k, v, window=5, padding_mask=padding, **kw)),
        "globals_padding": (
            "seq8",
            lambda q, k, v, **kw: sw(q, k, v, window=5, global_mask=globals_, padding_mask=padding, **kw),
        ),
        "causal_globals_padding": (
            "seq8",
            lambda q, k, v, **kw: sw(
                q, k, v, window=10, causal=True, global_mask=globals_, padding_mask=padding, **kw
            ),
        ),
        "global_projections": (
            "data2_seq4",
            lambda q, k, v, **kw: sw(
                q, k, v, window=6, dilation=(2, 1), global_mask=globals_, padding_mask=padding,
                global_qkv=(0.5 * q, jnp.flip(k, axis=1), 2.0 * v), **kw,
            ),
        ),
        "causal_globals_padding_chunked": (
            "seq8",
            _chunked(lambda q, k, v, **kw: sw(
                q, k, v, window=10, causal=True, global_mask=globals_, padding_mask=padding, **kw
            )),
        ),
        # A band on the kernels (interpreted here), the globals as above.
        "pallas_globals": (
            "data2_seq4",
            lambda q, k, v, **kw: api.sliding_window_attention(
                q, k, v, window=9, global_mask=globals_, padding_mask=padding, impl="pallas", interpret=True, **kw
            ),
        ),
        # Transformer-XL positions computed in the kernels of each shard's band, in the Mosaic
        # formulation (float32 matmuls, so sharded and unsharded agree to float32 roundings; the
        # Triton one's bfloat16 operands round differently per tiling, and its bias is the same
        # input of the same band code).
        "pallas_relative_dilated_padding": (
            "data2_seq4",
            lambda q, k, v, **kw: api.sliding_window_attention(
                q, k, v, window=(7, 3), dilation=(1, 3), padding_mask=padding, relative=relative(q, v),
                impl="pallas", interpret=True, block_sizes=TpuBlockSizes(8, 16, 16, 8), **kw,
            ),
        ),
        "pallas_tpu_relative_causal": (
            "seq8",
            lambda q, k, v, **kw: api.sliding_window_attention(
                q, k, v, window=13, causal=True, relative=relative(q, v), impl="pallas", interpret=True,
                block_sizes=TpuBlockSizes(8, 8, 8, 8), **kw,
            ),
        ),
        # BigBird: window, random and global blocks fetched from the shards holding them.
        "bigbird": ("seq8", lambda q, k, v, **kw: bigbird(q, k, v, block_size=4, **kw)),
        "bigbird_causal_padding": (
            "seq8", lambda q, k, v, **kw: bigbird(q, k, v, block_size=4, causal=True, padding_mask=padding, **kw),
        ),
        "bigbird_globals": (
            "data2_seq4",
            lambda q, k, v, **kw: bigbird(
                q, k, v, block_size=4, num_window_blocks=5, global_blocks=(0, 5, -1), global_mask=globals_,
                padding_mask=padding, **kw,
            ),
        ),
        "bigbird_globals_chunked": (
            "data2_seq4",
            _chunked(lambda q, k, v, **kw: bigbird(
                q, k, v, block_size=4, global_mask=globals_, padding_mask=padding, **kw,
            )),
        ),
        # FAVOR+.
        "favor_bidirectional": ("seq8", lambda q, k, v, **kw: favor(q, k, v, projection=projection, padding_mask=padding, **kw)),
        "favor_bidirectional_relu_heads": (
            "data2_seq4",
            lambda q, k, v, **kw: favor(q, k, v, projection=head_projection, feature_map="relu", **kw),
        ),
        # Chunks shorter than a shard, and longer (the shard is one padded chunk).
        "favor_causal_short_chunks": (
            "seq8",
            lambda q, k, v, **kw: favor(q, k, v, projection=projection, causal=True, chunk_size=4, padding_mask=padding, **kw),
        ),
        "favor_causal_long_chunks": (
            "data2_seq4",
            lambda q, k, v, **kw: favor(q, k, v, projection=projection, causal=True, chunk_size=32, **kw),
        ),
        "favor_causal_relu": (
            "seq8",
            lambda q, k, v, **kw: favor(q, k, v, projection=projection, causal=True, feature_map="relu", chunk_size=8, **kw),
        ),
    }


HLO_CASES = ("window_two_shards", "globals_padding", "bigbird")


def _mesh(name: str):
    data, sequence = MESHES[name]
    return jax.make_mesh((data, sequence), ("data", "sequence"), axis_types=(AxisType.Auto, AxisType.Auto))


def _value_and_grads(op, arrays, cotangent):
    def loss(q, k, v):
        out = op(q, k, v)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(*arrays)
    return out, grads


def main(out_dir: str) -> None:
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (BATCH, SEQ, HEADS, HEAD_DIM)
    q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    for name, (mesh_name, op) in _cases().items():
        results = {}
        with jax.set_mesh(_mesh(mesh_name)):
            for label, axis in (("want", None), ("got", "sequence")):
                run = jax.jit(functools.partial(_value_and_grads, functools.partial(op, sequence_axis=axis)))
                out, grads = run((q, k, v), cotangent)
                results[f"{label}_out"] = np.asarray(out)
                for grad_name, grad in zip(("q", "k", "v"), grads):
                    results[f"{label}_d{grad_name}"] = np.asarray(grad)
                if axis is not None and name in HLO_CASES:
                    hlo = run.lower((q, k, v), cotangent).compile().as_text()
                    with open(os.path.join(out_dir, f"hlo_{name}.txt"), "w") as f:
                        f.write(hlo)
        np.savez(os.path.join(out_dir, f"{name}.npz"), **results)
    # No future leak, sharded: changing the last shard's keys and values (and queries) leaves every
    # earlier position's output bitwise unchanged.
    changed = [x.at[:, SEQ - 8:].multiply(-3.0) for x in (q, k, v)]
    leaks = {}
    for name in ("causal_globals_padding", "bigbird_causal_padding", "favor_causal_short_chunks", "favor_causal_relu"):
        mesh_name, op = _cases()[name]
        with jax.set_mesh(_mesh(mesh_name)):
            run = jax.jit(functools.partial(op, sequence_axis="sequence"))
            leaks[f"{name}_before"] = np.asarray(run(q, k, v))
            leaks[f"{name}_after"] = np.asarray(run(*changed))
    np.savez(os.path.join(out_dir, "future.npz"), **leaks)


if __name__ == "__main__":
    main(sys.argv[1])
