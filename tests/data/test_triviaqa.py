"""TriviaQA readers, literal answer occurrences, features (offsets, truncation, masks) and span decoding."""

import json

import numpy as np
import pytest

from longjax.data import triviaqa as tq
from longjax.data.triviaqa_eval import evaluate, normalize_answer
from longjax.hf.tokenizer import load_tokenizer

BOS, PAD, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tests/fixtures/hf/tokenizer")


# ---------------------------------------------------------------- readers


def _raw_record(qid, question, pages, aliases=None, human=None):
    record = {
        "Question": question,
        "QuestionId": qid,
        "QuestionSource": "http://www.example.org/",
        "EntityPages": [{"DocSource": "TagMe", "Filename": f, "Title": f[:-4]} for f in pages],
        "SearchResults": [],
    }
    if aliases is not None:
        record["Answer"] = {
            "Aliases": [a.title() for a in aliases],
            "MatchedWikiEntityName": aliases[0],
            "NormalizedAliases": aliases,
            "NormalizedMatchedWikiEntityName": aliases[0],
            "NormalizedValue": aliases[0],
            "Type": "WikipediaEntity",
            "Value": aliases[0].title(),
        }
        if human is not None:
            record["Answer"]["HumanAnswers"] = human
    return record


def _write_raw(tmp_path, records, split="train", **top):
    evidence = tmp_path / "evidence" / "wikipedia"
    evidence.mkdir(parents=True, exist_ok=True)
    qa = tmp_path / "qa"
    qa.mkdir(exist_ok=True)
    path = qa / f"wikipedia-{split}.json"
    data = {"Data": records, "Domain": "Wikipedia", "Split": split, "VerifiedEval": False, "Version": 1.0, **top}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path, evidence


def test_read_raw(tmp_path):
    records = [
        _raw_record("tc_1", "Who sang Help?", ["The_Beatles.txt", "Help!.txt"], ["beatles", "the beatles"], ["Fab Four"]),
        _raw_record("tc_2", "Where is the Louvre?", ["Paris.txt"], ["paris"]),
    ]
    path, evidence = _write_raw(tmp_path, records)
    texts = {"The_Beatles.txt": "The Beatles were a band.", "Help!.txt": "Help! is by the Beatles.", "Paris.txt": "Paris, café"}
    for name, text in texts.items():
        (evidence / name).write_text(text, encoding="utf-8")
    examples = tq.read_raw(path, evidence)
    assert [e.id for e in examples] == ["tc_1--The_Beatles.txt", "tc_1--Help!.txt", "tc_2--Paris.txt"]
    assert [e.question_id for e in examples] == ["tc_1", "tc_1", "tc_2"]
    assert examples[1].context == "Help! is by the Beatles."
    assert examples[2].context == "Paris, café"
    assert examples[0].aliases == ("beatles", "the beatles", "fab four")
    assert examples[2].question == "Where is the Louvre?"
    assert tq.ground_truth(examples) == {"tc_1": ["beatles", "the beatles", "fab four"], "tc_2": ["paris"]}


def test_read_raw_test_without_answers(tmp_path):
    path, evidence = _write_raw(tmp_path, [_raw_record("tc_9", "Q?", ["A.txt"])], split="test")
    (evidence / "A.txt").write_text("text", encoding="utf-8")
    [example] = tq.read_raw(path, evidence)
    assert example.aliases == ()
    path, evidence = _write_raw(tmp_path, [_raw_record("tc_9", "Q?", ["A.txt"])], split="dev")
    with pytest.raises(ValueError, match=r"record 0.*Answer"):
        tq.read_raw(path, evidence)


def test_read_raw_verified_keeps_marked_questions_and_pages(tmp_path):
    kept = _raw_record("tc_1", "Q1?", ["A.txt", "B.txt"], ["a1"])
    kept["QuestionPartOfVerifiedEval"] = True
    kept["EntityPages"][0]["DocPartOfVerifiedEval"] = True
    kept["EntityPages"][1]["DocPartOfVerifiedEval"] = False
    dropped = _raw_record("tc_2", "Q2?", ["A.txt"], ["a2"])
    dropped["QuestionPartOfVerifiedEval"] = False
    path, evidence = _write_raw(tmp_path, [kept, dropped], split="dev", VerifiedEval=True)
    (evidence / "A.txt").write_text("text", encoding="utf-8")
    assert [e.id for e in tq.read_raw(path, evidence)] == ["tc_1--A.txt"]


