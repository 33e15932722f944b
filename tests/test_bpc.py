"""The Transformer-XL evaluation protocol: each character scored once, against brute force."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from longjax.bpc import evaluate_bpc, plan_windows
from tests.attention.battery import TOLERANCES

VOCAB = 4


def _check_plan(n, eval_len, step):
    windows = plan_windows(n, eval_len=eval_len, step=step)
    width = min(eval_len + 1, n)
    scored = np.zeros(n, np.int64)
    for i, (start, end, first) in enumerate(windows):
        assert 0 <= start and end <= n and end - start == width
        assert start < first < end
        if i == 0:
            assert (start, first) == (0, 1)
        scored[first:end] += 1
        # Context of each scored position p: the characters start..p-1.
        p = np.arange(first, end)
        assert np.all(p - start >= np.minimum(p, eval_len - step + 1))
    assert scored[0] == 0 and np.all(scored[1:] == 1)
    assert windows[-1].end == n
    assert len(windows) == 1 + -(-max(0, n - 1 - eval_len) // step)


@given(n=st.integers(2, 300), eval_len=st.integers(1, 64), data=st.data())
def test_plan_scores_every_character_once_with_enough_context(n, eval_len, data):
    step = data.draw(st.integers(1, eval_len))
    _check_plan(n, eval_len, step)


@pytest.mark.parametrize(
    "n, eval_len, step", [(2, 1, 1), (10, 9, 3), (11, 9, 3), (12, 9, 3), (10, 20, 5), (100, 10, 10)]
)
def test_plan_edge_cases(n, eval_len, step):
    _check_plan(n, eval_len, step)


def test_plan_paper_setting_on_a_5m_split():
    n, eval_len, step = 5_000_000, 32_256, 512
    windows = np.array(plan_windows(n, eval_len=eval_len, step=step))
    assert len(windows) == 1 + math.ceil((n - 1 - eval_len) / step)
    assert np.all(windows[:, 1] - windows[:, 0] == eval_len + 1)
    # Scored ranges [first, end) follow each other without gap or overlap from 1 to n.
    assert windows[0, 2] == 1 and windows[-1, 1] == n
    np.testing.assert_array_equal(windows[1:, 2], windows[:-1, 1])
    assert np.all(windows[1:-1, 1] - windows[1:-1, 2] == step)


@pytest.mark.parametrize("kwargs, message", [
    (dict(text_length=1, eval_len=4, step=2), "text_length"),
    (dict(text_length=10, eval_len=0, step=1), "eval_len"),
    (dict(text_length=10, eval_len=4, step=5), "step"),
    (dict(text_length=10, eval_len=4, step=0), "step"),
])
def test_plan_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_windows(**kwargs)


def count_model_log_probs(tokens):
    """Toy LM: p(v | prefix) = (count of v in the prefix + 1) / (len(prefix) + VOCAB).

    The prefix is everything before the position in the same row, so the log-probs
    depend on the whole in-window context and on its length. `[b, n] -> [b, n - 1]`.
    """
    one_hot = jax.nn.one_hot(tokens, VOCAB, dtype=jnp.float32)
    counts = jnp.cumsum(one_hot, axis=1)[:, :-1]  # counts in tokens[:, :t], t = 1..n-1
    seen = jnp.take_along_axis(counts, tokens[:, 1:, None], axis=2)[..., 0]
    length = jnp.arange(1, tokens.shape[1], dtype=jnp.float32)
    return jnp.log((seen + 1.0) / (length + VOCAB))


jitted_count_model = jax.jit(count_model_log_probs)


def brute_force_bits(text, eval_len, step):
    """Bits of each position p >= 1 scored on its own, with the protocol's context in closed form."""
    n, total = len(text), 0.0
    for p in range(1, n):
        if p <= eval_len:
            context_start = 0
        else:
            window_last = min(eval_len + step * math.ceil((p - eval_len) / step), n - 1)
            context_start = window_last - eval_len
        prefix = text[context_start:p]
        total -= math.log2((np.count_nonzero(prefix == text[p]) + 1) / (len(prefix) + VOCAB))
    return total


def _text(n, seed=0):
    # Skewed symbol frequencies: the longer the context, the better the counts predict.
    return np.random.default_rng(seed).choice(VOCAB, size=n, p=[0.7, 0.1, 0.1, 0.1]).astype(np.uint8)


@pytest.mark.parametrize("n, eval_len, step, batch_size", [
    (257, 32, 8, 3),   # windows not a multiple of the batch: padded last batch
    (257, 32, 32, 4),  # step == eval_len: no overlap
    (200, 16, 5, 1),
    (30, 64, 8, 2),    # text shorter than one window
    (33, 32, 8, 2),    # exactly one full window
    (34, 32, 8, 2),    # one character past it
])
def test_evaluate_bpc_equals_brute_force(n, eval_len, step, batch_size):
    text = _text(n)
    result = evaluate_bpc(jitted_count_model, text, eval_len=eval_len, step=step, batch_size=batch_size)
    expected = brute_force_bits(text, eval_len, step)
    assert result.num_scored == n - 1
    np.testing.assert_allclose(result.total_bits, expected, **TOLERANCES[jnp.dtype(jnp.float32)])
    assert result.bpc == result.total_bits / result.num_scored


def test_context_length_matters_for_the_toy_model():
    # Guards the test above: with a model blind to context, any plan would pass it.
    text = _text(400)
    short, long = (evaluate_bpc(jitted_count_model, text, eval_len=L, step=4).bpc for L in (8, 128))
    assert long < short - 0.05
    # A plan with other windows would miss the brute force by far more than the tolerance.
    right = brute_force_bits(text, 128, 4)
    rtol = TOLERANCES[jnp.dtype(jnp.float32)]["rtol"]
    for wrong in (brute_force_bits(text, 128, 8), brute_force_bits(text, 127, 4)):
        assert abs(wrong - right) > 10 * rtol * right


def test_jitted_model_is_traced_once_and_batches_are_full():
    shapes = []

    @jax.jit
    def log_prob_fn(tokens):
        shapes.append(tokens.shape)  # runs at trace time only
        return count_model_log_probs(tokens)

    text = _text(300)
    evaluate_bpc(log_prob_fn, text, eval_len=32, step=8, batch_size=4)
    assert shapes == [(4, 33)]


def test_batch_size_does_not_change_the_result():
    text = _text(300)
    results = [evaluate_bpc(jitted_count_model, text, eval_len=32, step=8, batch_size=b) for b in (1, 5, 64)]
    for r in results[1:]:
        assert r.num_scored == results[0].num_scored
        np.testing.assert_allclose(r.total_bits, results[0].total_bits, **TOLERANCES[jnp.dtype(jnp.float32)])


def test_bad_model_output_and_data_are_refused():
    text = _text(100)
    with pytest.raises(ValueError, match=r"log_prob_fn must return \[batch, n - 1\]"):
        evaluate_bpc(lambda t: np.zeros(t.shape), text, eval_len=16, step=4)
    with pytest.raises(ValueError, match="data must be a 1-D integer array"):
        evaluate_bpc(count_model_log_probs, text.astype(np.float32), eval_len=16, step=4)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_bpc(count_model_log_probs, text, eval_len=16, step=4, batch_size=0)
