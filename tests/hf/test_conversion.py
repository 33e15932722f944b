"""RoBERTa -> Longformer and BART -> LED conversions, through the library and `python -m longjax.convert`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longjax import convert, hf
from longjax.hf import checkpoint_files, conversion
from tests.hf.fixture_paths import ATOL, HF, inputs_of, recorded


@pytest.fixture(scope="module")
def longformer_dir(tmp_path_factory):
    """roberta_mlm converted with a window (64) wider than the fixture inputs (24 tokens)."""
    out = tmp_path_factory.mktemp("convert") / "longformer"
    assert convert.main([
        "roberta-to-longformer", f"--src={HF / 'roberta_mlm'}", f"--out={out}",
        "--max-positions=128", "--attention-window=64",
    ]) == 0
    return out


def test_tile_rows():
    table = np.arange(10, dtype=np.float32).reshape(5, 2)
    tiled = conversion.tile_rows(table, 7, keep=2)
    assert tiled.shape == (9, 2)
    np.testing.assert_array_equal(tiled[:2], table[:2])
    np.testing.assert_array_equal(tiled[2:], table[[2, 3, 4, 2, 3, 4, 2]])
    with pytest.raises(ValueError, match="rows must be positive"):
        conversion.tile_rows(table, 0)


def test_longformer_checkpoint_layout(longformer_dir):
    source, _ = checkpoint_files.read_checkpoint_tensors(HF / "roberta_mlm")
    converted, path = checkpoint_files.read_checkpoint_tensors(longformer_dir)
    assert path.name == "model.safetensors"
    # Positions: 128 usable rows plus RoBERTa's two offset rows, copied from the source, then the
    # source's 38 learned rows repeated end to end.
    table = source["roberta.embeddings.position_embeddings.weight"]
    positions = converted["longformer.embeddings.position_embeddings.weight"]
    assert positions.shape == (130, 32)
    np.testing.assert_array_equal(positions[:2], table[:2])
    for start in range(2, 130, len(table) - 2):
        rows = positions[start : start + len(table) - 2]
        np.testing.assert_array_equal(rows, table[2 : 2 + len(rows)])
    # Globals equal locals; every other weight is the source's under the longformer. prefix.
    for layer in range(2):
        for p in ("query", "key", "value"):
            for part in ("weight", "bias"):
                local = converted[f"longformer.encoder.layer.{layer}.attention.self.{p}.{part}"]
                np.testing.assert_array_equal(converted[f"longformer.encoder.layer.{layer}.attention.self.{p}_global.{part}"], local)
    for name, tensor in source.items():
        if "position_embeddings" not in name:
            np.testing.assert_array_equal(converted[name.replace("roberta.", "longformer.", 1)], tensor, err_msg=name)
    assert len(converted) == len(source) + 2 * 3 * 2  # layers x global projections x (weight, bias)
    config = json.loads((longformer_dir / "config.json").read_text())
    assert config["model_type"] == "longformer" and config["architectures"] == ["LongformerForMaskedLM"]
    assert config["attention_window"] == [64, 64] and config["max_position_embeddings"] == 130
    assert config["layer_norm_eps"] == 1e-5 and config["sep_token_id"] == 2
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (longformer_dir / name).read_bytes() == (HF / "roberta_mlm" / name).read_bytes()
    assert json.loads((longformer_dir / "tokenizer_config.json").read_text())["model_max_length"] == 128


def test_default_max_positions_gives_allenai_table(tmp_path):
    out = conversion.roberta_to_longformer(HF / "roberta_base_bf16", tmp_path / "lf")
    tensors, _ = checkpoint_files.read_checkpoint_tensors(out)
    assert tensors["embeddings.position_embeddings.weight"].shape == (4098, 32)
    assert str(tensors["embeddings.position_embeddings.weight"].dtype) == "bfloat16"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LongformerModel"] and config["attention_window"] == [512, 512]


def test_converted_equals_roberta(longformer_dir):
    """With the window wider than the input, the Longformer computes RoBERTa: bitwise with the dense
    reference attention on both sides, to float32 rounding with the default kernels (different
    summation orders), and to transformers' recorded RoBERTa outputs at 1e-5."""
    want = recorded("roberta_mlm")
    real = want["attention_mask"].astype(bool)
    args = inputs_of(want)
    roberta = hf.from_pretrained(HF / "roberta_mlm", attention_impl="reference").outputs(**args)
    longformer = hf.from_pretrained(longformer_dir, attention_impl="reference").outputs(**args)
    for key in ("last_hidden_state", "logits"):
        np.testing.assert_array_equal(np.asarray(longformer[key]), np.asarray(roberta[key]))
    fast = hf.from_pretrained(longformer_dir)
    logits = np.asarray(fast.outputs(**args)["logits"])
    np.testing.assert_allclose(logits, np.asarray(roberta["logits"]), rtol=0, atol=ATOL)
    np.testing.assert_allclose(logits[real], want["logits"][real], rtol=0, atol=ATOL)
    # Globals too: their projections are the local ones, so [CLS] global attends as it did.
    cls_global = np.zeros_like(want["input_ids"])
    cls_global[:, 0] = 1
    with_global = np.asarray(fast.outputs(**args, global_attention_mask=cls_global)["logits"])
    np.testing.assert_allclose(with_global[real], want["logits"][real], rtol=0, atol=ATOL)