def test_read_raw_errors(tmp_path):
    path, evidence = _write_raw(tmp_path, [_raw_record("tc_1", "Q?", ["Missing.txt"], ["a"])])
    with pytest.raises(FileNotFoundError, match=r"Missing\.txt.*tc_1"):
        tq.read_raw(path, evidence)
    bad = _raw_record("tc_2", "Q?", ["A.txt"], ["a"])
    del bad["Question"]
    path, evidence = _write_raw(tmp_path, [_raw_record("tc_1", "Q?", [], ["a"]), bad])
    with pytest.raises(ValueError, match=r"wikipedia-train\.json: record 1.*'Question'"):
        tq.read_raw(path, evidence)
    path, evidence = _write_raw(tmp_path, [_raw_record("tc_1", "Q?", [], ["a"])], Domain="Web")
    with pytest.raises(ValueError, match="Domain"):
        tq.read_raw(path, evidence)


def _squad_entry(example_id, question, context, aliases):
    qa = {"id": example_id, "qid": example_id.partition("--")[0], "question": question, "aliases": aliases}
    qa["answers"] = [{"text": a, "answer_start": context.lower().find(a)} for a in aliases if a in context.lower()]
    return {"paragraphs": [{"context": context, "qas": [qa]}]}


def test_read_squad_style(tmp_path):
    data = {
        "data": [
            _squad_entry("tc_1--The_Beatles.txt", "Who?", "The Beatles were a band .", ["beatles", "the beatles"]),
            _squad_entry("tc_1--Help!.txt", "Who?", "Help ! by the Beatles", ["beatles", "the beatles"]),
            _squad_entry("tc_5--Paris.txt", "Where?", "Paris", []),
        ],
        "version": 1.0,
    }
    path = tmp_path / "squad-wikipedia-dev-4096.json"
    path.write_text(json.dumps(data, indent=4, sort_keys=True, ensure_ascii=False), encoding="utf-8")
    examples = tq.read_squad_style(path)
    assert [e.question_id for e in examples] == ["tc_1", "tc_1", "tc_5"]
    assert examples[1] == tq.QAExample("tc_1--Help!.txt", "tc_1", "Who?", "Help ! by the Beatles", ("beatles", "the beatles"))
    assert examples[2].aliases == ()
    del data["data"][1]["paragraphs"][0]["qas"][0]["aliases"]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\[1\]\.paragraphs\[0\]\.qas\[0\].*aliases"):
        tq.read_squad_style(path)


# ---------------------------------------------------------------- occurrences


def test_occurrences_are_literal_and_case_insensitive():
    context = "The language C++ was made; c++ again, and cxx is not it."
    assert tq.find_occurrences(context, ["c++"]) == [(13, 16), (27, 30)]
    assert tq.find_occurrences(context, ["c++", "C++", "  c++ "]) == [(13, 16), (27, 30)]  # deduplicated
    film = "Up (film) is a film; up (FILM) too."
    assert tq.find_occurrences(film, ["(film)"]) == [(3, 9), (24, 30)]
    assert tq.find_occurrences("a.b axb", ["a.b"]) == [(0, 3)]
    assert tq.find_occurrences("x*y x**y", ["x*y", "["]) == [(0, 3)]
    assert tq.find_occurrences("aaa", ["aa"]) == [(0, 2), (1, 3)]  # overlapping
    assert tq.find_occurrences("anything", ["", "   "]) == []


def test_occurrences_word_boundaries():
    context = "party art, Art."
    assert tq.find_occurrences(context, ["art"]) == [(1, 4), (6, 9), (11, 14)]
    assert tq.find_occurrences(context, ["art"], word_boundaries=True) == [(6, 9), (11, 14)]
    assert tq.find_occurrences("(film)x", ["(film)"], word_boundaries=True) == []


# ---------------------------------------------------------------- features


_WORDS = ["river", "stone", "Ąlpha", "light", "north", "über", "grain", "tower", "  ", "\n", "Ωmega", "x"]
_ALIASES = ["c++", "São Paulo", "(film)", "New York", "beatles"]


def _generated_context(rng, n_words, n_answers):
    pieces = [str(rng.choice(_WORDS)) for _ in range(n_words)]
    for position in sorted(rng.choice(n_words, n_answers, replace=False)):
        pieces[position] = str(rng.choice(_ALIASES))
    return " ".join(pieces)


def _token_containing(offsets, char):
    """Independent of the module: linear scan for the non-empty token holding character `char`."""
    for index, (start, end) in enumerate(offsets):
        if start <= char < end:
            return index
    raise AssertionError(f"no token holds character {char}")


