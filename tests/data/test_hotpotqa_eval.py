"""The official HotpotQA metric: normalisation, the yes/no rule, supporting-fact sets and the joint scores by hand."""

import pytest

from longjax.data import hotpotqa_eval as ev


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Beatles", "beatles"),
        ("rock-n-roll", "rocknroll"),  # SQuAD deletes punctuation (TriviaQA's script replaces it by spaces)
        ("U.S.A.", "usa"),
        ("An  apple\tpie", "apple pie"),
        ("theatre", "theatre"),
    ],
)
def test_normalize_answer(text, expected):
    assert ev.normalize_answer(text) == expected


def test_answer_scores():
    assert ev.answer_scores("the Beatles", "Beatles") == (1.0, 1.0, 1.0, 1.0)
    # "new york city" against "york": precision 1/3, recall 1, F1 1/2.
    assert ev.answer_scores("New York City", "York") == pytest.approx((0.0, 0.5, 1 / 3, 1.0))
    # yes/no/noanswer must match exactly: no partial credit even with a shared token.
    assert ev.answer_scores("no", "no way") == (0.0, 0.0, 0.0, 0.0)
    assert ev.answer_scores("yes sir", "yes") == (0.0, 0.0, 0.0, 0.0)
    assert ev.answer_scores("Yes.", "yes") == (1.0, 1.0, 1.0, 1.0)
    assert ev.answer_scores("", "Paris") == (0.0, 0.0, 0.0, 0.0)


def test_supporting_fact_scores():
    gold = [["A", 0], ["B", 2]]
    assert ev.supporting_fact_scores([["B", 2], ["A", 0]], gold) == (1.0, 1.0, 1.0, 1.0)
    # One right, one wrong: precision 1/2, recall 1/2.
    assert ev.supporting_fact_scores([["A", 0], ["B", 1]], gold) == pytest.approx((0.0, 0.5, 0.5, 0.5))
    # Duplicates count once (sets).
    assert ev.supporting_fact_scores([["A", 0], ["A", 0]], gold) == pytest.approx((0.0, 2 / 3, 1.0, 0.5))
    assert ev.supporting_fact_scores([], gold) == (0.0, 0.0, 0.0, 0.0)
    # Both empty: EM 1 (no false positive or negative) but precision, recall and F1 0, as the official script has it.
    assert ev.supporting_fact_scores([], []) == (1.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"prediction: expected \[title, sentence index\] pairs"):
        ev.supporting_fact_scores([["A", "0"]], gold)


def _gold():
    return [
        {"_id": "q1", "answer": "Paris", "supporting_facts": [["France", 0], ["Paris", 1]]},
        {"_id": "q2", "answer": "yes", "supporting_facts": [["X", 0], ["Y", 0]]},
        {"_id": "q3", "answer": "New York", "supporting_facts": [["Z", 3]]},
    ]


def test_evaluate_joint_and_averaging_over_gold():
    predictions = {
        "answer": {"q1": "paris", "q2": "yes", "unknown": "x"},
        "sp": {"q1": [["France", 0], ["Paris", 1]], "q2": [["X", 0]], "q3": [["Z", 3]]},
    }
    result = ev.evaluate(predictions, _gold())
    # q1 perfect; q2 answer perfect, sp precision 1 recall 1/2; q3 has no answer: 0 for answer and joint.
    assert result["em"] == pytest.approx(100 * 2 / 3)
    assert result["f1"] == pytest.approx(100 * 2 / 3)
    assert result["sp_em"] == pytest.approx(100 * 2 / 3)
    assert result["sp_recall"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    assert result["sp_f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
    # joint of q2: precision 1 * 1, recall 1 * 1/2, F1 2/3; EM 1 * 0.
    assert result["joint_f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert result["joint_em"] == pytest.approx(100 * 1 / 3)
    assert result["joint_recall"] == pytest.approx(100 * 1.5 / 3)
    assert (result["count"], result["missing_answer"], result["missing_sp"], result["extra"]) == (3, 1, 0, 1)
    assert set(ev.METRIC_NAMES) <= set(result)


def test_evaluate_refuses_bad_files():
    with pytest.raises(ValueError, match="predictions: expected"):
        ev.evaluate({"answer": {}}, _gold())
    with pytest.raises(ValueError, match="gold: empty"):
        ev.evaluate({"answer": {}, "sp": {}}, [])
    with pytest.raises(TypeError, match=r"predictions\['answer'\]\['q1'\]"):
        ev.evaluate({"answer": {"q1": 3}, "sp": {}}, _gold())
