"""Chunk walks: the one `pallas_call` shape behind every FAVOR+ pass, for Triton and Mosaic.

A pass applies a step function to the chunks of rows of each (batch, head),
in sequence order, in reverse, or independently. The step sees one chunk of
each row operand, per-chunk operands, whole per-(batch, head) operands and a
carry of float arrays, and returns the chunk's outputs and the new carry; a
finish function turns the last carry into whole per-(batch, head) outputs.
The kernel bodies in `favor.py` are written once against this contract, and
this module builds the launch for each backend:

* GPU (Triton): a walk is one program per (batch, head) looping over the
  chunks with the carry in registers; an independent pass is one program per
  chunk.
* TPU (Mosaic): the chunks are the innermost grid axis; a walk marks it
  "arbitrary" and keeps the carry in VMEM scratch, initialised on the first
  chunk, with whole outputs resident and written on the last.

Operand layouts (`B` and `H` may be 1 for an operand shared by all batch rows
or heads; the index maps broadcast it):

* `ROWS`: `[B, H, seq, width]`, seen as `[chunk, width]`;
* `CHUNKS`: `[B, H, num_chunks, 1, width]`, seen as `[1, width]`;
* `WHOLE`: `[B, H, rows, width]`, seen whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

ROWS, CHUNKS, WHOLE = "rows", "chunks", "whole"
FORWARD, REVERSE, INDEPENDENT = "forward", "reverse", "independent"


@dataclasses.dataclass(frozen=True)
class Launch:
    """How one pass is launched.

    Attributes:
      backend: 'gpu' (Triton) or 'tpu' (Mosaic).
      order: FORWARD or REVERSE (a walk with a carry) or INDEPENDENT.
      chunk: rows per step; the row operands' seq is a multiple of it.
      interpret: run the kernel in Pallas interpret mode.
      num_warps, num_stages: Triton launch parameters (None: Triton's defaults).
      name: kernel name, for profiles and error messages.
    """

    backend: str
    order: str
    chunk: int
    interpret: bool
    num_warps: int | None = None
    num_stages: int | None = None
    name: str = "favor"


def _squeeze(n):
    return (pl.squeezed,) * n


def _operand_index(shape, kind, b, h, c):
    """Block index of an operand for batch b, head h and chunk c (broadcast dims of size 1 -> 0)."""
    bi = b if shape[0] > 1 else 0
    hi = h if shape[1] > 1 else 0
    if kind == ROWS:
        return (bi, hi, c, 0)
    if kind == CHUNKS:
        return (bi, hi, c, 0, 0)
    return (bi, hi, 0, 0)


def _chunked_spec(shape, kind, launch: Launch, num_chunks: int):
    """Grid (B, H, chunks): each program sees one chunk (TPU walks, every independent pass)."""
    reverse = launch.order == REVERSE

    def index_map(b, h, c):
        return _operand_index(shape, kind, b, h, num_chunks - 1 - c if reverse else c)

    if kind == ROWS:
        block = _squeeze(2) + (launch.chunk, shape[3])
    elif kind == CHUNKS:
        block = _squeeze(3) + (1, shape[4])
    else:
        block = _squeeze(2) + tuple(shape[2:])
    return pl.BlockSpec(block, index_map)


def _whole_sequence_spec(shape, kind):
    """Grid (B, H): each program sees its (batch, head)'s whole operand (GPU walks)."""
    return pl.BlockSpec(_squeeze(2) + tuple(shape[2:]), lambda b, h: _operand_index(shape, kind, b, h, 0))


def _load_chunk(ref, kind, c, chunk):
    if kind == ROWS:
        return ref[pl.ds(pl.multiple_of(c * chunk, chunk), chunk), :]
    return ref[c]


def _store_chunk(ref, kind, c, chunk, value):
    value = value.astype(ref.dtype)
    if kind == ROWS:
        ref[pl.ds(pl.multiple_of(c * chunk, chunk), chunk), :] = value
    else:
        ref[c] = value


def run(
    step: Callable,
    inputs: Sequence[tuple[jax.Array, str]],
    outputs: Sequence[tuple[jax.ShapeDtypeStruct, str]],
    launch: Launch,
    *,
    init: Callable[[], tuple] = tuple,
    finish: Callable | None = None,
):
    """Runs one pass and returns its outputs, in the order of `outputs`.

    Args:
      step: `(chunk_values, whole_values, carry) -> (chunk_outputs, carry)`:
        chunk_values are the ROWS and CHUNKS inputs in order, whole_values the
        WHOLE inputs; chunk_outputs are values for the ROWS and CHUNKS outputs.
      inputs: `(array, kind)` pairs, laid out as in the module docstring.
      outputs: `(shape_dtype, kind)` pairs; WHOLE outputs need a walk.
      launch: backend, order, chunk and launch parameters.
      init: `() -> carry`, the walk's initial carry (float arrays).
      finish: `(carry, whole_values) -> whole_outputs`; needed with WHOLE outputs.
    """
    kinds_in = [kind for _, kind in inputs]
    kinds_out = [kind for _, kind in outputs]
    walk = launch.order != INDEPENDENT
    if not walk and (WHOLE in kinds_out or init()):
        raise ValueError(f"{launch.name}: an independent pass has no carry and no whole outputs")
    if WHOLE in kinds_out and finish is None:
        raise ValueError(f"{launch.name}: whole outputs need a finish function")
    batch, heads = outputs[0][0].shape[:2]
    seq = next(a.shape[2] for a, kind in inputs if kind == ROWS)
    num_chunks = seq // launch.chunk
    n_in = len(inputs)

    def split(values, kinds):
        chunked = [x for x, kind in zip(values, kinds) if kind != WHOLE]
        whole = [x for x, kind in zip(values, kinds) if kind == WHOLE]
        return chunked, whole

    def store_whole(out_refs, carry, whole_in):
        whole_refs = [r for r, kind in zip(out_refs, kinds_out) if kind == WHOLE]
        for ref, value in zip(whole_refs, finish(carry, whole_in)):
            ref[...] = value.astype(ref.dtype)

    out_shape = [shape for shape, _ in outputs]
    if launch.backend == "gpu" and walk:

        def kernel(*refs):
            in_refs, out_refs = refs[:n_in], refs[n_in:]
            chunk_refs, whole_refs = split(in_refs, kinds_in)
            chunk_kinds, _ = split(kinds_in, kinds_in)
            whole_in = [r[...] for r in whole_refs]
            out_chunk_refs, _ = split(out_refs, kinds_out)
            out_chunk_kinds, _ = split(kinds_out, kinds_out)

            def body(t, carry):
                c = num_chunks - 1 - t if launch.order == REVERSE else t
                values = [_load_chunk(r, kind, c, launch.chunk) for r, kind in zip(chunk_refs, chunk_kinds)]
                chunk_out, carry = step(values, whole_in, carry)
                for r, kind, value in zip(out_chunk_refs, out_chunk_kinds, chunk_out):
                    _store_chunk(r, kind, c, launch.chunk, value)
                return carry

            carry = jax.lax.fori_loop(0, num_chunks, body, init())
            if finish is not None:
                store_whole(out_refs, carry, whole_in)

        return pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(batch, heads),
            in_specs=[_whole_sequence_spec(a.shape, kind) for a, kind in inputs],
            out_specs=[_whole_sequence_spec(s.shape, kind) for s, kind in outputs],
            compiler_params=plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages),
            interpret=launch.interpret,
            name=launch.name,
        )(*[a for a, _ in inputs])

    carry_shapes = jax.eval_shape(init)
    n_out = len(outputs)

    def kernel(*refs):
        in_refs, out_refs, scratch = refs[:n_in], refs[n_in : n_in + n_out], refs[n_in + n_out :]
        chunk_refs, whole_refs = split(in_refs, kinds_in)
        out_chunk_refs, _ = split(out_refs, kinds_out)
        whole_in = [r[...] for r in whole_refs]
        values = [r[...] for r in chunk_refs]
        if not walk:
            chunk_out, _ = step(values, whole_in, ())
        else:
            c = pl.program_id(2)

            @pl.when(c == 0)
            def _():
                for ref, value in zip(scratch, init()):
                    ref[...] = value

            chunk_out, carry = step(values, whole_in, tuple(r[...] for r in scratch))
            for ref, value in zip(scratch, carry):
                ref[...] = value

            if finish is not None:

                @pl.when(c == num_chunks - 1)
                def _():
                    store_whole(out_refs, tuple(r[...] for r in scratch), whole_in)

        for ref, value in zip(out_chunk_refs, chunk_out):
            ref[...] = value.astype(ref.dtype)

    if launch.backend == "gpu":
        compiler_params = plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)
        scratch_shapes = ()
    else:
        semantics = ("parallel", "parallel", "arbitrary" if walk else "parallel")
        compiler_params = pltpu.CompilerParams(dimension_semantics=semantics)
        scratch_shapes = [pltpu.VMEM(s.shape, s.dtype) for s in carry_shapes]
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, heads, num_chunks),
        in_specs=[_chunked_spec(a.shape, kind, launch, num_chunks) for a, kind in inputs],
        out_specs=[_chunked_spec(s.shape, kind, launch, num_chunks) for s, kind in outputs],
        scratch_shapes=scratch_shapes,
        compiler_params=compiler_params,
        interpret=launch.interpret,
        name=launch.name,
    )(*[a for a, _ in inputs])