def test_span_round_trip(tok):
    rng = np.random.default_rng(0)
    examples = [
        tq.QAExample(f"q{i}--d.txt", f"q{i}", "Which city or language?", _generated_context(rng, 60, 6), tuple(_ALIASES))
        for i in range(4)
    ]
    features = tq.build_features(examples, tok, seq_len=512, word_boundaries=True)
    assert features.input_ids.shape == (4, 512) and features.input_ids.dtype == np.int32
    assert features.token_char_spans.shape == (4, 512, 2) and features.token_char_spans.dtype == np.int32
    for row, example in enumerate(examples):
        occurrences = tq.find_occurrences(example.context, example.aliases, word_boundaries=True)
        offsets = tok.encode(example.context, add_special_tokens=False).offsets
        assert features.num_truncated[row] == 0 and features.num_answers[row] == len(occurrences) >= 6
        spans = features.token_char_spans[row]
        off = features.context_offset[row]
        for k, (start, end) in enumerate(occurrences):
            s, e = features.answer_starts[row, k], features.answer_ends[row, k]
            assert s == off + _token_containing(offsets, start)
            assert e == off + _token_containing(offsets, end - 1)
            text = example.context[spans[s, 0] : spans[e, 1]]
            assert text == example.context[start:end]
            assert normalize_answer(text) in {normalize_answer(a) for a in example.aliases}
        assert np.all(features.answer_starts[row, len(occurrences) :] == -1)


def test_empty_offset_tokens_never_start_an_answer(tok):
    context = "The language c++ was made"
    encoding = tok.encode(context, add_special_tokens=False)
    assert (13, 13) in encoding.offsets  # the lone 'Ġ' before 'c'
    features = tq.build_features([tq.QAExample("q--d", "q", "Q?", context, ("c++",))], tok, seq_len=64)
    s, e = features.answer_starts[0, 0], features.answer_ends[0, 0]
    assert tuple(features.token_char_spans[0, s]) == (13, 14) and tuple(features.token_char_spans[0, e]) == (15, 16)
    assert features.num_answers[0] == 1


def test_layout_and_global_mask(tok):
    examples = [
        tq.QAExample("a--1", "a", "Who made c++?", "Bjarne made c++ in 1985.", ("bjarne",)),
        tq.QAExample("b--1", "b", "A much longer question with many words in it?", "short", ()),
    ]
    features = tq.build_features(examples, tok, seq_len=80)
    positions = np.arange(80)
    for row, example in enumerate(examples):
        ids = features.input_ids[row]
        question = tok.encode(example.question, add_special_tokens=False).ids
        context = tok.encode(example.context, add_special_tokens=False).ids
        expected = [BOS, *question, EOS, EOS, *context, EOS]
        assert ids[: len(expected)].tolist() == expected and np.all(ids[len(expected) :] == PAD)
        np.testing.assert_array_equal(features.padding_mask[row], positions < len(expected))
        first_eos = int(np.flatnonzero(ids == EOS)[0])
        np.testing.assert_array_equal(features.global_mask[row], positions < first_eos)
        assert features.context_offset[row] == len(question) + 3
        inside = (positions >= features.context_offset[row]) & (positions < features.context_offset[row] + len(context))
        assert np.all(features.token_char_spans[row][~inside] == -1)
    assert set(features.arrays()) >= {"input_ids", "padding_mask", "global_mask", "answer_starts", "answer_ends"}
    assert all(len(v) == 2 for v in features.arrays().values())


def test_truncation_drops_and_counts_occurrences(tok):
    context = " ".join(["beatles" if i % 10 == 0 else "stone" for i in range(100)])
    example = tq.QAExample("q--d", "q", "Who?", context, ("beatles",))
    seq_len = 60
    features = tq.build_features([example], tok, seq_len=seq_len)
    question = tok.encode("Who?", add_special_tokens=False).ids
    kept = seq_len - len(question) - 4
    offsets = tok.encode(context, add_special_tokens=False).offsets
    occurrences = tq.find_occurrences(context, ["beatles"])
    inside = [o for o in occurrences if _token_containing(offsets, o[1] - 1) < kept]
    assert 0 < len(inside) < len(occurrences)
    assert features.num_context_tokens[0] == kept
    assert features.num_answers[0] == len(inside)
    assert features.num_truncated[0] == len(occurrences) - len(inside)
    assert features.input_ids[0, -1] == EOS and features.padding_mask[0].all()
    assert np.all(features.answer_ends[0, : len(inside)] < features.context_offset[0] + kept)
    capped = tq.build_features([example], tok, seq_len=seq_len, max_answer_spans=1)
    assert (capped.num_answers[0], capped.num_overflow[0]) == (1, len(inside) - 1)
    assert capped.answer_starts.shape == (1, 1)


def test_question_limits(tok):
    example = tq.QAExample("q--d", "q", "word " * 40, "the context", ())
    with pytest.raises(ValueError, match=r"q--d.*max_question_tokens"):
        tq.build_features([example], tok, seq_len=32)
    features = tq.build_features([example], tok, seq_len=32, max_question_tokens=8)
    assert features.context_offset[0] == 11 and features.global_mask[0].sum() == 9
    with pytest.raises(ValueError, match="</s>"):
        tq.build_features([tq.QAExample("q--d", "q", "a </s> b", "c", ())], tok, seq_len=32)


# ---------------------------------------------------------------- decoding


