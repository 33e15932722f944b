"""The coreference head against the span-ranking formulas written out in NumPy, and its loss by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.models import coref, transformer_config

D, L = 8, 20


def _head(**overrides):
    encoder = transformer_config(dict(vocab_size=40, num_layers=1, num_heads=2, d_model=D, d_ff=16,
                                      position="learned", max_positions=30, attention=dict(type="full")))
    head = coref.CorefHeadConfig(**{**dict(max_span_width=4, top_span_ratio=0.4, max_top_antecedents=3,
                                           ffnn_size=6, feature_size=3, dropout=0.0), **overrides})
    return coref.CorefHead(encoder, head), head


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(1, L, D)).astype(np.float32)
    padding = np.arange(L)[None] < 17
    sentence_map = np.where(padding, np.array([0] * 5 + [1] * 7 + [2] * 8)[None], -1)
    speakers = np.where(padding, (np.arange(L)[None] >= 9) + 1, 0).astype(np.int32)
    return dict(hidden=jnp.asarray(hidden), padding_mask=jnp.asarray(padding),
                sentence_map=jnp.asarray(sentence_map, jnp.int32), speaker_ids=jnp.asarray(speakers),
                genre=jnp.asarray([3], jnp.int32))


def _relu(x):
    return np.maximum(x, 0)


def _numpy_model(p, x, head):
    """The span embedding, mention score and antecedent score of the papers, from the parameters."""
    h = np.asarray(x["hidden"][0], np.float64)
    a = h @ np.asarray(p["head_attention"]["kernel"])[:, 0] + float(p["head_attention"]["bias"][0])
    width = np.asarray(p["span_width"]["embedding"])

    def ffnn(q, v):
        return float(_relu(v @ np.asarray(q["hidden_0"]["kernel"]) + np.asarray(q["hidden_0"]["bias"]))
                     @ np.asarray(q["out"]["kernel"])[:, 0] + float(q["out"]["bias"][0]))

    def g(s, e):
        weights = np.exp(a[s:e + 1] - a[s:e + 1].max())
        weights /= weights.sum()
        return np.concatenate([h[s], h[e], weights @ h[s:e + 1], width[e - s]])

    def mention(s, e):
        width_prior = ffnn(p["width_prior"], np.asarray(p["width_prior_embedding"]["embedding"])[e - s])
        return ffnn(p["mention"], g(s, e)) + width_prior

    def antecedent(i_span, j_span, distance, same_speaker):
        gi, gj = g(*i_span), g(*j_span)
        coarse = (gi @ np.asarray(p["coarse"]["kernel"]) + np.asarray(p["coarse"]["bias"])) @ gj
        phi = np.concatenate([np.asarray(p["same_speaker"]["embedding"])[int(same_speaker)],
                              np.asarray(p["genre"]["embedding"])[int(x["genre"][0])],
                              np.asarray(p["distance"]["embedding"])[distance]])
        fine = ffnn(p["antecedent"], np.concatenate([gi, gj, gi * gj, phi]))
        distance_prior = (np.asarray(p["distance_prior_embedding"]["embedding"])[distance]
                          @ np.asarray(p["distance_prior"]["kernel"])[:, 0] + float(p["distance_prior"]["bias"][0]))
        return mention(*i_span) + mention(*j_span) + coarse + distance_prior + fine

    return mention, antecedent


def test_distance_buckets():
    distances = jnp.asarray([0, 1, 4, 5, 7, 8, 15, 16, 31, 32, 63, 64, 1000])
    assert coref.distance_bucket(distances).tolist() == [0, 1, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]


def test_kept_spans_are_the_best_candidates_and_score_as_the_formulas():
    module, head = _head()
    x = _inputs()
    params = module.init(jax.random.key(1), **x, deterministic=True)
    # Weights of unit scale (the head's own initialisation is 0.02, under which a missing term, the priors'
    # say, would hide inside the tolerances).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    out = module.apply(params, **x, deterministic=True)
    p = jax.tree.map(np.asarray, params["params"])
    mention, antecedent = _numpy_model(p, x, head)
    sentence = np.asarray(x["sentence_map"][0])
    candidates = {(s, e): mention(s, e) for s in range(17) for e in range(s, min(s + head.max_span_width, 17))
                  if sentence[s] == sentence[e]}
    keep = int(np.floor(head.top_span_ratio * 17))
    best = sorted(candidates, key=candidates.get, reverse=True)[:keep]
    mask = np.asarray(out["span_mask"][0])
    kept = [(int(s), int(e)) for s, e, m in zip(out["span_starts"][0], out["span_ends"][0], mask) if m]
    assert mask.sum() == keep and len(mask) == head.kept_spans(L)
    assert kept == sorted(best)  # the best spans, in (start, end) order
    np.testing.assert_allclose(np.asarray(out["mention_scores"][0])[mask], [candidates[s] for s in kept], rtol=1e-4,
                               atol=1e-5)
    # Antecedents: earlier kept spans only, each score the coarse plus fine formula; the dummy scores 0.
    speakers = np.asarray(x["speaker_ids"][0])
    scores, antecedents = np.asarray(out["antecedent_scores"][0]), np.asarray(out["antecedents"][0])
    antecedent_mask = np.asarray(out["antecedent_mask"][0])
    assert np.all(scores[:, 0] == 0)
    for i in range(keep):
        assert antecedent_mask[i].sum() == min(i, head.max_top_antecedents)
        for c in np.flatnonzero(antecedent_mask[i]):
            j = int(antecedents[i, c])
            assert j < i
            expected = antecedent(kept[i], kept[j], int(coref.distance_bucket(i - j)),
                                  speakers[kept[i][0]] == speakers[kept[j][0]])
            np.testing.assert_allclose(scores[i, c + 1], expected, rtol=1e-4, atol=1e-4)
        assert np.all(np.isneginf(scores[i, 1:][~antecedent_mask[i]]))


def test_gold_antecedents_and_the_marginal_likelihood_by_hand():
    outputs = {
        "span_starts": jnp.asarray([[0, 2, 5, 7]]), "span_ends": jnp.asarray([[0, 3, 5, 8]]),
        "span_mask": jnp.asarray([[True, True, True, False]]),
        "antecedents": jnp.asarray([[[0, 0], [0, 0], [0, 1], [0, 1]]]),
        "antecedent_mask": jnp.asarray([[[False, False], [True, False], [True, True], [True, True]]]),
        "antecedent_scores": jnp.asarray([[[0.0, -jnp.inf, -jnp.inf], [0.0, 1.0, -jnp.inf], [0.0, 2.0, -1.0],
                                           [0.0, 5.0, 5.0]]]),
    }
    # Gold: (0,0) and (5,5) corefer; (2,3) is a mention of another cluster; (7,8) is gold but not kept.
    gold = coref.gold_antecedents(outputs, jnp.asarray([[0, 5, 2, 7]]), jnp.asarray([[0, 5, 3, 8]]),
                                  jnp.asarray([[1, 1, 2, 2]]))
    assert gold[0].tolist() == [[True, False, False], [True, False, False], [False, True, False],
                                [True, False, False]]
    loss = coref.marginal_log_likelihood(outputs, gold)
    # Span 0: only the dummy, loss 0. Span 1: the dummy against one antecedent of score 1. Span 2: the first antecedent.
    expected = np.log(1 + np.e) + (np.log(1 + np.exp(2.0) + np.exp(-1.0)) - 2.0)
    np.testing.assert_allclose(loss, [expected], rtol=1e-6)


def test_the_coreference_model_config_carries_the_head_section():
    encoder = transformer_config(dict(vocab_size=40, num_layers=1, num_heads=2, d_model=D, d_ff=16,
                                      attention=dict(type="full")))
    config = coref.CorefModelConfig(**{f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)},
                                    coref=coref.CorefHeadConfig(max_span_width=7))
    assert config.coref.max_span_width == 7 and config.coref.kept_spans(4096) == 1639
    with pytest.raises(Exception, match="model.coref.top_span_ratio"):
        coref.CorefHeadConfig(top_span_ratio=1.5)
