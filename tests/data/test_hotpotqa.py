"""HotpotQA: the distractor reader, the shared marked layout, both stages' features, the stage-1 file, decoding."""

import json

import numpy as np
import pytest

from longjax.data import hotpotqa as hq
from longjax.data import hotpotqa_selection as sel
from longjax.hf.tokenizer import add_task_tokens, load_tokenizer
from tests.hf.fixture_paths import HF

BOS, PAD, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def tok():
    tokenizer = load_tokenizer(HF / "tokenizer")
    add_task_tokens(tokenizer, hq.TASK_TOKENS)
    return tokenizer


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def _markers(tok):
    return {name: tok.token_to_id(name) for name in hq.TASK_TOKENS}


_CONTEXT = [
    ["Stone Bridge", ["The Stone Bridge crosses the river.", " It was built in 1850 by Ada North."]],
    ["Ada North", ["Ada North was an engineer.", " She was born in Leeds.", " North died in 1890."]],
    ["Leeds", ["Leeds is a city in England."]],
]


def _record(_id="hp_1", answer="Ada North", facts=(("Stone Bridge", 1), ("Ada North", 0)), context=_CONTEXT,
            question="Who built the Stone Bridge?"):
    record = {"_id": _id, "question": question, "context": [list(p) for p in context]}
    if answer is not None:
        record.update(answer=answer, type="bridge", level="medium", supporting_facts=[list(f) for f in facts])
    return record


def _write(tmp_path, records, name="hotpot_dev_distractor_v1.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _example(**options):
    return hq._example(_record(**options), "test")[0]


def _expected_layout(tok, question, paragraphs):
    """Independent of the module: the input as the issue describes it, and the first token of each sentence."""
    m = _markers(tok)
    ids, firsts = [BOS, m["[q]"], *_ids(tok, question), m["[/q]"]], []
    for title, sentences in paragraphs:
        ids += [m["<t>"], *_ids(tok, title), m["</t>"]]
        for sentence in sentences:
            firsts.append(len(ids))
            ids += [*_ids(tok, sentence), m["[s]"]]
    return ids + [EOS], firsts


# ---------------------------------------------------------------- reader


def test_reader(tmp_path):
    test_record = _record("hp_2", answer=None)
    path = _write(tmp_path, [_record(), test_record])
    dev, test = hq.read_hotpotqa(path)
    assert dev == hq.HotpotExample(
        "hp_1", "Who built the Stone Bridge?", "Ada North", "bridge", "medium",
        (("Stone Bridge", 1), ("Ada North", 0)), tuple((t, tuple(s)) for t, s in _CONTEXT),
    )
    assert (test.answer, test.type, test.level, test.supporting_facts) == (None, None, None, None)
    assert test.context == dev.context and test.id == "hp_2"


def test_reader_drops_exact_repeats_only(tmp_path, caplog):
    repeated = _record(context=[*_CONTEXT, _CONTEXT[0]])
    (example,) = hq.read_hotpotqa(_write(tmp_path, [repeated]))
    assert [title for title, _ in example.context] == ["Stone Bridge", "Ada North", "Leeds"]
    assert "dropped 1 paragraphs" in caplog.text
    clash = _record(context=[*_CONTEXT, ["Leeds", ["Another Leeds."]]])
    with pytest.raises(ValueError, match=r"record 0 \(hp_1\): field 'context'\[3\]: title 'Leeds' repeats"):
        hq.read_hotpotqa(_write(tmp_path, [clash]))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("question"), r"field 'question'"),
        (lambda r: r.pop("context"), r"field 'context'"),
        (lambda r: r["context"].append(["Title", "not a list"]), r"field 'context'\[3\]"),
        (lambda r: r.update(type="multi"), r"field 'type'"),
        (lambda r: r.update(answer=["Ada"]), r"field 'answer'"),
        (lambda r: r["supporting_facts"].append(["Leeds", "0"]), r"field 'supporting_facts'\[2\].*index"),
        (lambda r: r["supporting_facts"].append(["Leeds"]), r"field 'supporting_facts'\[2\]"),
        (lambda r: r["supporting_facts"].append(["Leeds", -1]), r"field 'supporting_facts'\[2\]"),
        (lambda r: r["supporting_facts"].append(["Paris", 0]),
         r"field 'supporting_facts'\[2\]: title 'Paris' is not in the context"),
        (lambda r: r.update(_id="hp_0"), r"'_id' repeats"),
    ],
)
def test_reader_errors_name_file_record_and_field(tmp_path, change, message):
    bad = _record()
    change(bad)
    path = _write(tmp_path, [_record("hp_0"), bad])
    with pytest.raises(ValueError, match=r"hotpot_dev_distractor_v1\.json: record 1 \(hp_[01]\): " + message):
        hq.read_hotpotqa(path)


