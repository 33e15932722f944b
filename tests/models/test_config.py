"""Model configs: conversion from dicts, per-layer attention, errors that name the field."""

import dataclasses

import jax.numpy as jnp
import ml_collections
import pytest

from longjax import models
from longjax.attention import sliding_window_attention
from longjax.models import config as model_config


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


# Every bad value of every attention option, caught when the model config is built: (overrides,
# config path, value, what is allowed), each of which the error must name.
_SLIDING = dict(type="sliding_window", window=8)
_BLOCK_SPARSE = dict(type="block_sparse", block_size=4)
_PERFORMER = dict(type="performer", num_features=16)
BAD_ATTENTION_VALUES = {
    "window_negative_in_per_layer_list": (
        dict(attention_per_layer=dict(window=[16, -32, 64])),
        "model.attention_per_layer.window[1]", "-32", "an int >= 0 or a (left, right) pair of ints >= 0",
    ),
    "window_float": (dict(attention=_SLIDING | dict(window=2.5)), "model.attention.window", "2.5", "an int >= 0"),
    "window_bool": (dict(attention=_SLIDING | dict(window=True)), "model.attention.window", "True", "an int >= 0"),
    "window_pair_negative": (
        dict(attention=_SLIDING | dict(window=(4, -1))), "model.attention.window", "(4, -1)", "pair of ints >= 0",
    ),
    "window_three_values": (
        dict(attention=_SLIDING | dict(window=[1, 2, 3])), "model.attention.window", "(1, 2, 3)", "(left, right) pair",
    ),
    "dilation_zero": (dict(attention=_SLIDING | dict(dilation=0)), "model.attention.dilation", "0", ">= 1"),
    "dilation_zero_in_per_layer_list": (
        dict(attention_per_layer=dict(dilation=[1, (1, 1, 0, 2), 1])),
        "model.attention_per_layer.dilation[1]", "(1, 1, 0, 2)", ">= 1",
    ),
    "dilation_one_per_head": (
        dict(attention=_SLIDING | dict(dilation=(1, 2))), "model.attention.dilation", "(1, 2)",
        "one entry per head (4)",
    ),
    "dilation_float": (dict(attention=_SLIDING | dict(dilation=1.5)), "model.attention.dilation", "1.5", "an int >= 1"),
    "global_projections_int": (
        dict(attention=_SLIDING | dict(global_projections=1)), "model.attention.global_projections", "1",
        "True or False",
    ),
    "sliding_max_global_tokens_zero": (
        dict(attention=_SLIDING | dict(max_global_tokens=0)), "model.attention.max_global_tokens", "0",
        "an int >= 1 or None",
    ),
    "sliding_block_size_zero": (
        dict(attention=_SLIDING | dict(block_size=0)), "model.attention.block_size", "0", "an int >= 1 or None",
    ),
    "sliding_impl_unknown": (
        dict(attention=_SLIDING | dict(impl="cuda")), "model.attention.impl", "'cuda'", "None or one of",
    ),
    "block_sparse_block_size_zero": (
        dict(attention=_BLOCK_SPARSE | dict(block_size=0)), "model.attention.block_size", "0", "an int >= 1",
    ),
    "block_sparse_block_size_none": (
        dict(attention=_BLOCK_SPARSE | dict(block_size=None)), "model.attention.block_size", "None", "an int >= 1",
    ),
    "num_window_blocks_even": (
        dict(attention=_BLOCK_SPARSE | dict(num_window_blocks=4)), "model.attention.num_window_blocks", "4",
        "a positive odd int",
    ),
    "num_window_blocks_bool": (
        dict(attention=_BLOCK_SPARSE | dict(num_window_blocks=True)), "model.attention.num_window_blocks", "True",
        "a positive odd int",
    ),
    "num_random_blocks_negative": (
        dict(attention=_BLOCK_SPARSE | dict(num_random_blocks=-1)), "model.attention.num_random_blocks", "-1",
        "an int >= 0",
    ),
    "num_random_blocks_in_per_layer_list": (
        dict(attention=_BLOCK_SPARSE, attention_per_layer=dict(num_random_blocks=[1, 2, 2.0])),
        "model.attention_per_layer.num_random_blocks[2]", "2.0", "an int >= 0",
    ),
    "global_blocks_not_ints": (
        dict(attention=_BLOCK_SPARSE | dict(global_blocks=(0, 1.5))), "model.attention.global_blocks", "(0, 1.5)",
        "a sequence of ints",
    ),
    "block_sparse_max_global_tokens_zero": (
        dict(attention=_BLOCK_SPARSE | dict(max_global_tokens=0)), "model.attention.max_global_tokens", "0",
        "an int >= 1 or None",
    ),
    "num_features_zero": (
        dict(attention=_PERFORMER | dict(num_features=0)), "model.attention.num_features", "0", "an int >= 1",
    ),
    "feature_map_unknown": (
        dict(attention=_PERFORMER | dict(feature_map="exp")), "model.attention.feature_map", "'exp'",
        "one of ('softmax', 'relu')",
    ),
    "orthogonal_int": (
        dict(attention=_PERFORMER | dict(orthogonal=0)), "model.attention.orthogonal", "0", "True or False",
    ),
    "redraw_interval_zero": (
        dict(attention=_PERFORMER | dict(redraw_interval=0)), "model.attention.redraw_interval", "0",
        "an int >= 1 or None",
    ),
    "chunk_size_zero": (
        dict(attention=_PERFORMER | dict(chunk_size=0)), "model.attention.chunk_size", "0", "an int >= 1 or None",
    ),
    "chunk_size_in_per_layer_list": (
        dict(attention=_PERFORMER, attention_per_layer=dict(chunk_size=[None, 64, -8])),
        "model.attention_per_layer.chunk_size[2]", "-8", "an int >= 1 or None",
    ),
    "performer_impl_unknown": (
        dict(attention=_PERFORMER | dict(impl="fast")), "model.attention.impl", "'fast'", "None or one of",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ATTENTION_VALUES))