def _hand_features():
    # <s> q </s> </s> ab Ġ cd ef gh </s>, context "ab cd ef gh"; position 5 is an empty-offset token.
    spans = np.full((1, 10, 2), -1, np.int32)
    spans[0, 4:9] = [(0, 2), (3, 3), (3, 5), (6, 8), (9, 11)]
    ones = np.ones((1,), np.int32)
    return tq.Features(
        input_ids=np.array([[0, 50, 2, 2, 60, 61, 62, 63, 64, 2]], np.int32),
        padding_mask=np.ones((1, 10), bool),
        global_mask=np.arange(10)[None] < 2,
        answer_starts=np.full((1, 1), -1, np.int32),
        answer_ends=np.full((1, 1), -1, np.int32),
        num_answers=0 * ones,
        num_truncated=0 * ones,
        num_overflow=0 * ones,
        context_offset=4 * ones,
        num_context_tokens=5 * ones,
        token_char_spans=spans,
        example_index=0 * ones,
        ids=("q--d",),
        question_ids=("q",),
        contexts=("ab cd ef gh",),
    )


START = np.array([0, 100, 0, 0, 1, 50, 0, 5, 0, 0], np.float32)
END = np.array([0, 100, 0, 0, 0, 50, 6, 2, 3, 0], np.float32)


def test_best_spans_order_and_length():
    features = _hand_features()
    spans = tq.best_spans(START, END, 0, features, max_answer_len=2)
    # The question (position 1) and the empty token (5) are never candidates; (7, 6) is backwards;
    # (4, 6) and (6, 8) are 3 tokens long.
    assert [(s.score, s.start_tok, s.end_tok, s.text) for s in spans] == [
        (8.0, 7, 8, "ef gh"),
        (7.0, 7, 7, "ef"),
        (6.0, 6, 6, "cd"),
        (3.0, 8, 8, "gh"),
        (2.0, 6, 7, "cd ef"),
        (1.0, 4, 4, "ab"),
    ]
    longer = tq.best_spans(START, END, 0, features, max_answer_len=3)
    assert (7.0, 4, 6, "ab cd") in [tuple(s) for s in longer]
    # n_best=2: starts {7, 4}, ends {6, 8}; only (7, 8) is forward and short enough.
    assert tq.best_spans(START, END, 0, features, n_best=2, max_answer_len=2) == [tq.Span(8.0, 7, 8, "ef gh")]
    with pytest.raises(ValueError, match="start_logits"):
        tq.best_spans(START[:5], END, 0, features)


def test_predictions_pick_the_best_document():
    examples = [
        tq.QAExample("q1--a", "q1", "?", "x", ("x",)),
        tq.QAExample("q1--b", "q1", "?", "y", ("y",)),
        tq.QAExample("q1--c", "q1", "?", "z", ("y",)),
        tq.QAExample("q2--a", "q2", "?", "w", ("w",)),
    ]
    results = {
        "q1--a": [tq.Span(3.0, 4, 4, "x"), tq.Span(2.0, 4, 5, "x y")],
        "q1--b": [tq.Span(5.0, 4, 4, "y")],
        "q1--c": [],
        "q2--a": [],
    }
    assert tq.predictions(results, examples) == {"q1": "y", "q2": ""}
    assert tq.predictions([results[e.id] for e in examples], examples) == {"q1": "y", "q2": ""}  # aligned list
    assert tq.predictions({"q1--a": results["q1--a"]}, examples) == {"q1": "x"}  # a subset by id
    with pytest.raises(ValueError, match="one entry per example"):
        tq.predictions([[]], examples)
    assert tq.feature_predictions(results) == {"q1--a": "x", "q1--b": "y", "q1--c": "", "q2--a": ""}
    with pytest.raises(ValueError, match="q9--z"):
        tq.predictions({"q9--z": []}, examples)


def test_end_to_end_decoding(tok):
    examples = [
        tq.QAExample("q1--a", "q1", "Who?", "The Beatles were a band.", ("beatles",)),
        tq.QAExample("q1--b", "q1", "Who?", "Paris is a city.", ("beatles",)),
    ]
    features = tq.build_features(examples, tok, seq_len=48)
    start = np.full((2, 48), -5.0, np.float32)
    end = np.full((2, 48), -5.0, np.float32)
    # Point row 0 at its gold answer, row 1 weakly at "Paris".
    start[0, features.answer_starts[0, 0]] = end[0, features.answer_ends[0, 0]] = 4.0
    start[1, features.context_offset[1]] = end[1, features.context_offset[1]] = 1.0
    results = tq.all_best_spans(start, end, features, max_answer_len=8)
    answers = tq.predictions(results, examples)
    assert answers == {"q1": "Beatles"}
    assert evaluate(answers, tq.ground_truth(examples))["exact_match"] == 100.0