def test_reader_keeps_facts_past_the_paragraph_and_counts_them(tmp_path, caplog):
    (example,) = hq.read_hotpotqa(_write(tmp_path, [_record(facts=[("Leeds", 5)])]))
    assert example.supporting_facts == (("Leeds", 5),)
    assert "1 supporting facts point past" in caplog.text
    with pytest.raises(FileNotFoundError, match="missing.json"):
        hq.read_hotpotqa(tmp_path / "missing.json")
    (tmp_path / "object.json").write_text("{}")
    with pytest.raises(ValueError, match="object.json: expected a JSON list"):
        hq.read_hotpotqa(tmp_path / "object.json")


# ---------------------------------------------------------------- layout and stage 1


def test_layout_token_by_token_and_global_mask(tok):
    example = _example()
    features = hq.build_selector_features([example], tok, seq_len=400)
    expected, _ = _expected_layout(tok, example.question, _CONTEXT)
    ids = features.input_ids[0].tolist()
    assert features.input_ids.shape == (1, 400) and features.input_ids.dtype == np.int32
    assert ids[: len(expected)] == expected and set(ids[len(expected):]) == {PAD}
    np.testing.assert_array_equal(features.padding_mask[0], np.arange(400) < len(expected))
    # The pieces between markers decode to the texts as given (sentences keep their leading space).
    m = _markers(tok)
    s_positions = [i for i, t in enumerate(ids) if t == m["[s]"]]
    t_positions = [i for i, t in enumerate(ids) if t == m["<t>"]]
    assert len(s_positions) == 6 and len(t_positions) == 3
    assert tok.decode(ids[t_positions[1] + 1 : ids.index(m["</t>"], t_positions[1])]) == "Ada North"
    assert tok.decode(ids[s_positions[0] + 1 : s_positions[1]]) == " It was built in 1850 by Ada North."
    # Global: <s> [q] question [/q] and every marker; no title or sentence word, not the final </s>.
    question_end = ids.index(m["[/q]"])
    markers = {m["<t>"], m["</t>"], m["[s]"]}
    expected_global = [i <= question_end or t in markers for i, t in enumerate(ids)]
    np.testing.assert_array_equal(features.global_mask[0], expected_global)
    assert features.global_mask[0].sum() == question_end + 1 + 3 * 2 + 6
    np.testing.assert_array_equal(features.paragraph_positions[0, :3], t_positions)
    assert features.titles == (("Stone Bridge", "Ada North", "Leeds"),)
    assert set(features.arrays()) == {"input_ids", "padding_mask", "global_mask", "paragraph_positions",
                                      "paragraph_labels"}


def test_marker_spellings_in_text_are_text(tok):
    context = [["A <t> title", ["It says [s] and </s> and <s>.", " Fine."]]]
    example = _example(context=context, facts=[("A <t> title", 0)], question="Why [/q]?")
    features = hq.build_selector_features([example], tok, seq_len=96)
    ids = features.input_ids[0].tolist()
    m = _markers(tok)
    assert [ids.count(m[name]) for name in ("[q]", "[/q]", "<t>", "</t>", "[s]")] == [1, 1, 1, 1, 2]
    assert ids.count(EOS) == 1 and ids.count(BOS) == 1
    s_first = ids.index(m["[s]"])
    assert tok.decode(ids[ids.index(m["</t>"]) + 1 : s_first]) == "It says [s] and </s> and <s>."