def test_bart_to_led_matches_transformers_led_layout(tmp_path):
    """Converted with LED-fixture sizes, the names and shapes are exactly those of transformers' own LEDModel."""
    out = tmp_path / "led"
    assert convert.main([
        "bart-to-led", f"--src={HF / 'bart'}", f"--out={out}", "--max-encoder-positions=64", "--attention-window=6",
    ]) == 0
    converted, _ = checkpoint_files.read_checkpoint_tensors(out)
    reference, _ = checkpoint_files.read_checkpoint_tensors(HF / "led")
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in reference.items()}
    bart, _ = checkpoint_files.read_checkpoint_tensors(HF / "bart")
    encoder = bart["encoder.embed_positions.weight"]  # 34 rows: BART's 2 offset rows, then 32 positions
    np.testing.assert_array_equal(converted["encoder.embed_positions.weight"][:32], encoder[2:])
    np.testing.assert_array_equal(converted["encoder.embed_positions.weight"][32:], encoder[2:])
    np.testing.assert_array_equal(converted["decoder.embed_positions.weight"], bart["decoder.embed_positions.weight"][2:])
    for layer in range(2):
        attn = f"encoder.layers.{layer}.self_attn"
        for bart_name, led_name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            for part in ("weight", "bias"):
                source = bart[f"{attn}.{bart_name}.{part}"]
                np.testing.assert_array_equal(converted[f"{attn}.longformer_self_attn.{led_name}.{part}"], source)
                np.testing.assert_array_equal(converted[f"{attn}.longformer_self_attn.{led_name}_global.{part}"], source)
        np.testing.assert_array_equal(converted[f"{attn}.output.weight"], bart[f"{attn}.out_proj.weight"])
        dec = f"decoder.layers.{layer}.self_attn.q_proj.weight"
        np.testing.assert_array_equal(converted[dec], bart[dec])
    config = json.loads((out / "config.json").read_text())
    led_config = json.loads((HF / "led" / "config.json").read_text())
    for key in ("model_type", "architectures", "max_encoder_position_embeddings", "max_decoder_position_embeddings",
                "d_model", "encoder_layers", "decoder_layers", "activation_function", "pad_token_id"):
        assert config[key] == led_config[key], key
    assert config["attention_window"] == [6, 6] and "max_position_embeddings" not in config
    assert type(hf.from_pretrained(out)).__name__ == "EncoderDecoderPretrained"


def test_bart_to_led_computes_what_bart_computes(tmp_path):
    """With windows wider than the input, longjax's LED from the converted directory gives BART's outputs."""
    out = conversion.bart_to_led(HF / "bart", tmp_path / "led", max_encoder_positions=64, attention_window=64)
    want = recorded("bart")
    led = hf.from_pretrained(out)
    got = led.outputs(want["input_ids"], want["attention_mask"], np.zeros_like(want["input_ids"]),
                      want["decoder_input_ids"])
    real = want["attention_mask"].astype(bool)
    np.testing.assert_allclose(got["encoder_last_hidden_state"][real], want["encoder_last_hidden_state"][real],
                               rtol=0, atol=ATOL)
    np.testing.assert_allclose(got["last_hidden_state"], want["last_hidden_state"], rtol=0, atol=ATOL)


def test_conversion_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="attention_window must be a positive even int"):
        conversion.roberta_to_longformer(HF / "roberta_mlm", tmp_path / "a", attention_window=63)
    with pytest.raises(ValueError, match="model_type is 'longformer', expected 'roberta'"):
        conversion.roberta_to_longformer(HF / "longformer_mlm", tmp_path / "b")
    with pytest.raises(ValueError, match="model_type is 'roberta', expected 'bart'"):
        conversion.bart_to_led(HF / "roberta_mlm", tmp_path / "c")
    with pytest.raises(ValueError, match="max_encoder_positions must be a positive int"):
        conversion.bart_to_led(HF / "bart", tmp_path / "d", max_encoder_positions=0)
    assert convert.main(["roberta-to-longformer", f"--src={tmp_path / 'absent'}", f"--out={tmp_path / 'e'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "absent: no config.json" in err
