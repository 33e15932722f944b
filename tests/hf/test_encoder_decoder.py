"""BART and LED checkpoints: outputs and generate() against transformers' recorded ones, save and reload."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longjax import hf
from longjax.hf.encoder_decoder_pretrained import EncoderDecoderPretrained
from tests.hf.fixture_paths import ATOL, HF, copy_checkpoint, recorded

GENERATION = ("bart_generation", "led_generation")


def _generate_cases() -> list:
    return [pytest.param(name, case, id=f"{name}-{case}") for name in GENERATION
            for case in json.loads((HF / name / "generate_expected.json").read_text())["cases"]]


@pytest.fixture(scope="module")
def models():
    return {name: hf.from_pretrained(HF / name) for name in ("bart", "led") + GENERATION}


def _run(model, want):
    return model.outputs(want["input_ids"], want["attention_mask"], want.get("global_attention_mask"),
                         want["decoder_input_ids"])


@pytest.mark.parametrize("name", ("bart", "led") + GENERATION)
def test_outputs_match_transformers(models, name):
    model, want = models[name], recorded(name)
    assert isinstance(model, EncoderDecoderPretrained)
    got = _run(model, want)
    real = want["attention_mask"].astype(bool)
    np.testing.assert_allclose(got["encoder_last_hidden_state"][real], want["encoder_last_hidden_state"][real],
                               rtol=0, atol=ATOL)
    if "logits" in want:  # the generation classes
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=0, atol=ATOL)
        assert model.newly_initialized == ()
    else:  # the bare models: their decoder output; the bias the checkpoint lacks starts at zeros
        np.testing.assert_allclose(got["last_hidden_state"], want["last_hidden_state"], rtol=0, atol=ATOL)
        assert model.newly_initialized == ("final_logits_bias",)


def test_led_puts_global_attention_on_the_first_token_by_default(models):
    model, want = models["led_generation"], recorded("led_generation")
    assert (want["global_attention_mask"][:, 0] == 1).all() and want["global_attention_mask"][:, 1:].sum() == 0
    default = model.outputs(want["input_ids"], want["attention_mask"], None, want["decoder_input_ids"])
    np.testing.assert_allclose(default["logits"], want["logits"], rtol=0, atol=ATOL)
    none = model.outputs(want["input_ids"], want["attention_mask"], np.zeros_like(want["input_ids"]),
                         want["decoder_input_ids"])
    assert np.abs(np.asarray(none["logits"]) - want["logits"]).max() > 1e-3  # the default mattered


@pytest.mark.parametrize("name,case", _generate_cases())
def test_generate_matches_transformers(models, name, case):
    """Sequences equal transformers' generate() exactly and beam scores (sequences_scores) to 1e-5."""
    expected = json.loads((HF / name / "generate_expected.json").read_text())["cases"][case]
    want = recorded(name)
    sequences, scores = models[name].generate(
        want["input_ids"], want["attention_mask"], want.get("global_attention_mask"), **expected["settings"])
    np.testing.assert_array_equal(sequences, np.array(expected["sequences"]))
    if expected["scores"] is not None:
        np.testing.assert_allclose(scores, np.array(expected["scores"]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", GENERATION)
def test_generation_defaults_are_the_checkpoints(models, name):
    defaults = json.loads((HF / name / "generate_expected.json").read_text())["defaults"]
    settings = models[name].generation
    for field, value in defaults.items():
        if value is not None:
            assert getattr(settings, field) == value, field
    assert settings.forced_eos_token_id == (2 if name.startswith("bart") else None)


def test_save_and_reload_round_trips(models, tmp_path):
    model = models["led_generation"]
    out = hf.save_pretrained(model, tmp_path / "saved")
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    again = hf.from_pretrained(out)
    assert again.architecture == "LEDForConditionalGeneration" and again.newly_initialized == ()
    want = recorded("led_generation")
    np.testing.assert_array_equal(_run(again, want)["logits"], _run(model, want)["logits"])


def test_errors_name_the_field(tmp_path, models):
    want = recorded("bart")
    with pytest.raises(ValueError, match="global_attention_mask: BartModel has no global attention"):
        models["bart"].outputs(want["input_ids"], global_attention_mask=np.ones_like(want["input_ids"]))
    with pytest.raises(ValueError, match=r"generate: unknown setting\(s\) \['beams'\]"):
        models["bart_generation"].generate(want["input_ids"], beams=2)
    with pytest.raises(ValueError, match="decode.early_stopping must be True, False or 'never'"):
        models["bart_generation"].generate(want["input_ids"], early_stopping="sometimes")
    with pytest.raises(ValueError, match=r"decode.num_return_sequences \(3\) must be <= decode.num_beams \(2\)"):
        models["bart_generation"].generate(want["input_ids"], num_beams=2, num_return_sequences=3)
    edited = copy_checkpoint("bart", tmp_path)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(dict(config, normalize_before=True)))
    with pytest.raises(ValueError, match="normalize_before=true is not supported"):
        hf.from_pretrained(edited)


def test_decoder_inputs_default_to_the_shifted_input_ids(models):
    model, want = models["bart_generation"], recorded("bart_generation")
    labels = np.array([[0, 7, 9, 2, -100, -100]])
    np.testing.assert_array_equal(model.shift_tokens_right(labels), [[2, 0, 7, 9, 2, 1]])  # start </s>, -100 -> <pad>
    ids = want["input_ids"]
    default = model.outputs(ids, want["attention_mask"])
    explicit = model.outputs(ids, want["attention_mask"], decoder_input_ids=model.shift_tokens_right(ids))
    np.testing.assert_array_equal(default["logits"], explicit["logits"])
