"""`kernels_pallas` is a leaf: its modules import JAX, NumPy and each other, nothing of longjax."""

from __future__ import annotations

import pathlib
import pkgutil
import subprocess
import sys

import pytest

import kernels_pallas

MODULES = sorted(f"kernels_pallas.{m.name}" for m in pkgutil.iter_modules(kernels_pallas.__path__))
ROOT = pathlib.Path(kernels_pallas.__file__).resolve().parents[1]


def test_every_kernel_module_is_listed():
    assert {"kernels_pallas.block_layout", "kernels_pallas.block_sparse_flash", "kernels_pallas.favor"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_kernel_module_imports_nothing_of_longjax(module):
    # A fresh interpreter: this one has longjax loaded already.
    code = (
        f"import sys, {module}\n"
        "loaded = sorted(n for n in sys.modules if n == 'longjax' or n.startswith('longjax.'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                            timeout=600)
    assert result.stdout.strip() == "", f"{module} loaded {result.stdout.strip()}"