def test_paragraph_labels_from_supporting_facts(tok):
    dev, test = _example(), _example(_id="hp_2", answer=None)
    features = hq.build_selector_features([dev, test], tok, seq_len=400, max_paragraphs=4)
    assert features.paragraph_labels.dtype == np.int32 and features.paragraph_labels.shape == (2, 4)
    np.testing.assert_array_equal(features.paragraph_labels, [[1, 1, 0, -1], [-1, -1, -1, -1]])
    assert features.paragraph_positions[1, 3] == -1 and np.all(features.paragraph_positions[1, :3] > 0)
    with pytest.raises(ValueError, match=r"\(hp_1\): has 3 paragraphs; raise data.max_paragraphs \(now 2\)"):
        hq.build_selector_features([dev], tok, seq_len=400, max_paragraphs=2)
    bare = load_tokenizer(HF / "tokenizer")
    with pytest.raises(ValueError, match=r"no '\[q\]'.*add_task_tokens"):
        hq.build_selector_features([dev], bare, seq_len=400)


def test_a_cut_question_counts_as_truncated_and_keeps_the_paragraphs(tok):
    whole = hq.build_selector_features([_example()], tok, seq_len=400)
    cut = hq.build_selector_features([_example()], tok, seq_len=400, max_question_tokens=2)
    assert whole.truncated == 0 and cut.truncated == 1
    question = int(whole.padding_mask[0].sum()) - int(cut.padding_mask[0].sum())
    assert question > 0 and np.all(cut.paragraph_positions[0, :3] == whole.paragraph_positions[0, :3] - question)


def test_truncation_keeps_a_prefix_of_whole_sentences(tok, caplog):
    example = _example()
    full, firsts = _expected_layout(tok, example.question, _CONTEXT)
    # Cut inside "Ada North"'s second sentence: its first sentence is kept, the rest (and "Leeds") dropped,
    # though its shorter third sentence alone would fit in what remains.
    m = _markers(tok)
    second_end = full.index(m["[s]"], firsts[3])
    seq_len = second_end + 1  # seq_len - 1 == second_end: the [s] of the second sentence does not fit
    assert len(_ids(tok, _CONTEXT[1][1][2])) + 1 <= seq_len - 1 - firsts[3]
    features = hq.build_selector_features([example], tok, seq_len=seq_len)
    ids = features.input_ids[0].tolist()
    assert ids == full[: firsts[3]] + [EOS] + [PAD] * (seq_len - firsts[3] - 1)
    assert features.truncated == 1 and "1 of 1 examples cut" in caplog.text
    np.testing.assert_array_equal(features.paragraph_labels[0, :3], [1, 1, -1])
    assert features.paragraph_positions[0, 2] == -1
    ranking = hq.paragraph_ranking(features, 0, np.array([0.2, 0.9, 5.0, 7.0, 0, 0, 0, 0, 0, 0]))
    assert ranking == [("Ada North", pytest.approx(0.9)), ("Stone Bridge", pytest.approx(0.2))]
    exact = hq.build_selector_features([example], tok, seq_len=len(full))
    assert exact.truncated == 0 and exact.input_ids[0].tolist() == full
    with pytest.raises(ValueError, match=r"\(hp_1\): the question's \d+ tokens .* data.max_question_tokens"):
        hq.build_selector_features([example], tok, seq_len=8)
    capped = hq.build_selector_features([example], tok, seq_len=400, max_question_tokens=2)
    assert capped.input_ids[0, 4] == m["[/q]"] and capped.global_mask[0].sum() == 5 + 3 * 2 + 6


# ---------------------------------------------------------------- the stage-1 file and selection


