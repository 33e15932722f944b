"""Typed model configuration: the ml-collections dict is turned into these once.

A config dict (or `ml_collections.ConfigDict`) is converted at the model
boundary by `transformer_config(...)`; the modules only ever see the frozen
dataclasses below, so a typo or a parameter that the chosen attention type does
not take is an error at conversion time, naming the field.

Attention is described per layer. `attention` gives the fields shared by every
layer; `attention_per_layer` optionally gives some fields as one value per
layer (the Longformer LM's window grows with depth and only its upper layers
are dilated):

    model.attention = dict(type='sliding_window', window=32, dilation=1)
    model.attention_per_layer = dict(window=[32, 64, ...], dilation=[1, ..., (1,) * 6 + (2, 2)])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from longjax.attention import favor as favor_lib

POSITIONS = ("txl_relative", "rope", "learned", "none")
LAYER_NORMS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class FullAttention:
    """Dense softmax attention (quadratic; the baseline every pattern is compared with).

    impl: None (jax.nn.dot_product_attention's default), 'xla', 'cudnn' or
      'reference' (longjax's dense oracle).
    """

    impl: str | None = None

    IMPLS = (None, "xla", "cudnn", "reference")


@dataclasses.dataclass(frozen=True)
class SlidingWindowAttention:
    """Longformer attention; see `longjax.attention.sliding_window_attention`.

    window: keys each side (an int) or `(left, right)`; causal models use the left side.
    dilation: an int or one int per head.
    global_projections: separate query/key/value projections for global
      tokens (Longformer); only used when a `global_mask` is passed.
    max_global_tokens: static bound on global tokens per row (needed under jit
      when a global_mask is passed).
    block_size: query-block length of the XLA implementation, None = automatic.
    impl: None, 'xla', 'pallas' or 'reference'.
    """

    window: int | tuple[int, int] = 256
    dilation: int | tuple[int, ...] = 1
    global_projections: bool = False
    max_global_tokens: int | None = None
    block_size: int | None = None
    impl: str | None = None


@dataclasses.dataclass(frozen=True)
class BlockSparseAttention:
    """BigBird attention; see `longjax.attention.block_sparse_attention`.

    The random layout of layer l is drawn from a seed derived from
    (model seed, l), so it is the same in training and evaluation.
    """

    block_size: int = 64
    num_window_blocks: int = 3
    global_blocks: tuple[int, ...] = (0, -1)
    num_random_blocks: int = 3
    max_global_tokens: int | None = None
    impl: str | None = None


@dataclasses.dataclass(frozen=True)
class PerformerAttention:
    """Performer FAVOR+ attention; see `longjax.attention.favor_attention`.

    The projection of layer l at training step s is a pure function of
    (model seed, l, s // redraw_interval); redraw_interval None keeps the
    projection of step 0 forever.
    """

    num_features: int = 256
    feature_map: str = "softmax"
    orthogonal: bool = True
    redraw_interval: int | None = None
    chunk_size: int | None = None
    impl: str | None = None


ATTENTION_TYPES: Mapping[str, type] = {
    "full": FullAttention,
    "sliding_window": SlidingWindowAttention,
    "block_sparse": BlockSparseAttention,
    "performer": PerformerAttention,
}
AttentionConfig = FullAttention | SlidingWindowAttention | BlockSparseAttention | PerformerAttention


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of a CharLM or LongEncoder.

    Attributes:
      vocab_size: token vocabulary (256 for byte-level LMs).
      num_layers, num_heads, d_model, d_ff: transformer shape; head_dim = d_model / num_heads.
      attention: one attention config per layer.
      position: 'txl_relative' (Transformer-XL relative sinusoids with learned
        biases u, v), 'rope', 'learned' (absolute, `max_positions` rows) or 'none'.
      max_positions: rows of the learned position table.
      position_offset: RoBERTa's padding offset: the first real token gets
        position `position_offset + 1` (learned positions only).
      type_vocab_size: token-type embeddings of the encoder (0 = none).
      layer_norm: 'pre' (pre-LayerNorm blocks plus a final LayerNorm) or 'post' (BERT/RoBERTa).
      layer_norm_epsilon: LayerNorm epsilon.
      activation: MLP nonlinearity.
      dropout: residual, embedding and MLP dropout rate.
      attention_dropout: dropout on the attention output, before its projection.
      dtype: computation dtype; param_dtype: parameter dtype.
      remat: rematerialise each block in the backward pass.
      seed: seeds the BigBird layouts and Performer projections (not the parameters).
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    d_model: int
    d_ff: int
    attention: tuple[AttentionConfig, ...]
    position: str = "txl_relative"
    max_positions: int = 0
    position_offset: int = 0
    type_vocab_size: int = 0
    layer_norm: str = "pre"
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "num_heads", "d_model", "d_ff"):
            _check_positive_int(f"model.{name}", getattr(self, name))
        if self.d_model % self.num_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads})"
            )
        _check_choice("model.position", self.position, POSITIONS)
        _check_choice("model.layer_norm", self.layer_norm, LAYER_NORMS)
        _check_choice("model.activation", self.activation, ACTIVATIONS)
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_choice("model.param_dtype", self.param_dtype, DTYPES)
        for name in ("dropout", "attention_dropout"):
            rate = getattr(self, name)
            if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
                raise ValueError(f"model.{name} must be a number in [0, 1), got {rate!r}")
        if self.position == "learned":
            _check_positive_int("model.max_positions", self.max_positions)
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"model.position='rope' needs an even head_dim, got {self.head_dim}")
        if not isinstance(self.attention, tuple) or len(self.attention) != self.num_layers:
            raise ValueError(
                f"model.attention must give one config per layer ({self.num_layers}), got "
                f"{len(self.attention) if isinstance(self.attention, tuple) else self.attention!r}"
            )
        for layer, attention in enumerate(self.attention):
            _check_attention(f"model.attention[{layer}]", attention, self.num_heads)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self):
        return jnp.dtype(self.param_dtype)


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_attention(name: str, attention, num_heads: int) -> None:
    if isinstance(attention, FullAttention):
        _check_choice(f"{name}.impl", attention.impl, FullAttention.IMPLS)
        return
    _check_choice(f"{name}.impl", attention.impl, (None, "xla", "pallas", "reference"))
    if isinstance(attention, SlidingWindowAttention):
        dilation = attention.dilation
        if isinstance(dilation, tuple) and len(dilation) != num_heads:
            raise ValueError(
                f"{name}.dilation must be an int or one int per head ({num_heads}), got {dilation!r}"
            )
    elif isinstance(attention, PerformerAttention):
        _check_positive_int(f"{name}.num_features", attention.num_features)
        _check_choice(f"{name}.feature_map", attention.feature_map, favor_lib.FEATURE_MAPS)
        if attention.redraw_interval is not None:
            _check_positive_int(f"{name}.redraw_interval", attention.redraw_interval)
    elif isinstance(attention, BlockSparseAttention):
        _check_positive_int(f"{name}.block_size", attention.block_size)
    else:
        raise TypeError(f"{name} must be one of {tuple(ATTENTION_TYPES)} configs, got {attention!r}")


def plain(value):
    """ConfigDict / list values as plain Python: dicts stay dicts, lists become tuples."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    return value


def attention_config(fields: Mapping[str, Any], *, name: str = "model.attention") -> AttentionConfig:
    """One attention config from a dict with a `type` key and that type's fields."""
    fields = dict(plain(fields))
    kind = fields.pop("type", None)
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"{name}.type must be one of {tuple(ATTENTION_TYPES)}, got {kind!r}")
    cls = ATTENTION_TYPES[kind]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(
            f"{name}: attention type {kind!r} takes no field(s) {unknown}; its fields are {sorted(allowed)}"
        )
    return cls(**fields)


def per_layer_attention(
    base: Mapping[str, Any], per_layer: Mapping[str, Sequence] | None, num_layers: int
) -> tuple[AttentionConfig, ...]:
    """Expands shared attention fields plus per-layer lists into one config per layer."""
    base = dict(plain(base))
    per_layer = dict(plain(per_layer or {}))
    if "type" not in per_layer:
        attention_config(base)  # errors in the shared fields name model.attention.<field>
    layers = []
    for field, values in per_layer.items():
        if not isinstance(values, tuple) or len(values) != num_layers:
            raise ValueError(
                f"model.attention_per_layer.{field} must list one value per layer "
                f"(model.num_layers = {num_layers}), got "
                f"{len(values) if isinstance(values, tuple) else 'not a list'}: {values!r}"
            )
    for layer in range(num_layers):
        fields = dict(base)
        fields.update({field: values[layer] for field, values in per_layer.items()})
        layers.append(attention_config(fields, name=f"model.attention (layer {layer})"))
    return tuple(layers)


def transformer_config(model: Mapping[str, Any]) -> TransformerConfig:
    """A `TransformerConfig` from the `model` section of an experiment config.

    `model.attention` holds the shared attention fields (with `type`);
    `model.attention_per_layer` (optional) maps field names to per-layer lists.
    Every other key is a `TransformerConfig` field; unknown keys are errors.
    """
    fields = dict(plain(model))
    num_layers = fields.get("num_layers")
    _check_positive_int("model.num_layers", num_layers)
    if "attention" not in fields:
        raise ValueError("model.attention is required (a dict with a 'type' key)")
    attention = per_layer_attention(
        fields.pop("attention"), fields.pop("attention_per_layer", None), num_layers
    )
    allowed = {f.name for f in dataclasses.fields(TransformerConfig)} - {"attention"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"model: unknown field(s) {unknown}; the fields are {sorted(allowed)}")
    return TransformerConfig(attention=attention, **fields)
