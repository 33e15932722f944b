"""IMDB and Hyperpartisan read from their real layouts; splits; accuracy and F1 against hand-computed values."""

import json

import pytest

from longjax.data import text_classification as tc


def _imdb(root):
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            (root / split / label).mkdir(parents=True)
            for i, rating in ((3, 8 if label == "pos" else 1), (10, 9 if label == "pos" else 3)):
                (root / split / label / f"{i}_{rating}.txt").write_text(f"{split} {label} {i}<br />more")
    return root


def test_the_raw_imdb_directory_gives_labels_ids_and_text(tmp_path):
    splits = tc.read_imdb_directory(_imdb(tmp_path / "aclImdb"))
    assert [r.id for r in splits["train"]] == ["train/neg/3_1", "train/neg/10_3", "train/pos/3_8", "train/pos/10_9"]
    assert [r.label for r in splits["test"]] == [0, 0, 1, 1]
    assert splits["test"][3].text == "test pos 10<br />more"


def test_a_missing_imdb_directory_is_named(tmp_path):
    root = _imdb(tmp_path / "aclImdb")
    for f in (root / "test" / "neg").iterdir():
        f.unlink()
    (root / "test" / "neg").rmdir()
    with pytest.raises(FileNotFoundError, match=r"aclImdb/test/neg: no such directory"):
        tc.read_imdb_directory(root)


def test_an_unprepared_tfds_directory_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build imdb_reviews"):
        tc.read_imdb_tfds(tmp_path)


def _hp(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_hyperpartisan_json_lines_and_their_labels(tmp_path):
    path = _hp(tmp_path / "hp.jsonl", [
        {"text": "a", "label": "true", "id": "1"}, {"text": "b", "label": "false", "id": "2"},
        {"text": "c", "label": True, "id": 3},
    ])
    assert [(r.id, r.label) for r in tc.read_hyperpartisan_jsonl(path)] == [("1", 1), ("2", 0), ("3", 1)]


def test_a_malformed_record_names_the_file_and_index_unless_skipped(tmp_path, caplog):
    path = tmp_path / "hp.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "true", "id": "1"}) + "\n"
                    + json.dumps({"text": "b", "id": "2"}) + "\n" + "{not json\n")
    with pytest.raises(ValueError, match=r"hp.jsonl: record 1: missing keys \['label'\]"):
        tc.read_hyperpartisan_jsonl(path)
    assert len(tc.read_hyperpartisan_jsonl(path, skip_malformed=True)) == 1
    assert "skipped 2 malformed records" in caplog.text


def test_allenai_split_file_warns_with_the_leak_it_finds(tmp_path):
    records = [tc.LabeledText(str(i), f"t{i}", i % 2) for i in range(10)]
    split_file = tmp_path / "hp-splits.json"
    split_file.write_text(json.dumps({"train": ["0", "1", "2", "3", "4", "5"], "dev": ["6"], "test": ["2", "5", "9"]}))
    with pytest.warns(UserWarning, match="2 of its 3 test ids also appear in its train ids"):
        splits = tc.split_hyperpartisan(records, split_file=split_file)
    assert [r.id for r in splits["test"]] == ["2", "5", "9"]
    split_file.write_text(json.dumps({"train": ["0", "77"], "dev": [], "test": []}))
    with pytest.raises(ValueError, match=r"1 ids have no record: \['77'\]"):
        tc.split_hyperpartisan(records, split_file=split_file)


def test_the_clean_split_keeps_each_id_in_one_split_whatever_the_order():
    records = [tc.LabeledText(str(i % 150), f"t{i % 150}", i % 150 % 2) for i in range(200)]  # 50 ids twice
    splits = tc.split_hyperpartisan(records, seed=3)
    ids = {name: {r.id for r in rs} for name, rs in splits.items()}
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["validation"])
    assert not (ids["validation"] & ids["test"])
    assert sum(len(v) for v in ids.values()) == 150
    assert 90 <= len(ids["train"]) <= 135
    shuffled = tc.split_hyperpartisan(list(reversed(records)), seed=3)
    assert {n: {r.id for r in rs} for n, rs in shuffled.items()} == ids


def test_accuracy_and_f1_equal_hand_computed_values():
    predictions, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert tc.accuracy(predictions, labels) == 0.6
    # TP 2, FP 1, FN 1: F1 = 4 / 6.
    assert tc.f1_score(predictions, labels) == pytest.approx(2 / 3)
    # Class 0: TP 1, FP 1, FN 1: 1/2; macro = (2/3 + 1/2) / 2.
    assert tc.macro_f1(predictions, labels) == pytest.approx((2 / 3 + 0.5) / 2)
    assert tc.f1_score([0, 0], [0, 0]) == 0.0  # no positive anywhere
    with pytest.raises(ValueError, match="lengths differ"):
        tc.accuracy([1, 0], [1])