def test_select_paragraphs(tmp_path):
    example = _example()  # gold: Stone Bridge (0), Ada North (1)
    assert sel.select_paragraphs(example, ["Leeds", "Ada North", "Stone Bridge"], keep=2, add_gold=False) == [1, 2]
    assert sel.select_paragraphs(example, ["Leeds", "Ada North"], keep=1, add_gold=True) == [0, 1, 2]
    assert sel.select_paragraphs(example, ["Ada North", "Stone Bridge"], keep=2, add_gold=True) == [0, 1]
    assert sel.select_paragraphs(example, None, keep=2, add_gold=True) == [0, 1]
    with pytest.raises(ValueError, match=r"'hp_1': no stage-1 ranking"):
        sel.select_paragraphs(example, None, keep=2, add_gold=False)
    with pytest.raises(ValueError, match=r"'hp_1': ranked title 'Paris' is not in its context"):
        sel.select_paragraphs(example, ["Leeds", "Ada North", "Paris"], keep=2, add_gold=False)
    with pytest.raises(ValueError, match=r"'hp_2': add_gold needs supporting facts"):
        sel.select_paragraphs(_example(_id="hp_2", answer=None), ["Leeds"], keep=1, add_gold=True)
    with pytest.raises(ValueError, match="no paragraph selected"):
        sel.select_paragraphs(example, [], keep=2, add_gold=False)
    with pytest.raises(ValueError, match=r"dev_selection\.json: has no ranking for example 'hp_1'"):
        sel.selections_for([example], {"hp_9": ["Leeds"]}, keep=1, add_gold=False, source="dev_selection.json")
    assert sel.selections_for([example], {"hp_1": ["Leeds"]}, keep=1, add_gold=False) == {"hp_1": [2]}


def test_selection_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "selection.json"
    sel.write_selection(path, {"hp_1": [("Leeds", 0.1), ("Ada North", 2.5), ("Stone Bridge", np.float32(1.0))],
                              "hp_2": []})
    assert json.loads(path.read_text()) == {"hp_1": [["Ada North", 2.5], ["Stone Bridge", 1.0], ["Leeds", 0.1]],
                                            "hp_2": []}
    assert sel.read_selection(path) == {"hp_1": ["Ada North", "Stone Bridge", "Leeds"], "hp_2": []}
    with pytest.raises(ValueError, match=r"ranking\['hp_1'\]: expected \[title, finite score\]"):
        sel.write_selection(path, {"hp_1": [("Leeds", float("nan"))]})
    for content, message in [
        ({"hp_1": [["A", 1.0], ["B", 2.0]]}, "scores are not ranked best first"),
        ({"hp_1": [["A", 2.0], ["A", 1.0]]}, "title 'A' is ranked twice"),
        ({"hp_1": [["A"]]}, r"expected \[title, finite score\]"),
        ({"hp_1": "A"}, "expected a list"),
    ]:
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=r"selection\.json: id 'hp_1': " + message):
            sel.read_selection(path)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        sel.read_selection(tmp_path / "nowhere.json")


# ---------------------------------------------------------------- stage 2


def _token_containing(offsets, char):
    """Independent of the module: linear scan for the non-empty token holding character `char`."""
    for index, (start, end) in enumerate(offsets):
        if start <= char < end:
            return index
    raise AssertionError(f"no token holds character {char}")


def _answer_features(tok, examples, selected, **options):
    return hq.build_answer_features(examples, tok, seq_len=options.pop("seq_len", 400),
                                    selections={e.id: selected for e in examples}, **options)


