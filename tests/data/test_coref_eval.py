"""MUC, B-cubed and CEAF-phi4 against examples worked by hand from the metrics' papers."""

import statistics

import numpy as np
import pytest

from longjax.data import coref_eval as ce

# Bagga and Baldwin (1998), section 4: the key and the two responses whose MUC scores are equal (90% precision)
# while B-cubed tells them apart (76% and 58%).
KEY = [[1, 2, 3, 4, 5], [6, 7], [8, 9, "A", "B", "C"]]
RESPONSE_1 = [[1, 2, 3, 4, 5], [6, 7, 8, 9, "A", "B", "C"]]
RESPONSE_2 = [[1, 2, 3, 4, 5, 8, 9, "A", "B", "C"], [6, 7]]


def _pr(counts):
    return counts.precision, counts.recall


def test_muc_vilain_example():
    # Vilain et al. (1995): key {A B C D}, response {A B} {C D}: one link missing of three.
    counts = ce.muc([["A", "B", "C", "D"]], [["A", "B"], ["C", "D"]])
    assert _pr(counts) == pytest.approx((1.0, 2 / 3))


def test_muc_bagga_baldwin_examples():
    # Response 1: parts (5-1) + (7-2) over links 4 + 6; response 2: (10-2) + (2-1) over 9 + 1.
    assert _pr(ce.muc(KEY, RESPONSE_1)) == pytest.approx((9 / 10, 1.0))
    assert _pr(ce.muc(KEY, RESPONSE_2)) == pytest.approx((9 / 10, 1.0))


def test_b_cubed_bagga_baldwin_examples():
    # Response 1: (5 * 5/5 + 2 * 2/7 + 5 * 5/7) / 12 = 16/21 (the paper's 76%); response 2: (10 * 5/10 + 2) / 12 (58%).
    assert _pr(ce.b_cubed(KEY, RESPONSE_1)) == pytest.approx((16 / 21, 1.0))
    assert _pr(ce.b_cubed(KEY, RESPONSE_2)) == pytest.approx((7 / 12, 1.0))


def test_ceaf_phi4_examples():
    # Response 1: phi4 of {1..5}-{1..5} is 1 and of {8..C}-{6..C} is 2*5/12, which beats giving {6..C} to {6 7} (2*2/9).
    counts = ce.ceaf_phi4(KEY, RESPONSE_1)
    assert _pr(counts) == pytest.approx(((1 + 5 / 6) / 2, (1 + 5 / 6) / 3))
    # Response 2: {6 7}-{6 7} is 1, and the merged cluster aligns with either five-mention key cluster (2*5/15).
    counts = ce.ceaf_phi4(KEY, RESPONSE_2)
    assert _pr(counts) == pytest.approx(((1 + 2 / 3) / 2, (1 + 2 / 3) / 3))


def test_perfect_response_scores_100():
    scorer = ce.CorefScorer()
    scorer.update(KEY, KEY)
    result = scorer.result()
    for name in ("muc", "b_cubed", "ceaf_phi4"):
        assert result[f"{name}_f1"] == pytest.approx(100.0)
    assert result["conll_f1"] == pytest.approx(100.0)


def test_singleton_clusters():
    key = [["a"], ["b", "c"]]
    response = [["a"], ["b"], ["c"]]
    # MUC: singletons carry no links; the response has none at all, so precision has nothing to divide.
    assert _pr(ce.muc(key, response)) == (0.0, 0.0)
    # B-cubed: recall (1 + 1/2 + 1/2) / 3, precision 1 (every response cluster lies inside a key cluster).
    assert _pr(ce.b_cubed(key, response)) == pytest.approx((1.0, 2 / 3))
    # CEAF-phi4: {a}-{a} = 1 and {b c}-{b} = 2/3; three response clusters, two key clusters.
    assert _pr(ce.ceaf_phi4(key, response)) == pytest.approx(((5 / 3) / 3, (5 / 3) / 2))


