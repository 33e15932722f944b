"""What the Triton kernels of an exported program cost on a Hopper GPU, measured on a CPU host.

`jax.export(..., platforms=['cuda'])` only wraps each Pallas-Triton kernel's
Triton IR in a custom call (jaxlib 0.10): no Triton pass, shared-memory check
or register allocation runs, so a kernel that cannot launch still exports.
This module takes that IR out of the exported module, compiles it with a pip
`triton` for sm_90 and runs `ptxas -v` on the PTX, which gives the figures
that decide whether a kernel launches and runs well: dynamic shared memory
per block (Hopper allows 232,448 B), registers per thread, spill traffic, and
whether the matmuls became tensor-core instructions (`warp_group_dot` on
sm_90, `mma` otherwise) or IEEE FMA loops.

XLA bundles its own Triton, so the figures are close to, not exactly, those of
a real launch. `triton` is an optional dependency (the `gpu-check` extra); it
is imported only when compiling.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

TRITON_CALL = "__gpu$xla.gpu.triton"
# cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90 (H100, H200): 227 KiB.
HOPPER_MAX_SHARED = 232_448
# Registers per thread the hardware allows; more spills to local memory.
MAX_REGISTERS = 255


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One kernel as the export carries it: its name, Triton IR (text) and launch parameters."""

    name: str
    ir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """A kernel compiled for sm_90.

    Attributes:
      name, num_warps, num_stages, grid: as in `TritonKernel`.
      shared_bytes: dynamic shared memory per block Triton asks for.
      registers: registers per thread (ptxas).
      spill_stores, spill_loads: bytes of register spill traffic per thread (ptxas).
      tensor_core_dots: matmuls lowered to tensor-core ops in the TTGIR
        (`ttng.warp_group_dot` on sm_90; `mma` encodings elsewhere).
      fma_dots: matmuls left as `tt.dot` with a blocked (FMA) layout: no tensor cores.
      ttgir: the TTGIR text, for reading the layout decisions.
    """

    name: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    shared_bytes: int
    registers: int
    spill_stores: int
    spill_loads: int
    tensor_core_dots: int
    fma_dots: int
    ttgir: str = dataclasses.field(repr=False)

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def problems(self, max_shared: int = HOPPER_MAX_SHARED) -> list[str]:
        """What keeps this kernel from launching or using the tensor cores; empty when it fits."""
        found = []
        if self.shared_bytes > max_shared:
            found.append(f"{self.shared_bytes:,} B of shared memory > {max_shared:,} B")
        if self.spill_stores or self.spill_loads:
            found.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads")
        if self.fma_dots:
            found.append(f"{self.fma_dots} dot(s) on FMA units, not tensor cores")
        return found


def triton_kernels(mlir_text: str) -> list[TritonKernel]:
    """The Triton kernels in an exported module's text (`jax.export.Exported.mlir_module()`).

    Raises:
      ValueError: the module holds no Triton call in the form jaxlib 0.10
        writes (a newer jaxlib compiles Triton while lowering, which needs a GPU).
    """
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as triton_dialect

    context = jax_mlir.make_ir_context()
    triton_dialect.register_dialect(context)
    kernels = []
    with context:
        module = ir.Module.parse(mlir_text)

        def visit(operation):
            for region in operation.regions:
                for block in region.blocks:
                    for op in block.operations:
                        op = op.operation
                        if op.name == "stablehlo.custom_call" and _string(op, "call_target_name") == TRITON_CALL:
                            kernels.append(_kernel(op, ir))
                        visit(op)

        visit(module.operation)
    if not kernels:
        raise ValueError(
            f"the module holds no {TRITON_CALL} call with Triton IR (the form jaxlib <= 0.10.2 exports)"
        )
    return kernels


def _string(op, name):
    from jax._src.lib.mlir import ir

    return ir.StringAttr(op.attributes[name]).value if name in op.attributes else None


def _kernel(op, ir) -> TritonKernel:
    config = ir.DictAttr(op.attributes["mhlo.backend_config"])
    integer = lambda key: ir.IntegerAttr(config[key]).value
    kernel_module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
    return TritonKernel(
        name=ir.StringAttr(config["name"]).value,
        ir=kernel_module.operation.get_asm(enable_debug_info=False),
        num_warps=integer("num_warps"),
        num_stages=integer("num_stages"),
        grid=(integer("grid_x"), integer("grid_y"), integer("grid_z")),
    )


_PTXAS_LINE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def compile_for_hopper(kernel: TritonKernel, capability: int = 90) -> KernelResources:
    """Compiles one kernel's Triton IR for sm_90 (or `capability`) and reads its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nvidia

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{kernel.name}.ttir")
        with open(path, "w") as f:
            f.write(kernel.ir)
        compiled = triton.compile(
            path,
            target=GPUTarget("cuda", capability, 32),
            options=dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages),
        )
        ptx = os.path.join(tmp, f"{kernel.name}.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        log = subprocess.run(
            [nvidia.get_ptxas(capability).path, "-v", f"--gpu-name={arch}", ptx, "-o", ptx + ".o"],
            capture_output=True, text=True, check=True,
        ).stderr
    spills = _PTXAS_LINE.search(log)
    registers = _REGISTERS.search(log)
    if spills is None or registers is None:
        raise RuntimeError(f"{kernel.name}: could not read ptxas -v output:\n{log}")
    ttgir = compiled.asm["ttgir"]
    tensor_core = len(re.findall(r"ttng\.warp_group_dot\b", ttgir))
    dots = re.findall(r"= tt\.dot .*", ttgir)
    mma_dots = sum(1 for line in dots if "#mma" in line)
    return KernelResources(
        name=kernel.name, num_warps=kernel.num_warps, num_stages=kernel.num_stages, grid=kernel.grid,
        shared_bytes=int(compiled.metadata.shared), registers=int(registers.group(1)),
        spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
        tensor_core_dots=tensor_core + mma_dots, fma_dots=len(dots) - mma_dots, ttgir=ttgir,
    )