def test_answer_occurrences_map_to_their_tokens(tok):
    example = _example()  # "Ada North" occurs in sentence 1 of Stone Bridge and sentence 0 of Ada North
    features = _answer_features(tok, [example], [0, 1, 2])
    _, firsts = _expected_layout(tok, example.question, _CONTEXT)
    sentences = [s for _, group in _CONTEXT for s in group]
    expected = []
    for j, sentence in enumerate(sentences):
        offsets = tok.encode(sentence, add_special_tokens=False).offsets
        start = sentence.find("Ada North")
        if start >= 0:
            expected.append((firsts[j] + _token_containing(offsets, start),
                             firsts[j] + _token_containing(offsets, start + len("Ada North") - 1)))
    assert len(expected) == 2
    assert list(zip(features.answer_starts[0, :2], features.answer_ends[0, :2])) == expected
    assert np.all(features.answer_starts[0, 2:] == -1) and features.answer_starts.shape == (1, 64)
    assert [hq.answer_text(features, 0, s, e) for s, e in expected] == ["Ada North", "Ada North"]
    assert features.answer_type[0] == 0 and features.unanswerable == 0
    assert features.contexts[0] == "".join(sentences)
    # A span across a sentence boundary decodes the text between, as written.
    first, second = firsts[0], firsts[1]
    text = hq.answer_text(features, 0, first + 2, second + 3)
    offsets0 = tok.encode(sentences[0], add_special_tokens=False).offsets
    offsets1 = tok.encode(sentences[1], add_special_tokens=False).offsets
    assert text == sentences[0][offsets0[2][0]:] + sentences[1][: offsets1[3][1]]
    with pytest.raises(ValueError, match=r"start_token: \d+ of example 'hp_1' is not a sentence token"):
        hq.answer_text(features, 0, first - 1, second)  # the </t> before the first sentence
    with pytest.raises(ValueError, match="before start_token"):
        hq.answer_text(features, 0, second, first)


def test_context_mask_and_char_spans(tok):
    example = _example()
    features = _answer_features(tok, [example], [1])
    paragraph = _CONTEXT[1]
    _, firsts = _expected_layout(tok, example.question, [paragraph])
    expected = np.zeros(400, bool)
    base = 0
    for first, sentence in zip(firsts, paragraph[1]):
        offsets = np.array(tok.encode(sentence, add_special_tokens=False).offsets)
        expected[first : first + len(offsets)] = offsets[:, 1] > offsets[:, 0]
        np.testing.assert_array_equal(features.token_char_spans[0, first : first + len(offsets)], offsets + base)
        base += len(sentence)
    np.testing.assert_array_equal(features.context_mask[0], expected)
    assert features.context_mask[0].sum() > 0 and not (features.context_mask[0] & features.global_mask[0]).any()
    assert np.all(features.token_char_spans[0][~features.padding_mask[0] | features.global_mask[0]] == -1)
    assert features.token_char_spans.dtype == np.int32 and features.paragraphs == ((1,),)


def test_answers_once_nowhere_and_whole_words(tok, caplog):
    once = _example(_id="once", answer="leeds", facts=[("Leeds", 0)])
    nowhere = _example(_id="nowhere", answer="Paris", facts=[("Leeds", 0)])
    words = _example(_id="words", answer="was", facts=[("Leeds", 0)])  # "was" in 3 sentences, never inside a word
    inside = _example(_id="inside", answer="eng", facts=[("Leeds", 0)])  # only inside "engineer" and "England"
    features = _answer_features(tok, [once, nowhere, words, inside], [1, 2])
    assert [hq.answer_text(features, 0, s, e) for s, e in
            zip(features.answer_starts[0], features.answer_ends[0]) if s >= 0] == ["Leeds", "Leeds"]
    assert np.all(features.answer_starts[1] == -1) and features.answer_type[1] == 0
    assert (features.answer_starts[2] >= 0).sum() == 2  # "was" in Ada North's sentences 0 and 1
    assert np.all(features.answer_starts[3] == -1)
    assert features.unanswerable == 2 and "2 of 4 examples have a span answer that occurs nowhere" in caplog.text
    substrings = _answer_features(tok, [inside], [1, 2], word_boundaries=False)
    texts = [hq.answer_text(substrings, 0, s, e) for s, e in zip(substrings.answer_starts[0],
                                                                substrings.answer_ends[0]) if s >= 0]
    assert texts == ["eng", "Eng"] and substrings.unanswerable == 0
    capped = _answer_features(tok, [words], [1, 2], max_answer_spans=1)
    assert capped.answer_starts.shape == (1, 1) and capped.overflow == 1


