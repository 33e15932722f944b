"""The official TriviaQA metric: normalisation rules, EM/F1 by hand, and the averaging of `evaluate`."""

import pytest

from longjax.data import triviaqa_eval as ev


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Beatles", "beatles"),
        ("A Tale of Two Cities", "tale of two cities"),
        ("AN Apple", "apple"),
        ("an", ""),
        ("theatre", "theatre"),  # articles only as whole words
        ("U.S.A.", "u s"),  # punctuation becomes spaces, and then "a" is an article
        ("rock-n-roll", "rock n roll"),
        ("snake_case", "snake case"),
        ("\u2018Hello\u2019 World\u00b4s", "hello world s"),  # the official extra characters
        ("`quoted`", "quoted"),
        ("\u201cThe\u201d end", "\u201c \u201d end"),  # curly double quotes are not punctuation there
        ("  Multiple \t  spaces\n", "multiple spaces"),
        ("the_the", ""),  # underscore first, then the articles
        ("C++", "c"),
    ],
)
def test_normalize_answer(text, expected):
    assert ev.normalize_answer(text) == expected


def test_exact_match_ignores_case_articles_punctuation():
    assert ev.exact_match("the Beatles!", ["beatles"]) == 1.0
    assert ev.exact_match("\u2018Beatles\u2019", ["The Beatles"]) == 1.0
    assert ev.exact_match("Beatle", ["beatles"]) == 0.0
    assert ev.exact_match("Paris", ["London", "paris"]) == 1.0  # any alias


def test_f1_by_hand():
    # [john, smith] vs [smith]: precision 1/2, recall 1 -> 2/3.
    assert ev.f1("John Smith", ["Smith"]) == pytest.approx(2 / 3)
    # Max over aliases: vs [john] 2/3; vs [john, smith, jr] precision 1, recall 2/3 -> 0.8.
    assert ev.f1("John Smith", ["john", "John Smith Jr."]) == pytest.approx(0.8)
    # Repeated tokens count once each against the truth: [cat, cat] vs [cat] -> 2/3.
    assert ev.f1("the cat the cat", ["cat"]) == pytest.approx(2 / 3)
    assert ev.f1("dog", ["cat"]) == 0.0


def test_empty_prediction():
    assert ev.exact_match("", ["beatles"]) == 0.0
    assert ev.f1("", ["beatles"]) == 0.0
    # The official quirk: both normalise to "", so EM is 1 while F1 (no shared token) is 0.
    assert ev.exact_match("", ["The"]) == 1.0
    assert ev.f1("", ["The"]) == 0.0


def test_empty_ground_truths_raise():
    with pytest.raises(ValueError, match="ground_truths"):
        ev.f1("x", [])
    with pytest.raises(TypeError, match="ground_truths"):
        ev.exact_match("x", "x")


def test_evaluate_averages_over_every_ground_truth_question():
    truth = {"q1": ["beatles"], "q2": ["paris"], "q3": ["x"]}
    predictions = {"q1": "The Beatles", "q2": "Paris France", "q4": "ignored"}
    result = ev.evaluate(predictions, truth)
    # q1: EM 1, F1 1; q2: EM 0, F1 2/3; q3 missing: 0. Denominator 3, as the official script.
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert (result["count"], result["missing"], result["extra"]) == (3, 1, 1)


def test_evaluate_errors_name_the_question():
    with pytest.raises(ValueError, match="q2"):
        ev.evaluate({"q2": "a"}, {"q2": []})
    with pytest.raises(TypeError, match="q1"):
        ev.evaluate({"q1": None}, {"q1": ["a"]})
    with pytest.raises(ValueError, match="ground_truth"):
        ev.evaluate({}, {})


def test_official_ground_truths():
    answer = {"Value": "The Beatles", "NormalizedAliases": ["beatles", "the beatles"], "HumanAnswers": ["The Fab Four!"]}
    assert ev.official_ground_truths(answer) == ["beatles", "the beatles", "fab four"]
    with pytest.raises(ValueError, match="NormalizedAliases"):
        ev.official_ground_truths({"Value": "x"})
