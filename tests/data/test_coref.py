"""OntoNotes coreference data: the minimize.py JSON-lines reader, whole-document features, predicted clusters."""

import json

import numpy as np
import pytest

from longjax.data import coref
from longjax.hf.tokenizer import load_tokenizer
from tests.hf.fixture_paths import HF


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(HF / "tokenizer")


def _record(tokenizer, doc_key="nw/wsj/00/wsj_0001_0"):
    """Two sentences in minimize.py's layout: `<s>` and `</s>` once around the document, clusters over subtokens."""
    words = [["the", "river", "ran", "by", "the", "stone"], ["the", "river", "was", "cold"]]
    sentences, spans, position = [], [], 1  # word -> (first, last) subtoken; position 0 is <s>
    for sentence in words:
        pieces = []
        for word in sentence:
            tokens = tokenizer.encode(" " + word, add_special_tokens=False).tokens
            spans.append((position, position + len(tokens) - 1))
            pieces += tokens
            position += len(tokens)
        sentences.append(pieces)
    sentences[0].insert(0, "<s>")
    sentences[1].append("</s>")
    flat = [t for s in sentences for t in s]
    the_river = [[spans[0][0], spans[1][1]], [spans[6][0], spans[7][1]]]
    return {
        "doc_key": doc_key,
        "sentences": sentences,
        "speakers": [["Alice"] * len(sentences[0]), ["Bob"] * len(sentences[1])],
        "clusters": [the_river, [list(spans[5])]],
        "sentence_map": [0] * len(sentences[0]) + [1] * len(sentences[1]),
        "subtoken_map": list(range(len(flat))),
    }


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_reader_flattens_sentences_and_speakers(tokenizer, tmp_path):
    record = _record(tokenizer)
    (doc,) = coref.read_jsonlines(_write(tmp_path / "dev.jsonlines", [record]))
    assert doc.subtokens == tuple(t for s in record["sentences"] for t in s)
    assert doc.speakers[0] == "Alice" and doc.speakers[-1] == "Bob"
    assert doc.clusters == tuple(tuple(tuple(m) for m in c) for c in record["clusters"])


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(sentence_map=r["sentence_map"][:-1]), "'sentence_map' must be"),
    (lambda r: r.update(clusters=[[[3, 2]]]), r"clusters\[0\] holds \[3, 2\]"),
    (lambda r: r.update(clusters=[[[0, 99]]]), r"clusters\[0\] holds \[0, 99\]"),
    (lambda r: r.update(clusters=[[]]), r"clusters\[0\] is empty"),
    (lambda r: r.update(speakers=[["a"]]), "'speakers' holds 1 entries"),
    (lambda r: r.pop("doc_key"), "'doc_key' must be"),
    (lambda r: r.update(clusters=[r["clusters"][0], [r["clusters"][0][0]]]), r"is in clusters 0 and 1"),
    (lambda r: r.update(sentence_map=r["sentence_map"][::-1]), "'sentence_map' must not decrease"),
])
def test_reader_names_the_malformed_field(tokenizer, tmp_path, change, message):
    record = _record(tokenizer)
    change(record)
    with pytest.raises(ValueError, match=message):
        coref.read_jsonlines(_write(tmp_path / "bad.jsonlines", [_record(tokenizer), record]))
    with pytest.raises(FileNotFoundError, match="missing.jsonlines"):
        coref.read_jsonlines(tmp_path / "missing.jsonlines")


def test_features_of_a_document(tokenizer, tmp_path):
    record = _record(tokenizer)
    (doc,) = coref.read_jsonlines(_write(tmp_path / "dev.jsonlines", [record]))
    features = coref.build_features([doc], tokenizer, seq_len=48, max_mentions=5, max_span_width=30)
    n = len(doc.subtokens)
    vocab = tokenizer.get_vocab()
    assert features.input_ids[0, :n].tolist() == [vocab[t] for t in doc.subtokens]
    assert features.input_ids[0, n:].tolist() == [vocab["<pad>"]] * (48 - n)
    assert features.padding_mask[0].sum() == n
    assert features.sentence_map[0, :n].tolist() == record["sentence_map"] and np.all(features.sentence_map[0, n:] == -1)
    first = len(record["sentences"][0])
    assert features.speaker_ids[0, :n].tolist() == [1] * first + [2] * (n - first)
    assert features.genre.tolist() == [coref.ONTONOTES_GENRES.index("nw")]
    mentions = sorted(zip(features.gold_starts[0].tolist(), features.gold_ends[0].tolist(),
                          features.gold_clusters[0].tolist()))
    expected = sorted([(s, e, c + 1) for c, cluster in enumerate(record["clusters"]) for s, e in cluster]
                      + [(-1, -1, 0)] * 2)
    assert mentions == expected
    with pytest.raises(ValueError, match="raise data.max_mentions"):
        coref.build_features([doc], tokenizer, seq_len=48, max_mentions=2, max_span_width=30)
    with pytest.raises(ValueError, match=r"genre 'nw' is not among data.genres \('bc',\)"):
        coref.build_features([doc], tokenizer, seq_len=48, max_mentions=5, max_span_width=30, genres=("bc",))


