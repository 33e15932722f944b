"""The arXiv release reader and ROUGE (rouge-score, with sentence-split Lsum)."""

import json

import pytest

from longjax.data import arxiv, rouge


def test_abstract_sentences_are_the_text_inside_the_markers():
    assert arxiv.abstract_sentences(["<S> we study x . </S>", "<S> it works . </S> <S> really . </S>"]) == (
        "we study x .", "it works .", "really .")
    assert arxiv.abstract_sentences("no markers here") == ("no markers here",)


def test_release_reader(tmp_path):
    record = {"article_id": 7, "article_text": ["first sentence .", " second one . "],
              "abstract_text": ["<S> a summary . </S>"], "section_names": ["intro"], "sections": [["x"]]}
    (tmp_path / "val.txt").write_text(json.dumps(record) + "\n\n")
    (paper,) = arxiv.read_arxiv_jsonl(arxiv.release_file(tmp_path, "validation"))
    assert paper == arxiv.Paper("7", "first sentence . second one .", ("a summary .",))
    with pytest.raises(FileNotFoundError, match=r"no train file of the arXiv release \(tried \['train.txt'"):
        arxiv.release_file(tmp_path, "train")
    (tmp_path / "bad.txt").write_text(json.dumps(dict(record, abstract_text="<S> x </S>")) + "\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: abstract_text must be a list of strings"):
        arxiv.read_arxiv_jsonl(tmp_path / "bad.txt")


def test_rouge_by_hand():
    # unigram overlap 2 of 3 both ways: F1 = 2/3; bigram overlap 1 of 2: F1 = 1/2.
    scores = rouge.rouge([["the cat sat"]], [["the cat ran"]])
    assert scores["rouge1"] == pytest.approx(200 / 3) and scores["rouge2"] == pytest.approx(50)
    assert rouge.rouge([["a b c"]], [["a b c"]]) == {name: 100.0 for name in rouge.ROUGE_TYPES}
    assert rouge.rouge([["x y"]], [["a b"]])["rougeL"] == 0.0


def test_rouge_lsum_matches_sentence_by_sentence():
    # The same two sentences in the other order: one LCS over the whole text keeps half the
    # tokens (rougeL 50); the summary-level LCS of Lsum matches each sentence fully (100).
    scores = rouge.rouge([["a b .", "c d ."]], [["c d .", "a b ."]])
    assert scores["rougeL"] == pytest.approx(50) and scores["rougeLsum"] == pytest.approx(100)


def test_split_sentences():
    assert rouge.split_sentences(" We show x. It works!  Does it? yes") == ["We show x.", "It works!", "Does it?", "yes"]
    with pytest.raises(ValueError, match="must align"):
        rouge.rouge([["a"]], [])


def test_an_unprepared_tfds_directory_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build scientific_papers/arxiv"):
        arxiv.read_arxiv_tfds(tmp_path)
