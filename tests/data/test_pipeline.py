"""The training pipeline: windows fixed by (seed, example index), sharding, exact resume."""

from __future__ import annotations

import numpy as np
import pytest

from longjax.data import pipeline
from longjax.data.pipeline import make_train_iterator, window_starts

SEQ_LEN, GLOBAL_BATCH = 31, 8


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(0).integers(0, 256, size=5_000, dtype=np.uint8)


def _iterator(data, seed=3, **kwargs):
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return make_train_iterator(data, seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=seed, **kwargs)


def _take(iterator, count):
    batches = [next(iterator)["tokens"] for _ in range(count)]
    iterator.close()
    return batches


def test_batches_are_windows_chosen_by_seed_and_example_index(data):
    batches = _take(_iterator(data), 3)
    for step, tokens in enumerate(batches):
        assert tokens.shape == (GLOBAL_BATCH, SEQ_LEN + 1) and tokens.dtype == np.int32
        indices = step * GLOBAL_BATCH + np.arange(GLOBAL_BATCH)
        starts = window_starts(3, indices, len(data) - SEQ_LEN)
        np.testing.assert_array_equal(tokens, data[starts[:, None] + np.arange(SEQ_LEN + 1)])


def test_window_start_is_a_pure_function_of_seed_and_index():
    many = window_starts(7, np.arange(1000), 4321)
    alone = [window_starts(7, np.array([i]), 4321)[0] for i in (0, 17, 999)]
    assert alone == [many[0], many[17], many[999]]
    assert not np.array_equal(many, window_starts(8, np.arange(1000), 4321))
    # Large seeds and indices stay in range and do not wrap into errors.
    big = window_starts(2**64 - 1, np.array([2**62, 0]), 10)
    assert big.dtype == np.int64 and np.all((0 <= big) & (big < 10))


def test_window_starts_cover_the_split_evenly():
    starts = window_starts(0, np.arange(20_000), 1_000)
    assert starts.min() == 0 and starts.max() == 999
    counts = np.bincount(starts // 100, minlength=10)
    # 2,000 expected per bin, standard deviation about 42.
    assert np.all(np.abs(counts - 2_000) < 200), counts


def test_same_seed_same_batches_other_seed_other_batches(data):
    first, again, other = (_take(_iterator(data, seed=s), 4) for s in (3, 3, 4))
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(np.stack(first), np.stack(other))


def test_two_processes_split_the_global_batch(data):
    whole = _take(_iterator(data), 3)
    halves = [_take(_iterator(data, process_index=p, process_count=2), 3) for p in (0, 1)]
    for step in range(3):
        assert halves[0][step].shape == (GLOBAL_BATCH // 2, SEQ_LEN + 1)
        np.testing.assert_array_equal(np.concatenate([halves[0][step], halves[1][step]]), whole[step])


def test_resume_from_state_continues_exactly(data):
    reference = _take(_iterator(data), 8)
    interrupted = _iterator(data)
    for step in range(3):
        np.testing.assert_array_equal(next(interrupted)["tokens"], reference[step])
    state = interrupted.get_state()
    interrupted.close()
    assert state["step"] == 3
    resumed = _iterator(data)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(resumed, 5)), np.stack(reference[3:]))


def test_state_restores_on_another_process_count(data):
    reference = _take(_iterator(data), 4)
    single = _iterator(data)
    _take(single, 2)
    state = single.get_state()
    for p in (0, 1):
        shard = _iterator(data, process_index=p, process_count=2)
        shard.set_state(state)
        rows = slice(p * GLOBAL_BATCH // 2, (p + 1) * GLOBAL_BATCH // 2)
        np.testing.assert_array_equal(np.stack(_take(shard, 2)), np.stack(reference[2:])[:, rows])


def test_resume_through_orbax_checkpoint_manager(data, tmp_path):
    import orbax.checkpoint as ocp

    reference = _take(_iterator(data), 6)
    iterator = _iterator(data)
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        for step in range(1, 5):
            next(iterator)
            manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave({"w": np.full(3, step, np.float32)}),
                    data=ocp.args.JsonSave(iterator.get_state()),
                ),
            )
        manager.wait_until_finished()
        # Advancing after the save does not change what was saved.
        next(iterator)
    iterator.close()
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        assert manager.all_steps() == [3, 4]
        restored = manager.restore(4, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    resumed = _iterator(data)
    resumed.set_state(restored["data"])
    assert resumed.step == 4
    np.testing.assert_array_equal(np.stack(_take(resumed, 2)), np.stack(reference[4:]))


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(seed=4), "seed"),
        (dict(seq_len=SEQ_LEN * 2), "seq_len"),
        (dict(global_batch_size=GLOBAL_BATCH // 2), "global_batch_size"),
        (dict(data_changed=True), "data_crc32"),
    ],
)
def test_state_of_another_pipeline_is_refused(data, change, field):
    state = _iterator(data).get_state()
    kwargs = dict(seed=3, seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, process_index=0, process_count=1)
    change = dict(change)
    source = data
    if change.pop("data_changed", False):
        source = data.copy()
        source[100] ^= 1
    kwargs.update(change)
    other = make_train_iterator(source, **kwargs)
    with pytest.raises(ValueError, match=field):
        other.set_state(state)
    with pytest.raises(ValueError, match="state must come from"):
        other.set_state({"step": 3})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_len=0), "seq_len must be positive"),
        (dict(seq_len=5_000), "fewer than a window"),
        (dict(global_batch_size=6, process_count=4, process_index=0), "multiple of process_count"),
        (dict(process_index=2, process_count=2), "process_index must be in"),
        (dict(seed=-1), "seed must be in"),
    ],
)
def test_bad_arguments_name_the_argument(data, kwargs, message):
    full = dict(seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=0, process_index=0, process_count=1)
    full.update(kwargs)
    with pytest.raises(ValueError, match=message):
        make_train_iterator(data, **full)
    with pytest.raises(ValueError, match="uint8"):
        make_train_iterator(data.astype(np.int32), seq_len=4, global_batch_size=2, seed=0)


def test_defaults_come_from_jax_processes(data):
    iterator = make_train_iterator(data, seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=3)
    np.testing.assert_array_equal(_take(iterator, 1)[0], _take(_iterator(data), 1)[0])
    assert pipeline.STATE_VERSION == iterator.get_state()["version"]
