"""HotpotQA task pieces: the span decoder's rules, both stages' losses by hand, the three-part head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import models
from longjax.tasks import hotpotqa


def test_best_answer_span_rules():
    start = np.array([0.0, 5.0, 1.0, 0.0, 4.0, 0.0])
    end = np.array([0.0, 0.0, 3.0, 6.0, 0.0, 2.0])
    context = np.array([False, True, True, True, True, True])
    paragraph = np.array([1, 1, 1, 2, 2, 2])
    # The best pair overall (1, 3) crosses into paragraph 2; within a paragraph: (1, 2) scores 8, (4, 5) 6.
    assert hotpotqa.best_answer_span(start, end, context, paragraph, n_best=6, max_answer_len=30) == (1, 2)
    # Without the paragraph rule (one paragraph), (1, 3) wins; at most 2 tokens, (1, 2) again.
    one = np.ones(6, int)
    assert hotpotqa.best_answer_span(start, end, context, one, n_best=6, max_answer_len=30) == (1, 3)
    assert hotpotqa.best_answer_span(start, end, context, one, n_best=6, max_answer_len=2) == (1, 2)
    # Only the single best start and end: (1, 3) crosses paragraphs, so nothing qualifies.
    assert hotpotqa.best_answer_span(start, end, context, paragraph, n_best=1, max_answer_len=30) is None
    assert hotpotqa.best_answer_span(start, end, np.zeros(6, bool), one, n_best=6, max_answer_len=30) is None


def test_occurrence_loss_counts_a_shared_token_once():
    from longjax.tasks import triviaqa

    logits = jnp.asarray([[0.0, 2.0, 1.0, -1.0]])
    valid = jnp.asarray([[False, True, True, True]])
    loss = triviaqa.occurrence_loss(logits, jnp.asarray([[1, 1, 2, -1]]), valid)
    expected = np.log(np.exp([2.0, 1.0, -1.0]).sum()) - np.log(np.exp([2.0, 1.0]).sum())
    # A difference of two float32 log-sum-exps near 2: absolute, not relative, precision.
    np.testing.assert_allclose(loss, [expected], atol=1e-6)
    assert float(loss[0]) > 0  # a probability of at most 1, even with the repeat


class _Fixed:
    """A stand-in model whose outputs are given, so the task's loss can be checked by hand."""

    def __init__(self, outputs):
        self.outputs = outputs

    def apply(self, params, tokens, **kwargs):
        return self.outputs


def _bce(logit, label):
    return float(np.log1p(np.exp(-logit)) if label else np.log1p(np.exp(logit)))


def test_stage_1_loss_is_the_paragraph_bce_over_labelled_slots():
    scores = jnp.asarray([[0.0, 2.0, -1.0, 0.5, 0.0, 0.0]])
    batch = {"input_ids": jnp.zeros((1, 6), jnp.int32), "padding_mask": jnp.ones((1, 6), bool),
             "global_mask": jnp.zeros((1, 6), bool), "paragraph_positions": jnp.asarray([[1, 2, 3, -1]]),
             "paragraph_labels": jnp.asarray([[1, 0, 1, -1]])}
    loss, _ = hotpotqa.TASK.loss(_Fixed({"token_scores": scores}), None, batch, step=0, dropout_key=None)
    expected = (_bce(2.0, 1) + _bce(-1.0, 0) + _bce(0.5, 1)) / 3
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_stage_2_loss_sums_span_type_and_supporting_fact_losses():
    start = np.array([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    end = np.array([[0.0, 0.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    type_logits = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    token_scores = np.array([[0.0, 0.5, 0.0, -0.5], [1.0, 0.0, 0.0, 0.0]])
    outputs = {"start_logits": jnp.asarray(start), "end_logits": jnp.asarray(end),
               "type_logits": jnp.asarray(type_logits), "token_scores": jnp.asarray(token_scores)}
    context = np.array([[False, True, True, True], [False, True, True, True]])
    batch = {
        "input_ids": jnp.zeros((2, 4), jnp.int32), "padding_mask": jnp.ones((2, 4), bool),
        "global_mask": jnp.zeros((2, 4), bool), "context_mask": jnp.asarray(context),
        # Row 0: a span answer occurring at (1, 3) and (2, 3); row 1: "yes" (no span).
        "answer_starts": jnp.asarray([[1, 2], [-1, -1]]), "answer_ends": jnp.asarray([[3, 3], [-1, -1]]),
        "answer_type": jnp.asarray([0, 1]),
        "sentence_positions": jnp.asarray([[1, 3], [0, -1]]), "sentence_labels": jnp.asarray([[1, 0], [0, -1]]),
    }
    loss, parts = hotpotqa.TASK.loss(_Fixed(outputs), None, batch, step=0, dropout_key=None)

    def lse(values):
        return float(np.log(np.sum(np.exp(values))))

    # The two occurrences share their end token, which counts once.
    span = (lse(start[0, 1:]) - lse(start[0, [1, 2]]) + lse(end[0, 1:]) - end[0, 3]) / 2
    kinds = [lse(type_logits[0]) - type_logits[0, 0], lse(type_logits[1]) - type_logits[1, 1]]
    sp = (_bce(0.5, 1) + _bce(-0.5, 0) + _bce(1.0, 0)) / 3
    np.testing.assert_allclose(parts["span_loss"], span, rtol=1e-5)
    np.testing.assert_allclose(parts["type_loss"], np.mean(kinds), rtol=1e-5)
    np.testing.assert_allclose(parts["sp_loss"], sp, rtol=1e-5)
    np.testing.assert_allclose(loss, span + np.mean(kinds) + sp, rtol=1e-5)


def test_the_three_part_head():
    config = models.transformer_config(dict(vocab_size=30, num_layers=1, num_heads=2, d_model=8, d_ff=16,
                                            position="learned", max_positions=20, attention=dict(type="full")))
    model = models.EncoderWithHead(config, head="span_type_and_tokens", num_labels=3)
    tokens = jnp.ones((2, 6), jnp.int32)
    params = model.init(jax.random.key(0), tokens)
    out = model.apply(params, tokens)
    assert out["start_logits"].shape == out["end_logits"].shape == out["token_scores"].shape == (2, 6)
    assert out["type_logits"].shape == (2, 3)
    assert set(params["params"]["head"]) == {"span", "type", "tokens"}
    with pytest.raises(ValueError, match="head must be one of"):
        models.EncoderWithHead(config, head="spans").init(jax.random.key(0), tokens)
