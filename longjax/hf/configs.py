"""Hugging Face `config.json` of RoBERTa and Longformer models, read as longjax configs.

Every setting that changes the numbers is read; one that longjax cannot
reproduce is an error naming it, never a silent default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from longjax.models.config import FullAttention, SlidingWindowAttention, TransformerConfig


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One Hugging Face model class: its family, task head and whether it has the pooler."""

    name: str
    family: str  # 'roberta' or 'longformer'
    head: str | None
    pooler: bool

    @property
    def prefix(self) -> str:
        """The base model's weight-name prefix: none for the bare model, 'roberta.'/'longformer.' under a head."""
        return "" if self.head is None else f"{self.family}."


def _architectures() -> dict[str, Architecture]:
    table = {}
    for family, camel in (("roberta", "Roberta"), ("longformer", "Longformer")):
        for suffix, head, pooler in (
            ("Model", None, True),
            ("ForMaskedLM", "masked_lm", False),
            ("ForSequenceClassification", "classification", False),
            ("ForQuestionAnswering", "question_answering", False),
            ("ForMultipleChoice", "multiple_choice", True),
        ):
            table[camel + suffix] = Architecture(camel + suffix, family, head, pooler)
    return table


ARCHITECTURES: Mapping[str, Architecture] = _architectures()
# Encoder-decoders: loaded as LongEncoderDecoder models (see encoder_decoder_pretrained.py).
ENCODER_DECODERS = (
    "BartModel", "BartForConditionalGeneration", "LEDModel", "LEDForConditionalGeneration",
)
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def read_config_json(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's config.json as a dict; FileNotFoundError naming the directory if absent."""
    path = pathlib.Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face checkpoint directory)")
    return json.loads(path.read_text())


def architecture_of(hf_config: Mapping[str, Any], source: str, override: str | None = None) -> Architecture:
    """The architecture to build: `override`, else the first of config.json's `architectures`."""
    if override is not None:
        name = override
    else:
        names = hf_config.get("architectures") or []
        if not names:
            raise ValueError(
                f"{source}: config.json has no 'architectures'; pass architecture= one of {sorted(ARCHITECTURES)}"
            )
        name = names[0]
    if name in ENCODER_DECODERS:
        raise ValueError(f"{source}: {name} is an encoder-decoder; load it with from_pretrained, which returns an "
                         "EncoderDecoderPretrained")
    if name not in ARCHITECTURES:
        raise ValueError(f"{source}: architecture {name!r} is not supported; expected one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    model_type = hf_config.get("model_type")
    if model_type != arch.family:
        raise ValueError(f"{source}: architecture {name} needs model_type {arch.family!r}, config.json has {model_type!r}")
    return arch


def _require(hf_config: Mapping[str, Any], key: str, source: str):
    if key not in hf_config:
        raise ValueError(f"{source}: config.json lacks {key!r}")
    return hf_config[key]


def attention_windows(hf_config: Mapping[str, Any], source: str) -> list[int]:
    """Longformer's `attention_window` per layer: Hugging Face's full, even window (one side is half)."""
    layers = _require(hf_config, "num_hidden_layers", source)
    window = _require(hf_config, "attention_window", source)
    windows = [window] * layers if isinstance(window, int) else list(window)
    if len(windows) != layers:
        raise ValueError(f"{source}: attention_window has {len(windows)} entries for {layers} layers")
    for layer, w in enumerate(windows):
        if not isinstance(w, int) or w <= 0 or w % 2:
            raise ValueError(f"{source}: attention_window[{layer}] must be a positive even int, got {w!r}")
    return windows


def transformer_config_from_hf(
    hf_config: Mapping[str, Any], arch: Architecture, source: str, *, dtype: str = "float32",
    param_dtype: str = "float32", attention_impl: str | None = None,
) -> TransformerConfig:
    """The LongEncoder config that computes what the Hugging Face model computes.

    RoBERTa layers become dense attention; Longformer layers sliding-window
    attention with `window = attention_window // 2` keys each side and global
    projections. Positions are learned, offset by `pad_token_id`.
    Hugging Face's `attention_probs_dropout_prob` drops attention
    probabilities, which sparse kernels do not materialise; longjax drops the
    attention output instead (training only: inference is unaffected).
    """
    get = lambda key: _require(hf_config, key, source)
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"{source}: position_embedding_type {position_type!r} is not supported (expected 'absolute')")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf_config.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported: longjax loads these as bidirectional encoders")
    if arch.head == "masked_lm" and hf_config.get("tie_word_embeddings", True) is False:
        raise ValueError(f"{source}: tie_word_embeddings=false is not supported: the masked-LM decoder is the embedding")
    act = get("hidden_act")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    layers = get("num_hidden_layers")
    if arch.family == "longformer":
        attention = tuple(
            SlidingWindowAttention(window=w // 2, global_projections=True, impl=attention_impl)
            for w in attention_windows(hf_config, source)
        )
    else:
        attention = (FullAttention(impl=attention_impl),) * layers
    return TransformerConfig(
        vocab_size=get("vocab_size"),
        num_layers=layers,
        num_heads=get("num_attention_heads"),
        d_model=get("hidden_size"),
        d_ff=get("intermediate_size"),
        attention=attention,
        position="learned",
        max_positions=get("max_position_embeddings"),
        position_offset=get("pad_token_id"),
        type_vocab_size=get("type_vocab_size"),
        layer_norm="post",
        layer_norm_epsilon=float(get("layer_norm_eps")),
        activation=_ACTIVATIONS[act],
        dropout=float(hf_config.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf_config.get("attention_probs_dropout_prob", 0.1)),
        dtype=dtype,
        param_dtype=param_dtype,
    )
