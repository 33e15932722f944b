"""Training batches of fixed-shape examples (fine-tuning features): shuffled epochs, resumable, sharded per process.

A feature table is a dict of NumPy arrays with the same leading length N
(one row per example: token ids, masks, labels). Example i of the run (global
example index: step * global_batch_size + row) is row
`epoch_order(seed, i // N)[i % N]`: every epoch visits every row once, in an
order that is a pure function of (seed, epoch). So, as for the character LM's
windows (`longjax.data.pipeline`):

* batches do not depend on the number of processes, threads or restarts;
* process p of P takes rows `[p * B/P, (p+1) * B/P)` of every global batch;
* the iterator's whole state is the number of batches it has produced.

A task may transform each batch as a pure function of the rows and their
global example indices (the masked LM draws each example's mask from its
index), which keeps resumption exact.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping

import numpy as np

from longjax.data import pipeline


Transform = Callable[[dict[str, np.ndarray], np.ndarray], dict[str, np.ndarray]]


def table_length(features: Mapping[str, np.ndarray], name: str = "features") -> int:
    """The common leading length of a feature table; ValueError naming `name` when the arrays disagree."""
    if not features:
        raise ValueError(f"{name} must hold at least one array")
    lengths = {key: np.shape(value)[0] if np.ndim(value) else None for key, value in features.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
        raise ValueError(f"{name}: every array needs the same leading length (one row per example), got {lengths}")
    return next(iter(lengths.values()))


def fingerprint(features: Mapping[str, np.ndarray]) -> str:
    """A CRC32 over the table's keys, shapes, dtypes and bytes: names its content in checkpoints."""
    crc = 0
    for key in sorted(features):
        array = np.ascontiguousarray(features[key])
        crc = zlib.crc32(f"{key}:{array.dtype.str}:{array.shape};".encode(), crc)
        crc = zlib.crc32(array.view(np.uint8).reshape(-1), crc)
    return f"{crc:08x}"


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the rows: a permutation, a pure function of (seed, epoch)."""
    return np.random.Generator(np.random.Philox(key=[seed & (2**64 - 1), epoch])).permutation(num_examples)


def example_rows(seed: int, example_indices: np.ndarray, num_examples: int) -> np.ndarray:
    """The table row of each global example index (int64 `[n]`)."""
    idx = np.asarray(example_indices, np.int64)
    rows = np.empty_like(idx)
    epochs = idx // num_examples
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        rows[chosen] = epoch_order(seed, int(epoch), num_examples)[idx[chosen] % num_examples]
    return rows


class _LocalBatch:
    def __init__(self, features, global_batch_size, seed, first_row, local_batch_size, transform):
        self._features = features
        self._num = table_length(features)
        self._global_batch_size = global_batch_size
        self._seed = seed
        self._rows = first_row + np.arange(local_batch_size, dtype=np.int64)
        self._transform = transform

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        indices = step * self._global_batch_size + self._rows
        rows = example_rows(self._seed, indices, self._num)
        batch = {key: np.asarray(value[rows]) for key, value in self._features.items()}
        return batch if self._transform is None else self._transform(batch, indices)


class ExampleIterator(pipeline.StepIterator):
    """This process's rows of every global batch of a feature table, forever (epoch after epoch), resumable.

    `get_state()` is a small JSON dict, the same on every process;
    `set_state(state)` continues with exactly the batches an uninterrupted
    iterator would have produced. A state saved with another seed, batch
    size or table is refused.
    """

    _mismatch = "another table or settings"

    def __init__(self, features: Mapping[str, np.ndarray], *, global_batch_size: int, seed: int,
                 process_index: int, process_count: int, transform: Transform | None = None,
                 num_threads: int = 2, prefetch: int = 4):
        features = {key: np.asarray(value) for key, value in features.items()}
        num = table_length(features)
        if num < 1:
            raise ValueError("features holds no example")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, process_count), got {process_index}, {process_count}")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size must be a positive multiple of process_count={process_count}, "
                f"got {global_batch_size}"
            )
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        local = global_batch_size // process_count
        self._batch = _LocalBatch(features, global_batch_size, seed, process_index * local, local, transform)
        self._read_options = pipeline._ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._identity = {
            "seed": int(seed), "global_batch_size": int(global_batch_size), "num_examples": num,
            "features": fingerprint(features),
        }
        super().__init__()


def make_example_iterator(features: Mapping[str, np.ndarray], *, global_batch_size: int, seed: int,
                          transform: Transform | None = None, process_index: int | None = None,
                          process_count: int | None = None) -> ExampleIterator:
    """An `ExampleIterator` for this process (default `jax.process_index()` of `jax.process_count()`).

    Args:
      features: the table, arrays `[num_examples, ...]`.
      global_batch_size: examples per step over all processes.
      seed: fixes every epoch's order (and whatever `transform` draws).
      transform: `transform(batch, global_example_indices) -> batch`, pure.

    Returns:
      Batches: the table's arrays with `global_batch_size // process_count` rows.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return ExampleIterator(features, global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                           process_count=process_count, transform=transform)