def test_yes_no_answers_have_no_span_targets(tok):
    context = [["Leeds", ["Yes, Leeds is in England, yes.", " No river is no longer."]]]
    examples = [_example(_id=f"q{i}", answer=answer, facts=[("Leeds", 0)], context=context)
                for i, answer in enumerate(["Yes", " no ", "No river"])]
    examples.append(_example(_id="test", answer=None, context=context))
    features = _answer_features(tok, examples, [0])
    np.testing.assert_array_equal(features.answer_type, [1, 2, 0, -1])
    assert np.all(features.answer_starts[[0, 1, 3]] == -1)
    assert hq.answer_text(features, 2, features.answer_starts[2, 0], features.answer_ends[2, 0]) == "No river"
    assert features.unanswerable == 0
    assert [hq.answer_type_of(a) for a in ("YES", "yes.", None)] == [1, 0, -1]


def test_sentence_labels_and_supporting_facts_round_trip(tok):
    example = _example(facts=[("Stone Bridge", 1), ("Ada North", 0), ("Ada North", 2)])
    features = _answer_features(tok, [example, _example(_id="hp_2", answer=None)], [0, 1], max_sentences=6)
    ids = features.input_ids[0].tolist()
    s_positions = [i for i, t in enumerate(ids) if t == _markers(tok)["[s]"]]
    np.testing.assert_array_equal(features.sentence_positions[0], s_positions + [-1])
    assert features.sentence_keys[0] == (("Stone Bridge", 0), ("Stone Bridge", 1), ("Ada North", 0),
                                         ("Ada North", 1), ("Ada North", 2))
    np.testing.assert_array_equal(features.sentence_labels, [[0, 1, 1, 0, 1, -1], [-1] * 6])
    probabilities = np.where(features.sentence_labels[0] == 1, 0.9, 0.1)
    predicted = hq.supporting_facts_of(features, 0, probabilities)
    assert sorted(map(tuple, predicted)) == sorted(example.supporting_facts)
    assert hq.supporting_facts_of(features, 0, np.full(6, 0.5)) == []  # strictly above the threshold
    assert hq.supporting_facts_of(features, 0, np.full(6, 0.5), threshold=0.4)[-1] == ["Ada North", 2]
    with pytest.raises(ValueError, match=r"sentence_probabilities: expected shape \(6,\)"):
        hq.supporting_facts_of(features, 0, np.ones(5))
    assert set(features.arrays()) == {"input_ids", "padding_mask", "global_mask", "context_mask", "answer_starts",
                                      "answer_ends", "answer_type", "sentence_positions", "sentence_labels"}
    assert all(v.shape[0] == 2 for v in features.arrays().values())


def test_stage2_truncation_and_errors(tok, caplog):
    example = _example(answer="Leeds", facts=[("Ada North", 1)])
    full, firsts = _expected_layout(tok, example.question, [_CONTEXT[1], _CONTEXT[2]])
    # Keep Ada North's first two sentences only: "Leeds" survives in sentence 1, not in the dropped Leeds paragraph.
    seq_len = firsts[2] + 1
    features = _answer_features(tok, [example], [1, 2], seq_len=seq_len)
    assert features.input_ids[0].tolist() == full[: firsts[2]] + [EOS]
    assert features.truncated == 1 and "stage 2: 1 of 1 examples cut" in caplog.text
    assert features.sentence_keys[0] == (("Ada North", 0), ("Ada North", 1))
    assert (features.answer_starts[0] >= 0).sum() == 1
    assert hq.answer_text(features, 0, features.answer_starts[0, 0], features.answer_ends[0, 0]) == "Leeds"
    gone = _answer_features(tok, [_example(answer="England", facts=[("Leeds", 0)])], [1, 2], seq_len=seq_len)
    assert gone.unanswerable == 1 and np.all(gone.sentence_labels[0] == [0, 0] + [-1] * 62)
    with pytest.raises(ValueError, match=r"\(hp_1\): keeps 4 sentences; raise data.max_sentences \(now 3\)"):
        _answer_features(tok, [example], [1, 2], max_sentences=3)
    with pytest.raises(ValueError, match=r"selections: no entry for example 'hp_1'"):
        hq.build_answer_features([example], tok, seq_len=400, selections={"hp_9": [0]})
    for bad in ([], [1, 1], [3]):
        with pytest.raises(ValueError, match=r"\(hp_1\): selections: expected distinct context indices"):
            hq.build_answer_features([example], tok, seq_len=400, selections={"hp_1": bad})