def test_bad_attention_values_name_the_path_the_value_and_what_is_allowed(case):
    overrides, path, value, allowed = BAD_ATTENTION_VALUES[case]
    with pytest.raises(ValueError) as error:
        models.transformer_config(_model(**overrides))
    message = str(error.value)
    for part in (path, value, allowed):
        assert part in message, (part, message)


def test_a_per_layer_value_names_its_list_entry_and_the_layer_field_it_sets():
    with pytest.raises(ValueError) as error:
        models.transformer_config(_model(attention_per_layer=dict(window=[16, -32, 64])))
    assert str(error.value).startswith("model.attention_per_layer.window[1] -> model.attention[1].window ")


def test_the_config_and_the_op_apply_the_same_rule():
    # The very check of the op, named by the config path: the same words after the name.
    with pytest.raises(ValueError) as config_error:
        models.transformer_config(_model(attention=dict(type="sliding_window", window=-32)))
    q = jnp.ones((1, 8, 4, 8))
    with pytest.raises(ValueError) as op_error:
        sliding_window_attention(q, q, q, window=-32)
    assert str(op_error.value).startswith("window must be non-negative")
    assert str(config_error.value) == "model.attention." + str(op_error.value)


def test_a_directly_built_transformer_config_is_checked_by_the_same_rules():
    with pytest.raises(ValueError, match=r"model.attention\[1\].num_window_blocks must be a positive odd int"):
        models.TransformerConfig(
            vocab_size=256, num_layers=2, num_heads=4, d_model=32, d_ff=64,
            attention=(models.BlockSparseAttention(), models.BlockSparseAttention(num_window_blocks=2)),
        )


def test_every_attention_option_has_a_rule():
    for cls in models.ATTENTION_TYPES.values():
        assert set(model_config._OPTION_RULES[cls]) == {f.name for f in dataclasses.fields(cls)}, cls


def test_dilation_count_waits_for_a_valid_num_heads():
    # With num_heads itself invalid, the model config reports num_heads, not a dilation mismatch.
    with pytest.raises(ValueError, match="model.num_heads must be a positive int"):
        models.transformer_config(_model(num_heads=0, attention=dict(type="sliding_window", window=2, dilation=(1, 2))))
