"""Test-wide settings: a fixed hypothesis profile, so property tests are reproducible, and one
XLA compilation cache shared by the test processes of a run.

The training tests compile the same step programs again and again: every run of
a config in the same process, every resume, and every subprocess of the
command-line tests. JAX's persistent compilation cache keys a program by its
HLO, options and backend, so a hit returns the executable the first compile
made. The cache lives in a temporary directory made for this run (shared by the
pytest-xdist workers and the subprocesses through the environment) and removed
when the run ends; a directory given in JAX_COMPILATION_CACHE_DIR is used as is.
"""

import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings

settings.register_profile(
    "longjax",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("longjax")

# Set before jax is imported; xdist workers and subprocesses inherit it from this process.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="longjax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
