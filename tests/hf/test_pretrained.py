"""from_pretrained against transformers' recorded outputs, save_pretrained round trips, and every loading error."""

from __future__ import annotations

import importlib.util
import json

import jax
import ml_dtypes
import numpy as np
import pytest

from longjax import hf
from longjax.hf import checkpoint_files, pretrained as pretrained_lib
from tests.hf.fixture_paths import ATOL, HF, PAD, copy_checkpoint, inputs_of, recorded

# (checkpoint, recorded outputs, whether Hugging Face's padded positions match longjax's).
# RoBERTa attends from padded queries; longjax (and HF's Longformer) give them zero attention output.
CASES = [
    ("roberta_mlm", "roberta_mlm", False),
    ("roberta_base_bf16", "roberta_base_bf16", False),
    ("roberta_cls_bin", "roberta_cls_bin", True),
    ("longformer_mlm", "longformer_mlm", True),
    ("longformer_mlm", "longformer_mlm/no_global", True),
    ("longformer_base_bf16", "longformer_base_bf16", True),
    ("longformer_qa", "longformer_qa", True),
    ("longformer_cls", "longformer_cls", True),
    ("longformer_mc", "longformer_mc", True),
]


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(name, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = hf.from_pretrained(HF / name, **kwargs)
        return cache[key]

    return get


@pytest.mark.filterwarnings("error")  # every fixture weight is used and none is missing
@pytest.mark.parametrize("checkpoint, outputs, padded_match", CASES, ids=[c[1] for c in CASES])
def test_outputs_match_transformers(loaded, checkpoint, outputs, padded_match):
    want = recorded(outputs)
    model = loaded(checkpoint)
    got = model.outputs(**inputs_of(want))
    real = want["attention_mask"].astype(bool) if "attention_mask" in want else want["input_ids"] != PAD
    compared = [k for k in want if k not in inputs_of(want)]
    assert compared and set(compared) <= set(got)
    for key in compared:
        a, b = np.asarray(got[key]), want[key]
        assert a.shape == b.shape, key
        per_token = a.shape[: real.ndim] == real.shape
        if per_token and not padded_match:
            a, b = a[real], b[real]
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL, err_msg=f"{outputs}: {key}")


def test_apply_is_last_hidden_state_with_hf_argument_meanings(loaded):
    want = recorded("longformer_base_bf16")
    model = loaded("longformer_base_bf16")
    hidden = model.apply(want["input_ids"], want["attention_mask"], want["global_attention_mask"])
    assert hidden.shape == (3, 24, 32) and hidden.dtype == np.float32
    np.testing.assert_allclose(hidden, want["last_hidden_state"], rtol=0, atol=ATOL)
    # A global mark on a padded position is ignored, as in transformers.
    moved = want["global_attention_mask"].copy()
    moved[2, 20] = 0
    np.testing.assert_array_equal(model.apply(want["input_ids"], want["attention_mask"], moved), hidden)
    # Global tokens change the result (the fixture would not test them otherwise).
    no_global = model.apply(want["input_ids"], want["attention_mask"])
    assert np.abs(np.asarray(no_global) - np.asarray(hidden)).max() > 1e-2


def test_config_reads_every_setting(loaded):
    lf = loaded("longformer_mlm")
    assert [a.window for a in lf.config.attention] == [2, 3]  # attention_window [4, 6]: half each side
    assert all(a.global_projections for a in lf.config.attention)
    assert lf.config.position_offset == 1 and lf.config.max_positions == 66
    assert lf.config.layer_norm_epsilon == 1e-5 and lf.config.type_vocab_size == 1
    assert lf.architecture == "LongformerForMaskedLM" and lf.arch.head == "masked_lm"


def test_layer_norm_epsilon_changes_the_numbers(tmp_path):
    """config.json's layer_norm_eps is read, not assumed (1e-12 is RobertaConfig's default, 1e-5 roberta-base's)."""
    path = copy_checkpoint("roberta_mlm", tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, layer_norm_eps=0.5)))
    want = recorded("roberta_mlm")
    got = hf.from_pretrained(path).outputs(**inputs_of(want))["logits"]
    real = want["attention_mask"].astype(bool)
    assert np.abs(np.asarray(got)[real] - want["logits"][real]).max() > 1e-2


