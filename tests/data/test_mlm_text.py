"""Masked-LM text: documents read, packed across document ends, characters per token, RoBERTa's masking."""

import json

import numpy as np
import pytest

from longjax.data import mlm_text
from longjax.hf.tokenizer import load_tokenizer
from tests.hf.fixture_paths import HF


def test_documents_from_text_files_and_json_lines(tmp_path, caplog):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": " "}) + "\n")
    (tmp_path / "ignored.md").write_text("not a document")
    documents = mlm_text.read_documents(tmp_path)
    assert [(d.source, d.text) for d in documents] == [("a.jsonl:0", "one"), ("b.txt", "second file")]
    assert "skipped 1 empty documents" in caplog.text
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n{"body": 1}\n')
    with pytest.raises(ValueError, match=r"c.jsonl: line 1 must be an object with a string 'text'"):
        mlm_text.read_documents(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        mlm_text.read_documents(tmp_path / "none")


def test_packing_runs_across_documents_and_drops_the_partial_block():
    docs = [np.arange(10, 15), np.arange(20, 23)]
    chars = [np.ones(5), np.full(3, 2.0)]
    packed = mlm_text.pack_documents(docs, chars, 4, bos_id=0, eos_id=2)
    stream = [0, 10, 11, 12, 13, 14, 2, 0, 20, 21, 22, 2]
    np.testing.assert_array_equal(packed.tokens.reshape(-1), stream[:12])
    assert packed.tokens.shape == (3, 4) and packed.dropped == 0
    np.testing.assert_array_equal(packed.token_chars.reshape(-1), [0, 1, 1, 1, 1, 1, 0, 0, 2, 2, 2, 0])
    assert mlm_text.pack_documents(docs, chars, 5, bos_id=0, eos_id=2).dropped == 2


def test_characters_per_token_sum_to_the_text_and_count_spaces_once():
    tokenizer = load_tokenizer(HF / "tokenizer")
    text = "Über  c++ was made, naïvely."
    encoding = tokenizer.encode(text, add_special_tokens=False)
    chars = mlm_text.token_characters(encoding.offsets)
    assert chars.sum() == len(text)
    assert (chars >= 0).all()


def test_masking_rates_and_targets():
    rng = np.random.default_rng(0)
    special = (0, 1, 2, 3, 4)
    tokens = rng.integers(5, 320, size=(400, 100)).astype(np.int32)
    tokens[:, 0], tokens[:, -1] = 0, 2
    inputs, targets = mlm_text.mask_tokens(tokens, np.random.default_rng(1), mask_id=4, vocab_size=320,
                                           special_ids=special)
    chosen = targets >= 0
    np.testing.assert_array_equal(targets[chosen], tokens[chosen])
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    # int(0.15 * 98 + u) is 14 or 15 per row.
    assert set(chosen.sum(1)) <= {14, 15}
    n = chosen.sum()
    masked = (inputs == 4) & chosen
    kept = (inputs == tokens) & chosen
    for count, p in ((masked.sum(), 0.8), (kept.sum(), 0.1)):
        sd = np.sqrt(n * p * (1 - p))
        # A random replacement can draw the original token (1 in 315), which counts as kept.
        assert abs(count - n * p) < 5 * sd + n / 315, (count, n * p)
    assert not np.isin(inputs[chosen & ~masked], special).any()
    again = mlm_text.mask_tokens(tokens, np.random.default_rng(1), mask_id=4, vocab_size=320, special_ids=special)
    np.testing.assert_array_equal(again[0], inputs)
