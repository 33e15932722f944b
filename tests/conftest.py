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


# The end-to-end directories first. With two workers a run ends when the last long test does:
# started first, the long training tests overlap each other and the many short tests fill the
# end, instead of one worker finishing a training test while the other idles.
_LONG_FIRST = ("tests/train/", "tests/models/", "tests/hf/")


def pytest_collection_modifyitems(items):
    def rank(item):
        return next((i for i, prefix in enumerate(_LONG_FIRST) if item.nodeid.startswith(prefix)), len(_LONG_FIRST))

    items.sort(key=rank)  # stable: a file's tests stay together, so its module fixtures are not set up again