def test_parameter_dtypes():
    raw, _ = checkpoint_files.read_checkpoint_tensors(HF / "roberta_base_bf16")
    as_f32 = hf.from_pretrained(HF / "roberta_base_bf16")
    as_bf16 = hf.from_pretrained(HF / "roberta_base_bf16", param_dtype="bfloat16")
    table = raw["embeddings.word_embeddings.weight"]
    assert as_f32.params["encoder"]["embed"]["embedding"].dtype == np.float32
    assert as_bf16.params["encoder"]["embed"]["embedding"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(as_bf16.params["encoder"]["embed"]["embedding"], table)
    np.testing.assert_array_equal(as_f32.params["encoder"]["embed"]["embedding"], table.astype(np.float32))


def test_global_count_buckets_share_compilations(loaded):
    model = loaded("longformer_base_bf16")
    ids = recorded("longformer_base_bf16")["input_ids"]
    model._compiled.clear()
    for count in (1, 3, 4):
        mask = np.zeros_like(ids)
        mask[:, :count] = 1
        model.apply(ids, global_attention_mask=mask)
    assert sorted(model._compiled) == [1, 4]


@pytest.mark.parametrize("name", ["roberta_mlm", "longformer_mlm", "longformer_qa", "longformer_mc", "roberta_cls_bin"])
def test_save_then_load_is_identical(loaded, tmp_path, name):
    model = loaded(name)
    out = hf.save_pretrained(model, tmp_path / "saved", max_shard_bytes=50_000 if name == "longformer_mlm" else None)
    again = hf.from_pretrained(out)
    assert again.config == model.config and again.architecture == model.architecture
    assert jax.tree_util.tree_structure(again.params) == jax.tree_util.tree_structure(model.params)
    for a, b in zip(jax.tree_util.tree_leaves(again.params), jax.tree_util.tree_leaves(model.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # The saved weights are the source checkpoint's, name for name (transformers ties the LM decoder itself).
    source, _ = checkpoint_files.read_checkpoint_tensors(HF / name)
    saved, _ = checkpoint_files.read_checkpoint_tensors(out)
    assert set(saved) == set(source)
    for key in source:
        np.testing.assert_array_equal(saved[key], source[key], err_msg=key)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [model.architecture] and config["dtype"] == "float32"
    if name != "roberta_cls_bin":
        assert (out / "tokenizer.json").is_file() and (out / "vocab.json").is_file()


def test_save_in_bfloat16(loaded, tmp_path):
    model = loaded("roberta_base_bf16")
    out = hf.save_pretrained(model, tmp_path / "bf16", dtype="bfloat16")
    saved, _ = checkpoint_files.read_checkpoint_tensors(out)
    source, _ = checkpoint_files.read_checkpoint_tensors(HF / "roberta_base_bf16")
    assert set(saved) == set(source)
    for key in source:
        assert saved[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(saved[key], source[key])
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_other_heads_from_one_checkpoint():
    """A head the checkpoint lacks is drawn fresh and named; unused weights are named in a warning."""
    with pytest.warns(UserWarning) as record:
        cls = hf.from_pretrained(HF / "longformer_mlm", architecture="LongformerForSequenceClassification")
    messages = [str(w.message) for w in record]
    assert any("weights not used by LongformerForSequenceClassification" in m and "lm_head.dense.weight" in m
               for m in messages)
    assert any("'classifier.dense.weight'" in m and "drawn fresh" in m for m in messages)
    assert set(cls.newly_initialized) == {
        "classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight", "classifier.out_proj.bias"}
    mlm = hf.from_pretrained(HF / "longformer_mlm")
    np.testing.assert_array_equal(cls.params["encoder"]["embed"]["embedding"], mlm.params["encoder"]["embed"]["embedding"])
    want = recorded("longformer_mlm")
    logits = cls.outputs(want["input_ids"], want["attention_mask"])["logits"]
    assert logits.shape == (3, 2)
    # The bare model under a head's checkpoint: the pooler is new, the encoder computes the same.
    with pytest.warns(UserWarning):
        bare = hf.from_pretrained(HF / "longformer_mlm", architecture="LongformerModel")
    hidden = bare.apply(**inputs_of(want))
    np.testing.assert_array_equal(hidden, mlm.apply(**inputs_of(want)))


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_errors_name_the_file_and_weight(tmp_path):
    unknown = copy_checkpoint("roberta_mlm", tmp_path / "unknown")
    _edit_config(unknown, architectures=["RobertaForCausalLM"])
    with pytest.raises(ValueError, match=r"config.json: architecture 'RobertaForCausalLM' is not supported"):
        hf.from_pretrained(unknown)
    with pytest.raises(ValueError, match="needs model_type 'longformer'"):
        hf.from_pretrained(HF / "roberta_mlm", architecture="LongformerModel")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(FileNotFoundError, match="no_config: no config.json"):
        hf.from_pretrained(no_config)
    no_weights = copy_checkpoint("roberta_mlm", tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no_weights/roberta_mlm: no weights file"):
        hf.from_pretrained(no_weights)
    missing = copy_checkpoint("roberta_mlm", tmp_path / "missing")
    tensors, _ = hf.read_safetensors(missing / "model.safetensors")
    del tensors["roberta.encoder.layer.1.output.dense.bias"]
    hf.write_safetensors(missing / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"model.safetensors: weight 'roberta.encoder.layer.1.output.dense.bias' is missing"):
        hf.from_pretrained(missing)
    shaped = copy_checkpoint("longformer_qa", tmp_path / "shaped")
    _edit_config(shaped, max_position_embeddings=80)
    with pytest.raises(ValueError, match=r"model.safetensors: weight 'longformer.embeddings.position_embeddings.weight' "
                                         r"has shape \[66, 32\].*needs \[80, 32\]"):
        hf.from_pretrained(shaped)
    odd = copy_checkpoint("longformer_qa", tmp_path / "odd")
    _edit_config(odd, attention_window=5)
    with pytest.raises(ValueError, match=r"attention_window\[0\] must be a positive even int, got 5"):
        hf.from_pretrained(odd)
    relative = copy_checkpoint("roberta_mlm", tmp_path / "relative")
    _edit_config(relative, position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key' is not supported"):
        hf.from_pretrained(relative)
    extra = copy_checkpoint("roberta_mlm", tmp_path / "extra")
    tensors, _ = hf.read_safetensors(extra / "model.safetensors")
    tensors["roberta.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
    hf.write_safetensors(extra / "model.safetensors", tensors)
    with pytest.warns(UserWarning, match=r"weights not used by RobertaForMaskedLM: \['roberta.pooler.dense.weight'\]"):
        hf.from_pretrained(extra)


def test_path_that_is_not_a_directory(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="expected a checkpoint directory, got a file"):
        hf.from_pretrained(HF / "roberta_mlm" / "config.json")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        pretrained_lib.importlib.util, "find_spec",
        lambda name, *a: None if name == "huggingface_hub" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="allenai/longformer-base-4096: no such directory. Download the "
                                                "checkpoint .* and pass its directory"):
        hf.from_pretrained("allenai/longformer-base-4096")


def test_input_errors(loaded):
    want = recorded("longformer_qa")
    qa = loaded("longformer_qa")
    ids = want["input_ids"].copy()
    ids[0, 10] = 2  # a fourth separator
    with pytest.raises(ValueError, match=r"input_ids: LongformerForQuestionAnswering .* exactly three sep tokens"):
        qa.outputs(ids)
    with pytest.raises(ValueError, match=r"global_attention_mask: RobertaForMaskedLM has no global attention"):
        loaded("roberta_mlm").outputs(want["input_ids"], global_attention_mask=np.ones_like(ids))
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \[3, 24\], got \[3, 23\]"):
        qa.outputs(want["input_ids"], want["attention_mask"][:, :-1])
    with pytest.raises(ValueError, match="input_ids must be an int array of rank 3 for LongformerForMultipleChoice"):
        loaded("longformer_mc").outputs(want["input_ids"])