def test_empty_response_and_empty_key():
    key = [[(0, 1), (4, 5)], [(7, 7), (9, 10), (12, 12)]]
    scorer = ce.CorefScorer()
    scorer.update(key, [])
    result = scorer.result()
    assert all(result[f"{n}_{p}"] == 0.0 for n in ("muc", "b_cubed", "ceaf_phi4") for p in ("precision", "recall", "f1"))
    assert result["conll_f1"] == 0.0
    # A response of mentions the key lacks (twinless mentions) scores 0 on every metric, too.
    scorer = ce.CorefScorer()
    scorer.update(key, [[(20, 21), (22, 23)]])
    assert scorer.result()["conll_f1"] == 0.0


def test_spans_as_lists_match_tuples():
    # Clusters read from JSON hold [start, end] lists; they are the same mentions as tuples.
    assert _pr(ce.b_cubed([[[0, 1], [3, 4]]], [[(0, 1), (3, 4)]])) == (1.0, 1.0)


def test_corpus_scores_are_micro_averaged():
    # Document 1 is MUC-perfect with 4 key links, document 2 has 1 link and misses it: recall 4/5, not (1 + 0) / 2.
    scorer = ce.CorefScorer()
    scorer.update([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5]])
    scorer.update([["x", "y"]], [["x"], ["y"]])
    assert scorer.counts["muc"].recall == pytest.approx(4 / 5)
    assert scorer.counts["muc"].precision == pytest.approx(1.0)
    result = scorer.result()
    expected_muc_f1 = 2 * 1.0 * 0.8 / 1.8
    assert result["muc_f1"] == pytest.approx(100 * expected_muc_f1)
    assert result["conll_f1"] == pytest.approx((result["muc_f1"] + result["b_cubed_f1"] + result["ceaf_phi4_f1"]) / 3)
    assert result["documents"] == 2


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="mention 2 is in clusters 0 and 1"):
        ce.muc([[1, 2], [2, 3]], [[1]])
    with pytest.raises(ValueError, match=r"response\[0\]: an empty cluster"):
        ce.b_cubed([[1]], [[]])
    with pytest.raises(ValueError, match="no document"):
        ce.CorefScorer().result()


def _random_clustering(rng, document):
    n = int(rng.integers(0, 12))
    mentions = rng.choice(30, size=n, replace=False)
    labels = rng.integers(0, n // 2 + 1, size=n)
    return [[(document, int(m)) for m in mentions[labels == label]] for label in np.unique(labels)]


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # scorch's harmonic mean of zeros
def test_agrees_with_scorch_on_random_corpora():
    """Against scorch (LoicGrobol/scorch, an independent implementation of the CoNLL-2012 formulas).

    scorch scores one clustering at a time; a corpus is scored as the union of
    its documents' clusterings (mentions qualified by document), which is
    what micro-averaging the counts means for all three metrics. Its CEAF
    raises where precision or recall is 0 (statistics.harmonic_mean on Python
    3.11); those corpora are compared on MUC and B-cubed only.
    """
    from scorch import scores

    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(200):
        documents = [(_random_clustering(rng, d), _random_clustering(rng, d)) for d in range(int(rng.integers(1, 4)))]
        scorer = ce.CorefScorer()
        for key, response in documents:
            scorer.update(key, response)
        key = [set(c) for k, _ in documents for c in k]
        response = [set(c) for _, r in documents for c in r]
        for name, metric in (("muc", scores.muc), ("b_cubed", scores.b_cubed), ("ceaf_phi4", scores.ceaf_e)):
            try:
                recall, precision, f1 = metric(key, response)
            except statistics.StatisticsError:
                assert name == "ceaf_phi4" and 0.0 in (scorer.counts[name].precision, scorer.counts[name].recall)
                continue
            counts = scorer.counts[name]
            assert (counts.recall, counts.precision, counts.f1) == pytest.approx((recall, precision, f1), abs=1e-12)
            compared += 1
    assert compared > 500
