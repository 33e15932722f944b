"""What a Mosaic (TPU) kernel keeps in scalar and vector memory, and the chips' budgets for it.

A Pallas TPU kernel holds its scalar-prefetched operands whole in SMEM for the
whole call, and per grid step its blocks in VMEM: two buffers per pipelined
input and output (the one in use and the one being fetched or written back)
plus its scratch. Both are known from the call's shapes before anything runs,
so a call that cannot fit is refused with a clear error instead of a Mosaic
compile failure (or, for SMEM, a failure only at run time on the chip).

Budgets per TensorCore, from `jax/_src/pallas/mosaic/tpu_info.py` (JAX 0.10.2,
`TpuInfo.smem_capacity_bytes` and `vmem_capacity_bytes`):
  v5e: SMEM 1 MiB, VMEM 128 MiB;  v5p: SMEM 1 MiB, VMEM 64 MiB;
  v6e: SMEM 1 MiB, VMEM 128 MiB.
A kernel may use only the *scoped* VMEM limit unless it raises it with
`CompilerParams(vmem_limit_bytes=...)`, which these kernels do not: XLA's
default `--xla_tpu_scoped_vmem_limit_kib` is 16 MiB on v5e and 32 MiB on v5p
and v6e (the project's brief; tpu-inference PR #3407 quotes "the default 32MiB
scoped-vmem limit" on v6e, and XLA error E1001 describes the limit).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MiB = 1024 * 1024
NUM_LANES = 128  # lanes of a vector register (32-bit words)
NUM_SUBLANES = 8  # sublanes of a vector register of 32-bit words


@dataclasses.dataclass(frozen=True)
class TpuChip:
    """Per-TensorCore memory budgets of one TPU generation, in bytes."""

    name: str
    smem_bytes: int
    vmem_bytes: int
    scoped_vmem_bytes: int


CHIPS = {
    "v5e": TpuChip("v5e", smem_bytes=1 * MiB, vmem_bytes=128 * MiB, scoped_vmem_bytes=16 * MiB),
    "v5p": TpuChip("v5p", smem_bytes=1 * MiB, vmem_bytes=64 * MiB, scoped_vmem_bytes=32 * MiB),
    "v6e": TpuChip("v6e", smem_bytes=1 * MiB, vmem_bytes=128 * MiB, scoped_vmem_bytes=32 * MiB),
}

# What a call is checked against before it is lowered, whatever TPU it will run on: the
# smallest of the chips' budgets (a CPU host exporting for TPU does not know the chip).
SMEM_BUDGET = min(c.smem_bytes for c in CHIPS.values())
VMEM_BUDGET = min(c.scoped_vmem_bytes for c in CHIPS.values())


def vmem_tile_bytes(shape, dtype) -> int:
    """Bytes of one VMEM buffer of `shape`: the last two dims padded to whole (sublane, lane) tiles.

    A tile is 8 sublanes x 128 lanes of 32-bit words; narrower dtypes pack
    more rows per sublane (16 for bfloat16, 32 for int8). So a `[block, 1]`
    float32 column takes `block x 128` words, as Mosaic lays it out.
    """
    itemsize = np.dtype(dtype).itemsize
    dims = list(shape) or [1]
    if len(dims) == 1:
        dims = [1] + dims
    rows_per_tile = NUM_SUBLANES * max(1, 4 // itemsize)
    dims[-1] = -(-dims[-1] // NUM_LANES) * NUM_LANES
    dims[-2] = -(-dims[-2] // rows_per_tile) * rows_per_tile
    return math.prod(dims) * itemsize


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What one TPU kernel call holds: SMEM (scalar-prefetched tables) and VMEM (blocks and scratch), bytes.

    Attributes:
      name: the kernel.
      smem_bytes: the scalar-prefetched operands, whole.
      vmem_bytes: two buffers of every pipelined input and output block, plus the scratch.
    """

    name: str
    smem_bytes: int
    vmem_bytes: int

    def problems(self, chip: TpuChip) -> list[str]:
        """What does not fit `chip` (its SMEM and its default scoped VMEM limit)."""
        out = []
        if self.smem_bytes > chip.smem_bytes:
            out.append(f"SMEM {self.smem_bytes:,} B > {chip.smem_bytes:,} B of TPU {chip.name}")
        if self.vmem_bytes > chip.scoped_vmem_bytes:
            out.append(f"VMEM {self.vmem_bytes:,} B > the {chip.scoped_vmem_bytes:,} B scoped limit of TPU {chip.name}")
        return out


def footprint(name: str, *, smem_arrays, inputs, outputs, scratch) -> Footprint:
    """The footprint of a kernel from its operands.

    Args:
      name: the kernel's name.
      smem_arrays: the scalar-prefetched arrays (anything with `nbytes`, or (shape, dtype) pairs).
      inputs, outputs: (block shape, dtype) of each pipelined operand, squeezed dims left out.
      scratch: (shape, dtype) of each VMEM scratch buffer.
    """
    smem = 0
    for a in smem_arrays:
        size = int(a.nbytes) if hasattr(a, "nbytes") else math.prod(a[0]) * np.dtype(a[1]).itemsize
        smem += -(-size // 4) * 4  # SMEM is addressed in 32-bit words
    vmem = sum(2 * vmem_tile_bytes(s, d) for s, d in (*inputs, *outputs))
    vmem += sum(vmem_tile_bytes(s, d) for s, d in scratch)
    return Footprint(name=name, smem_bytes=smem, vmem_bytes=vmem)


def check(fp: Footprint, what: str) -> None:
    """ValueError, naming budget and footprint, when `fp` exceeds the SMEM or scoped VMEM budget."""
    if fp.smem_bytes > SMEM_BUDGET:
        raise ValueError(
            f"{fp.name}: {what} needs {fp.smem_bytes:,} B of TPU scalar memory (SMEM) for its scalar-prefetched "
            f"tables, over the {SMEM_BUDGET:,} B budget (the SMEM of TPU {', '.join(CHIPS)}); use fewer heads, "
            f"a shorter sequence or longer blocks per call"
        )
    if fp.vmem_bytes > VMEM_BUDGET:
        raise ValueError(
            f"{fp.name}: {what} needs {fp.vmem_bytes:,} B of TPU vector memory (VMEM) for its blocks and "
            f"scratch, over the {VMEM_BUDGET:,} B budget (the smallest default scoped VMEM limit of TPU "
            f"{', '.join(CHIPS)}); use shorter blocks"
        )