def test_unknown_subtokens_and_long_documents(tokenizer, tmp_path):
    record = _record(tokenizer)
    record["sentences"][0][1] = "NotAToken"
    (doc,) = coref.read_jsonlines(_write(tmp_path / "a.jsonlines", [record]))
    with pytest.raises(ValueError, match="subtoken 'NotAToken' is not in the tokenizer's vocabulary"):
        coref.build_features([doc], tokenizer, seq_len=48, max_mentions=5, max_span_width=30)
    (doc,) = coref.read_jsonlines(_write(tmp_path / "b.jsonlines", [_record(tokenizer)]))
    cut = doc.clusters[0][1][1]  # the second "the river" ends at this subtoken
    with pytest.raises(ValueError, match="more than seq_len=.*data.truncate"):
        coref.build_features([doc], tokenizer, seq_len=cut, max_mentions=5, max_span_width=30)
    features = coref.build_features([doc], tokenizer, seq_len=cut, max_mentions=5, max_span_width=30, truncate=True)
    # The cut takes the second "the river"; the first, left alone, goes too (no singleton made by the cut).
    # The stone cluster, a singleton in the file itself, is kept whole.
    assert features.truncated == 1 and features.dropped_mentions == 2
    assert features.clusters[0] == [list(doc.clusters[1])]
    assert features.gold_clusters[0].tolist().count(1) == 1 and (features.gold_clusters[0] == 2).sum() == 0
    widths = [e - s + 1 for cluster in doc.clusters for s, e in cluster]
    narrow = coref.build_features([doc], tokenizer, seq_len=48, max_mentions=5, max_span_width=min(widths))
    assert narrow.too_wide_mentions == sum(w > min(widths) for w in widths) > 0


def test_predicted_clusters_follow_the_best_antecedents():
    starts, ends = np.array([0, 2, 4, 6, 8]), np.array([1, 2, 4, 7, 9])
    mask = np.array([True, True, True, True, False])
    antecedents = np.array([[0, 0], [0, 0], [1, 0], [2, 0], [3, 0]])
    scores = np.array([
        [0.0, -np.inf, -np.inf],
        [0.0, -1.0, -np.inf],  # span 1 prefers the dummy
        [0.0, 2.0, 1.0],  # span 2 -> span 1
        [0.0, 3.0, -np.inf],  # span 3 -> span 2, joining that cluster
        [0.0, 9.0, 9.0],  # not kept: ignored
    ])
    assert coref.predicted_clusters(starts, ends, mask, antecedents, scores) == [[(2, 2), (4, 4), (6, 7)]]
    assert coref.predicted_clusters(starts, ends, mask, antecedents, np.zeros_like(scores)) == []


def test_gold_links_decode_to_the_gold_clusters_and_score_100():
    from longjax.data import coref_eval

    gold = [[(0, 1), (5, 6), (9, 9)], [(2, 2), (7, 8)]]
    spans = sorted(m for cluster in gold for m in cluster) + [(3, 4)]  # plus a kept span that is no mention
    starts, ends = np.array([s for s, _ in spans]), np.array([e for _, e in spans])
    cluster_of = {m: c for c, cluster in enumerate(gold) for m in cluster}
    k = len(spans)
    antecedents = np.tile(np.arange(k), (k, 1))  # every span may point at any kept span
    scores = np.full((k, k + 1), -np.inf)
    scores[:, 0] = 0.0
    for i, span in enumerate(spans):
        earlier = [j for j in range(i) if span in cluster_of and cluster_of.get(spans[j]) == cluster_of[span]]
        if earlier:
            scores[i, earlier[-1] + 1] = 5.0  # the nearest earlier mention of its cluster
    clusters = coref.predicted_clusters(starts, ends, np.ones(k, bool), antecedents, scores)
    assert sorted(map(sorted, clusters)) == sorted(map(sorted, gold))
    scorer = coref_eval.CorefScorer()
    scorer.update(gold, clusters)
    assert scorer.result()["conll_f1"] == 100.0
