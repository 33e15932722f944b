"""Training batches for character LMs: random windows, a grain pipeline, a checkpointable iterator.

Every example is a window of `seq_len + 1` consecutive characters (inputs and
shifted targets) of one split held in memory. Example `i` of the run (global
example index: step * global_batch_size + row) starts at
`window_starts(seed, i, len(data) - seq_len)`, a pure function of the seed and
the index, so:

* batches do not depend on the number of processes, threads or restarts;
* process p of P takes rows `[p * B/P, (p+1) * B/P)` of every global batch,
  so the processes' batches are disjoint and together form the global batch;
* the iterator's whole state is the number of batches it has produced.

The pipeline is `grain.MapDataset.range(step, ...)` mapped to local batches and
prefetched by `to_iter_dataset`. `TrainIterator` wraps it with a state of its
own, `{'step': ..., ...}`, rather than exposing grain's iterator state, which
grain documents as free to change between versions; restoring rebuilds the
grain pipeline at the saved step.

Checkpointing through orbax: the state is the same on every process, so it
is saved once, as JSON, next to the train state, and every process restores it::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=ocp.args.JsonSave(iterator.get_state())))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    iterator.set_state(restored['data'])

`TrainIterator` is not a grain `DatasetIterator`, so grain's orbax handler
(`grain.checkpoint.CheckpointSave`/`CheckpointRestore`, one file per process
holding grain's internal state) does not apply; the JSON state above is
version-independent and also restores on a different number of processes.

A training phase changes seq_len and the batch size: build a new iterator per
phase, with its own state and preferably its own seed (e.g. seed + phase),
so that phases do not revisit the same sequence of window starts.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

try:
    _ReadOptions = grain.ReadOptions
except AttributeError:  # grain releases that export it only under grain.python
    import grain.python

    _ReadOptions = grain.python.ReadOptions

STATE_VERSION = 1
# The pipeline is indexed by step; this bound is never reached in practice.
_MAX_STEPS = 1 << 62
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 with good avalanche (wraps mod 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def window_starts(seed: int, example_indices, num_starts: int) -> np.ndarray:
    """The start of each example's window: a pure function of (seed, global example index).

    Example i gets the i-th output of a SplitMix64 stream keyed by the seed, reduced
    modulo `num_starts` (the bias is below num_starts / 2**64). Plain integer
    arithmetic, so the windows are the same on every platform and numpy version.

    Args:
      seed: 0 <= seed < 2**64.
      example_indices: non-negative integers `[n]`.
      num_starts: number of possible starts, `len(data) - seq_len`.

    Returns:
      int64 `[n]` in `[0, num_starts)`.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if num_starts < 1:
        raise ValueError(f"num_starts must be positive, got {num_starts}")
    idx = np.asarray(example_indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or (idx.size and idx.min() < 0):
        raise ValueError(f"example_indices must be non-negative integers [n], got {idx.dtype} {idx.shape}")
    key = _mix64(np.array([seed], np.uint64))
    with np.errstate(over="ignore"):
        counters = key + (idx.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        return (_mix64(counters) % np.uint64(num_starts)).astype(np.int64)


class _LocalBatch:
    """Step -> this process's rows of the global batch at that step."""

    def __init__(self, data, seq_len, global_batch_size, seed, first_row, local_batch_size):
        self._windows = np.lib.stride_tricks.sliding_window_view(data, seq_len + 1)
        self._num_starts = len(data) - seq_len
        self._global_batch_size = global_batch_size
        self._seed = seed
        self._rows = first_row + np.arange(local_batch_size, dtype=np.int64)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        starts = window_starts(self._seed, step * self._global_batch_size + self._rows, self._num_starts)
        return {"tokens": self._windows[starts].astype(np.int32)}


class StepIterator(Iterator[dict]):
    """Batches that are a pure function of their step, prefetched by grain; checkpointable by step.

    A subclass sets, in its `__init__`, `_batch` (step -> batch), `_read_options`
    and `_identity` (what a saved state must match: seed, sizes, data
    fingerprint), then calls `StepIterator.__init__`. Its state is the step and
    that identity, so a restored iterator continues with the next batch, and a
    state saved for other data or settings is refused naming the fields.
    """

    _mismatch = "another pipeline (a new phase needs a new iterator and its own state)"

    def __init__(self):
        self._step = 0
        self._inner = None

    @property
    def step(self) -> int:
        """Number of batches produced so far (the index of the next batch)."""
        return self._step

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._inner is None:
            steps = grain.MapDataset.range(self._step, _MAX_STEPS).map(self._batch)
            self._inner = iter(steps.to_iter_dataset(self._read_options))
        batch = next(self._inner)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """`{'version', 'step'}` and the iterator's identity fields."""
        return {"version": STATE_VERSION, "step": self._step, **self._identity}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a state returned by `get_state` of an iterator over the same data and settings."""
        name = type(self).__name__
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "step" not in state:
            raise ValueError(f"state must come from {name}.get_state (version {STATE_VERSION}), got {state!r}")
        differing = [
            f"{key}: saved {state.get(key)!r}, here {value!r}"
            for key, value in self._identity.items()
            if state.get(key) != value
        ]
        if differing:
            raise ValueError(f"iterator state was saved for {self._mismatch}: " + "; ".join(differing))
        step = state["step"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"state['step'] must be a non-negative int, got {step!r}")
        self.close()
        self._step = step

    def close(self) -> None:
        """Stops the prefetch threads; the iterator restarts them if advanced again."""
        if self._inner is not None and hasattr(self._inner, "close"):
            self._inner.close()
        self._inner = None


class TrainIterator(StepIterator):
    """Batches `{'tokens': int32 [local_batch, seq_len + 1]}`, forever, resumable.

    `get_state()` is a small JSON-serialisable dict, identical on every process;
    `set_state(state)` makes the iterator continue with exactly the batches an
    uninterrupted iterator would have produced after saving it. A state saved
    with another seed, sequence length, global batch size or data is refused.
    """

    def __init__(
        self,
        data: np.ndarray,
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        process_index: int,
        process_count: int,
        num_threads: int = 2,
        prefetch: int = 4,
    ):
        data = np.ascontiguousarray(data)
        if data.ndim != 1 or data.dtype != np.uint8:
            raise ValueError(f"data must be a 1-D uint8 array of token ids, got {data.dtype} {data.shape}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if len(data) < seq_len + 1:
            raise ValueError(
                f"data holds {len(data)} tokens, fewer than a window of seq_len + 1 = {seq_len + 1}"
            )
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(
                f"process_index must be in [0, process_count), got process_index={process_index}, "
                f"process_count={process_count}"
            )
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size must be a positive multiple of process_count={process_count}, "
                f"got {global_batch_size}"
            )
        if num_threads < 1 or prefetch < 1:
            raise ValueError(f"num_threads and prefetch must be positive, got {num_threads}, {prefetch}")
        window_starts(seed, np.zeros(1, np.int64), 1)  # validates the seed now, not at the first batch
        local = global_batch_size // process_count
        self._batch = _LocalBatch(data, seq_len, global_batch_size, seed, process_index * local, local)
        self._read_options = _ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._identity = {
            "seed": int(seed),
            "seq_len": int(seq_len),
            "global_batch_size": int(global_batch_size),
            "data_length": len(data),
            "data_crc32": zlib.crc32(data),
        }
        super().__init__()


def make_train_iterator(
    data: np.ndarray,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
) -> TrainIterator:
    """Random windows of one split, batched and sharded per process.

    Args:
      data: token ids of the split, uint8 `[chars]` (e.g. `Corpus.train`).
      seq_len: model sequence length; each example has seq_len + 1 tokens.
      global_batch_size: examples per step over all processes.
      seed: 0 <= seed < 2**64; with the global example index it fixes every window.
      process_index, process_count: this process's share of every batch; default
        `jax.process_index()` and `jax.process_count()`.
      num_threads, prefetch: grain's read threads and number of batches prefetched.

    Returns:
      A `TrainIterator` of `{'tokens': int32 [global_batch_size // process_count, seq_len + 1]}`.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return TrainIterator(
        data,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_threads=num_threads,
        prefetch=prefetch,
    )
