"""Model configs: conversion from dicts, per-layer attention, errors that name the field."""

import ml_collections
import pytest

from longjax import models


def _model(**overrides):
    fields = dict(vocab_size=256, num_layers=3, num_heads=4, d_model=32, d_ff=64,
                  attention=dict(type="sliding_window", window=8))
    fields.update(overrides)
    return fields


def test_per_layer_fields_override_the_shared_ones():
    cfg = models.transformer_config(
        _model(attention_per_layer=dict(window=[2, 4, 8], dilation=[1, 1, (1, 1, 2, 2)]))
    )
    assert [a.window for a in cfg.attention] == [2, 4, 8]
    assert cfg.attention[2].dilation == (1, 1, 2, 2)
    assert all(isinstance(a, models.SlidingWindowAttention) for a in cfg.attention)


def test_config_dict_input_is_accepted():
    model = ml_collections.ConfigDict(_model(attention_per_layer=dict(window=[2, 4, 8])))
    cfg = models.transformer_config(model)
    assert cfg.attention[1].window == 4 and cfg.head_dim == 8


def test_a_field_the_attention_type_does_not_take_is_an_error():
    with pytest.raises(ValueError, match=r"'full' takes no field\(s\) \['window'\]"):
        models.transformer_config(_model(attention=dict(type="full", window=8)))
    with pytest.raises(ValueError, match="num_features"):
        models.transformer_config(_model(attention=dict(type="sliding_window", num_features=8)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention=dict(type="dense")), r"model.attention.type must be one of"),
        (dict(attention_per_layer=dict(window=[2, 4])), r"attention_per_layer.window must list one value per layer"),
        (dict(attention_per_layer=dict(dilation=[1, 1, (2, 2)])), r"attention\[2\].dilation must be an int or one int per head"),
        (dict(d_model=30), r"model.d_model \(30\) must be divisible by model.num_heads"),
        (dict(position="alibi"), r"model.position must be one of"),
        (dict(position="learned"), r"model.max_positions must be a positive int"),
        (dict(dropout=1.5), r"model.dropout must be a number in \[0, 1\)"),
        (dict(hidden=3), r"model: unknown field\(s\) \['hidden'\]"),
        (dict(attention=dict(type="performer", feature_map="exp")), r"feature_map must be one of"),
        (dict(attention=dict(type="full", impl="pallas")), r"impl must be one of"),
    ],
)
def test_bad_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        models.transformer_config(_model(**overrides))
