"""WikiHop: the qangaroo reader, the chunked input with task tokens, and accuracy."""

import json

import numpy as np
import pytest

from longjax.data import wikihop
from longjax.hf.tokenizer import add_task_tokens, load_tokenizer
from tests.hf.fixture_paths import HF


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer(HF / "tokenizer")
    add_task_tokens(tok, wikihop.TASK_TOKENS)
    return tok


def _records():
    return [{"id": "WH_0", "query": "located_in_the_country lamp", "answer": "river", "candidates": ["stone", "river"],
             "supports": ["The lamp stood by the river for a long while.", "Stone and river and cloud and sky."]}]


def test_reader_and_its_errors(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(_records() + [dict(_records()[0], answer="moon")]))
    with pytest.raises(ValueError, match=r"dev.json: record 1 is malformed: answer 'moon' is not among"):
        wikihop.read_qangaroo(path)
    (example,) = wikihop.read_qangaroo(path, skip_malformed=True)
    assert example.label == 1 and example.candidates == ("stone", "river")
    with pytest.raises(FileNotFoundError, match="train.json"):
        wikihop.read_qangaroo(tmp_path / "train.json")


def test_chunks_cover_every_support_token_once_and_repeat_the_prefix(tokenizer, tmp_path):
    (example,) = [wikihop._example(r) for r in _records()]
    features = wikihop.build_features([example], tokenizer, seq_len=64, max_chunks=30, max_candidates=3)
    encode = lambda t: tokenizer.encode(t, add_special_tokens=False).ids
    eos, ent = tokenizer.token_to_id("</s>"), tokenizer.token_to_id("[ent]")
    prefix = [0, tokenizer.token_to_id("[q]"), *encode("located in the country lamp"), tokenizer.token_to_id("[/q]")]
    for candidate in example.candidates:
        prefix += [ent, *encode(candidate), tokenizer.token_to_id("[/ent]")]
    prefix.append(eos)
    supports = [t for s in example.supports for t in (*encode(s), eos)]
    chunks = int(features.chunks[0])
    assert chunks == -(-len(supports) // (64 - len(prefix))) > 1
    body = []
    for c in range(30):
        row = features.input_ids[0, c][features.padding_mask[0, c]].tolist()
        assert features.chunk_mask[0, c] == (c < chunks)
        if c < chunks:
            assert row[: len(prefix)] == prefix
            body += row[len(prefix):]
            np.testing.assert_array_equal(features.global_mask[0, c], np.arange(64) < len(prefix) - 1)
            for k in range(2):
                assert row[features.candidate_positions[0, k]] == ent
        else:
            assert row == [] and not features.global_mask[0, c].any()
    assert body == supports
    np.testing.assert_array_equal(features.candidate_mask[0], [True, True, False])
    with pytest.raises(ValueError, match=r"'WH_0' needs \d+ chunks .* data.max_chunks"):
        wikihop.build_features([example], tokenizer, seq_len=40, max_chunks=1, max_candidates=3)
    cut = wikihop.build_features([example], tokenizer, seq_len=40, max_chunks=1, max_candidates=3, truncate=True)
    assert cut.truncated == 1 and cut.chunks[0] == 1


def test_accuracy_ignores_masked_candidates():
    scores = np.array([[0.1, 0.9, 5.0], [2.0, 1.0, 0.0]])
    mask = np.array([[True, True, False], [True, True, True]])
    assert wikihop.accuracy(scores, mask, np.array([1, 1])) == 0.5
