"""Chunk passes: the one `pallas_call` shape behind every FAVOR+ kernel, for Triton and Mosaic.

A pass applies a step function to every chunk of rows of every (batch,
head), each chunk a program of its own: the grid is (batch, heads, chunks)
on both backends, every axis parallel. What links the chunks of a causal
sequence (the feature state entering each chunk) is computed between passes,
by a scan over per-chunk states in `favor.py`, so no program walks the
sequence: the GPU gets batch * heads * chunks programs, not batch * heads.

The step sees refs to one chunk of each row operand, the chunk's entry of
each per-chunk operand and the whole of each per-(batch, head) operand, and
writes the chunk's outputs. Operand layouts (`B` and `H` may be 1 for an
operand shared by all batch rows or heads; the index maps broadcast it):

* `ROWS`: `[B, H, seq, width]`, seen as `[chunk, width]`;
* `CHUNKS`: `[B, H, num_chunks, rows, width]`, seen as `[rows, width]`
  (a per-chunk state `[features, head_dim]`, normaliser `[1, features]` or
  scalar `[1, 1]`);
* `WHOLE` (inputs only): `[B, H, rows, width]`, seen whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

ROWS, CHUNKS, WHOLE = "rows", "chunks", "whole"


@dataclasses.dataclass(frozen=True)
class Launch:
    """How one pass is launched.

    Attributes:
      backend: 'gpu' (Triton) or 'tpu' (Mosaic).
      chunk: rows per program; the row operands' seq is a multiple of it.
      interpret: run the kernel in Pallas interpret mode.
      num_warps, num_stages: Triton launch parameters (None: Triton's defaults).
      name: kernel name, for profiles and error messages.
    """

    backend: str
    chunk: int
    interpret: bool
    num_warps: int | None = None
    num_stages: int | None = None
    name: str = "favor"


def _operand_index(shape, kind, b, h, c):
    """Block index of an operand for batch b, head h and chunk c (broadcast dims of size 1 -> 0)."""
    bi = b if shape[0] > 1 else 0
    hi = h if shape[1] > 1 else 0
    if kind == ROWS:
        return (bi, hi, c, 0)
    if kind == CHUNKS:
        return (bi, hi, c, 0, 0)
    return (bi, hi, 0, 0)


def _spec(shape, kind, chunk: int):
    squeezed = (pl.squeezed,) * (3 if kind == CHUNKS else 2)
    if kind == ROWS:
        block = squeezed + (chunk, shape[3])
    else:
        block = squeezed + tuple(shape[-2:])
    return pl.BlockSpec(block, lambda b, h, c: _operand_index(shape, kind, b, h, c))


def run(
    step: Callable,
    inputs: Sequence[tuple[jax.Array, str]],
    outputs: Sequence[tuple[jax.ShapeDtypeStruct, str]],
    launch: Launch,
):
    """Runs one pass and returns its outputs, in the order of `outputs`.

    Args:
      step: `(input_refs, output_refs) -> None`, the refs in the order of
        `inputs` and `outputs`, each seen as in the module docstring; the step
        loads what it needs and stores every output (in slices, if it likes).
      inputs: `(array, kind)` pairs, laid out as in the module docstring.
      outputs: `(shape_dtype, kind)` pairs, ROWS or CHUNKS.
      launch: backend, chunk and launch parameters.
    """
    if any(kind == WHOLE for _, kind in outputs):
        raise ValueError(f"{launch.name}: outputs are ROWS or CHUNKS; whole results are reduced outside")
    batch, heads = outputs[0][0].shape[:2]
    seq = next(a.shape[2] for a, kind in inputs if kind == ROWS)
    n_in = len(inputs)

    def kernel(*refs):
        step(refs[:n_in], refs[n_in:])

    if launch.backend == "gpu":
        compiler_params = plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)
    else:
        compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
    return pl.pallas_call(
        kernel,
        out_shape=[shape for shape, _ in outputs],
        grid=(batch, heads, seq // launch.chunk),
        in_specs=[_spec(a.shape, kind, launch.chunk) for a, kind in inputs],
        out_specs=[_spec(s.shape, kind, launch.chunk) for s, kind in outputs],
        compiler_params=compiler_params,
        interpret=launch.interpret,
        name=launch.name,
    )(*[a for a, _ in inputs])
