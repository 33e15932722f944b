"""Batches of a feature table: every epoch visits every row once, shares split by process, resume exact."""

import numpy as np
import pytest

from longjax.data import examples


def _table(n=10):
    return {"x": np.arange(n, dtype=np.int32)[:, None].repeat(3, 1), "y": np.arange(n) % 2}


def test_each_epoch_is_a_permutation_and_processes_split_the_batch():
    whole = examples.ExampleIterator(_table(), global_batch_size=5, seed=3, process_index=0, process_count=1)
    rows = np.concatenate([next(whole)["x"][:, 0] for _ in range(4)])
    whole.close()
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert list(rows[:10]) != list(rows[10:])
    halves = [examples.ExampleIterator(_table(), global_batch_size=6, seed=3, process_index=p, process_count=2)
              for p in (0, 1)]
    one = examples.ExampleIterator(_table(), global_batch_size=6, seed=3, process_index=0, process_count=1)
    joined = np.concatenate([next(h)["x"] for h in halves])
    np.testing.assert_array_equal(joined, next(one)["x"])


def test_resume_continues_exactly_and_refuses_another_table():
    it = examples.ExampleIterator(_table(), global_batch_size=4, seed=1, process_index=0, process_count=1)
    next(it)
    state = it.get_state()
    expected = [next(it)["x"] for _ in range(3)]
    again = examples.ExampleIterator(_table(), global_batch_size=4, seed=1, process_index=0, process_count=1)
    again.set_state(state)
    for batch in expected:
        np.testing.assert_array_equal(next(again)["x"], batch)
    other = examples.ExampleIterator(_table(11), global_batch_size=4, seed=1, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="num_examples"):
        other.set_state(state)
    for i in (it, again, other):
        i.close()


def test_transform_sees_the_global_example_indices():
    seen = []
    transform = lambda batch, indices: seen.append(indices.tolist()) or batch
    it = examples.ExampleIterator(_table(), global_batch_size=4, seed=0, process_index=1, process_count=2,
                                  transform=transform, num_threads=1)
    next(it), next(it)
    it.close()
    assert sorted(seen)[:2] == [[2, 3], [6, 7]]  # (prefetching may have made the next batch too)
