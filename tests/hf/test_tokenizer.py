"""load_tokenizer against the ids transformers gave, task tokens, and growing the embedding table for them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from longjax import hf
from longjax.hf.tokenizer import add_task_tokens, load_tokenizer
from tests.hf.fixture_paths import HF, inputs_of, recorded

EXPECTED = json.loads((HF / "tokenizer_expected.json").read_text())


def _vocab_merges_only(tmp_path):
    out = tmp_path / "bpe_files"
    out.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(HF / "tokenizer" / name, out / name)
    return out


def test_tokenizer_json_gives_transformers_ids():
    tokenizer = load_tokenizer(HF / "tokenizer")
    assert [tokenizer.encode(t).ids for t in EXPECTED["texts"]] == EXPECTED["input_ids"]


def test_vocab_and_merges_rebuild_the_same_tokenizer(tmp_path):
    full = load_tokenizer(HF / "tokenizer")
    rebuilt = load_tokenizer(_vocab_merges_only(tmp_path))
    assert [rebuilt.encode(t).ids for t in EXPECTED["texts"]] == EXPECTED["input_ids"]
    pair = ("question answer", "the long <mask> document")
    assert rebuilt.encode(*pair).ids == full.encode(*pair).ids
    ids = full.encode(*pair).ids
    assert ids[0] == 0 and ids.count(2) == 3 and ids[-1] == 2  # <s> a </s></s> b </s>
    assert rebuilt.decode(ids, skip_special_tokens=True) == full.decode(ids, skip_special_tokens=True)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, nor vocab.json and merges.txt"):
        load_tokenizer(tmp_path)


def test_task_tokens_grow_the_model(tmp_path):
    tokenizer = load_tokenizer(HF / "tokenizer")
    pieces = add_task_tokens(tokenizer, ["[q]", "[/q]", "[ent]", "[/ent]"])
    assert [tokenizer.token_to_id(t) for t in ["[q]", "[/q]", "[ent]", "[/ent]"]] == [320, 321, 322, 323]
    assert all(pieces) and tokenizer.encode("[q] a [/q]", add_special_tokens=False).ids[0] == 320
    with pytest.raises(ValueError, match=r"tokens: '\[q\]' is already in the vocabulary \(id 320\)"):
        add_task_tokens(tokenizer, ["[q]"])

    model = hf.from_pretrained(HF / "longformer_mlm")
    grown = model.with_new_tokens(pieces)
    assert grown.config.vocab_size == 324
    table = np.asarray(grown.params["encoder"]["embed"]["embedding"])
    old = np.asarray(model.params["encoder"]["embed"]["embedding"])
    np.testing.assert_array_equal(table[:320], old)
    for row, ids in zip(table[320:], pieces):
        np.testing.assert_allclose(row, old[ids].mean(0), rtol=1e-6)
    bias = np.asarray(grown.params["head"]["bias"])
    np.testing.assert_allclose(bias[320:], [np.asarray(model.params["head"]["bias"])[ids].mean() for ids in pieces],
                               rtol=1e-6)
    # Old tokens compute what they did (hidden states bitwise; the wider logit matmul rounds its
    # sums differently); the new ones are usable.
    want = recorded("longformer_mlm")
    grown_out, old_out = grown.outputs(**inputs_of(want)), model.outputs(**inputs_of(want))
    np.testing.assert_array_equal(grown_out["last_hidden_state"], old_out["last_hidden_state"])
    np.testing.assert_allclose(np.asarray(grown_out["logits"])[..., :320], old_out["logits"], rtol=0, atol=1e-5)
    ids = np.asarray([tokenizer.encode("[q] question answer [/q] paper").ids])
    assert np.isfinite(np.asarray(grown.apply(ids))).all()
    with pytest.raises(ValueError, match=r"rows\[0\] must be a non-empty list of ids in \[0, 320\)"):
        model.with_new_tokens([[]])

    # Saved with its tokenizer, the grown model and its tokens load back.
    out = hf.save_pretrained(grown, tmp_path / "grown", tokenizer=tokenizer)
    again = hf.from_pretrained(out)
    assert again.config.vocab_size == 324
    np.testing.assert_array_equal(again.params["encoder"]["embed"]["embedding"], table)
    assert load_tokenizer(out).token_to_id("[/ent]") == 323
