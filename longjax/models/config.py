"""Typed model configuration: the ml-collections dict is turned into these once.

A config dict (or `ml_collections.ConfigDict`) is converted at the model
boundary by `transformer_config(...)`; the modules only ever see the frozen
dataclasses below, so a typo, a parameter that the chosen attention type does
not take, or a value the attention op would refuse is an error at conversion
time, naming the field. Attention options are checked by the ops' own rules
(`longjax.attention.arguments`), given the config path of the value.

Attention is described per layer. `attention` gives the fields shared by every
layer; `attention_per_layer` optionally gives some fields as one value per
layer (the Longformer LM's window grows with depth and only its upper layers
are dilated):

    model.attention = dict(type='sliding_window', window=32, dilation=1)
    model.attention_per_layer = dict(window=[32, 64, ...], dilation=[1, ..., (1,) * 6 + (2, 2)])
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from longjax import sections
from longjax.attention import arguments

POSITIONS = ("txl_relative", "rope", "learned", "sinusoidal", "none")
RELATIVE_POSITIONS = ("auto", "native", "features")
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

    `random_features=False` is the Performer's generalized attention with
    deterministic features (LRA's default Performer): no random projection,
    the features are `relu(x)` of the head itself, so it needs
    `feature_map='relu'` and `num_features` equal to the head dimension.
    """

    num_features: int = 256
    feature_map: str = "softmax"
    orthogonal: bool = True
    random_features: bool = True
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
# The layer types whose ops compute Transformer-XL's position term themselves (relative_positions='native'),
# and the implementations of each that do.
NATIVE_RELATIVE_IMPLS: Mapping[type, tuple] = types.MappingProxyType(
    # 'pallas': the sliding window and BigBird on the Triton (GPU) and Mosaic (TPU) kernels.
    # impl None picks, per call, the first implementation of the backend that takes it.
    {
        FullAttention: FullAttention.IMPLS,
        SlidingWindowAttention: (None, "xla", "pallas", "reference"),
        BlockSparseAttention: (None, "xla", "pallas", "reference"),
    }
)
# With the sequence sharded (sequence_axis), the implementations that still compute the term.
SEQUENCE_PARALLEL_NATIVE_RELATIVE_IMPLS: Mapping[type, tuple] = types.MappingProxyType(
    {SlidingWindowAttention: (None, "xla", "pallas")}
)


def takes_native_relative(attention, *, sequence_parallel: bool = False) -> bool:
    """Whether a layer's op computes Transformer-XL's position term itself (its type and impl), on
    every backend: a static question, so validating a config starts no JAX backend."""
    table = SEQUENCE_PARALLEL_NATIVE_RELATIVE_IMPLS if sequence_parallel else NATIVE_RELATIVE_IMPLS
    return attention.impl in table.get(type(attention), ())
# The layer types whose ops shard the sequence, and the implementations of each that do.
SEQUENCE_PARALLEL_IMPLS: Mapping[type, tuple] = types.MappingProxyType(
    {SlidingWindowAttention: (None, "xla", "pallas"), BlockSparseAttention: (None, "xla"), PerformerAttention: (None, "xla")}
)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of a CharLM or LongEncoder.

    Attributes:
      vocab_size: token vocabulary (256 for byte-level LMs).
      num_layers, num_heads, d_model, d_ff: transformer shape; head_dim = d_model / num_heads.
      attention: one attention config per layer.
      position: 'txl_relative' (Transformer-XL relative sinusoids with learned
        biases u, v), 'rope', 'learned' (absolute, `max_positions` rows),
        'sinusoidal' (the Transformer's fixed absolute sines and cosines, added
        to the embeddings; position t of each sequence) or 'none'.
      relative_positions: how 'txl_relative' positions reach the attention ops:
        'native' (the ops compute the position term `(q_i + v) . r_{i-j}` for the
        offsets their blocks can have: sliding-window layers without global
        tokens (XLA, or the Triton and Mosaic kernels), BigBird layers without
        global tokens (XLA, or the Triton and Mosaic kernels), and full layers; with the sequence
        sharded, sliding-window layers (XLA or the kernels) only; other layers are an error),
        'features' (`d_model` extra query/key features per head,
        `positions.txl_relative_qkv`: any op, global tokens, Performer layers
        and kernels included, at the cost of heads `head_dim + d_model` wide) or
        'auto' (per layer and call: 'native' where its op computes the term,
        'features' elsewhere, and in calls with global tokens). All compute the
        same scores from the same parameters.
      max_positions: rows of the learned position table.
      position_offset: RoBERTa's padding offset: the first real token gets
        position `position_offset + 1` (learned positions only).
      type_vocab_size: token-type embeddings of the encoder (0 = none).
      layer_norm: 'pre' (pre-LayerNorm blocks plus a final LayerNorm) or 'post' (BERT/RoBERTa).
      layer_norm_epsilon: LayerNorm epsilon.
      activation: MLP nonlinearity.
      dropout: residual, embedding and MLP dropout rate.
      attention_dropout: dropout on the attention output, before its projection.
      activation_dropout: dropout after the MLP's activation (None: `dropout`).
      dtype: computation dtype; param_dtype: parameter dtype.
      remat: rematerialise each block in the backward pass.
      seed: seeds the BigBird layouts and Performer projections (not the parameters).
      sequence_axis: None, or the mesh axis that shards the sequence (sequence parallelism): the
        attention layers run their ops with it, and the blocks keep their activations sharded
        along it. Set by the training run from `mesh.sequence`, not by experiment configs; full
        (dense) layers do not support it.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    d_model: int
    d_ff: int
    attention: tuple[AttentionConfig, ...]
    position: str = "txl_relative"
    relative_positions: str = "auto"
    max_positions: int = 0
    position_offset: int = 0
    type_vocab_size: int = 0
    layer_norm: str = "pre"
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    seed: int = 0
    sequence_axis: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "num_heads", "d_model", "d_ff"):
            sections.positive_int(f"model.{name}", getattr(self, name))
        if self.d_model % self.num_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads})"
            )
        sections.one_of("model.position", self.position, POSITIONS)
        sections.one_of("model.relative_positions", self.relative_positions, RELATIVE_POSITIONS)
        sections.one_of("model.layer_norm", self.layer_norm, LAYER_NORMS)
        sections.one_of("model.activation", self.activation, ACTIVATIONS)
        sections.one_of("model.dtype", self.dtype, DTYPES)
        sections.one_of("model.param_dtype", self.param_dtype, DTYPES)
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            rate = getattr(self, name)
            if rate is None and name == "activation_dropout":
                continue
            if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
                raise ValueError(f"model.{name} must be a number in [0, 1), got {rate!r}")
        if self.position == "learned":
            sections.positive_int("model.max_positions", self.max_positions)
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"model.position='sinusoidal' needs an even model.d_model, got {self.d_model}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"model.position='rope' needs an even head_dim, got {self.head_dim}")
        if not isinstance(self.attention, tuple) or len(self.attention) != self.num_layers:
            raise ValueError(
                f"model.attention must give one config per layer ({self.num_layers}), got "
                f"{len(self.attention) if isinstance(self.attention, tuple) else self.attention!r}"
            )
        for layer, attention in enumerate(self.attention):
            if not isinstance(attention, tuple(_OPTION_RULES)):
                raise TypeError(
                    f"model.attention[{layer}] must be one of {tuple(ATTENTION_TYPES)} configs, got {attention!r}"
                )
            _check_attention(attention, _layer_field_name(layer), self.num_heads)
            sharded = self.sequence_axis is not None
            if (self.position == "txl_relative" and self.relative_positions == "native"
                    and not takes_native_relative(attention, sequence_parallel=sharded)):
                table = SEQUENCE_PARALLEL_NATIVE_RELATIVE_IMPLS if sharded else NATIVE_RELATIVE_IMPLS
                raise ValueError(
                    f"model.relative_positions='native': layer {layer} is {type(attention).__name__}"
                    f"(impl={attention.impl!r}), whose op does not compute relative positions"
                    + (" with the sequence sharded" if sharded else "") + " (those that do: "
                    + ", ".join(f"{t.__name__} with impl in {impls}" for t, impls in table.items())
                    + "); set model.relative_positions='features' or 'auto'"
                )
            if isinstance(attention, PerformerAttention) and not attention.random_features:
                if self.position == "txl_relative":
                    # Those positions widen q and k by d_model features, which relu(x) would take as its own.
                    raise ValueError(f"{_layer_field_name(layer)('random_features')}=False needs a position "
                                     "scheme that keeps the heads' width, not model.position='txl_relative'")
                _check_deterministic_features(attention, _layer_field_name(layer), self.head_dim)
        if self.sequence_axis is not None:
            unsharded = [
                f"layer {layer}: {type(a).__name__}(impl={a.impl!r})"
                for layer, a in enumerate(self.attention)
                if a.impl not in SEQUENCE_PARALLEL_IMPLS.get(type(a), ())
            ]
            if unsharded:
                raise ValueError(
                    "sequence parallelism (mesh.sequence > 1) needs sliding-window attention (impl None, 'xla' "
                    "or 'pallas'), block-sparse or performer attention (impl None or 'xla') in every layer; "
                    f"{', '.join(unsharded)}"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def native_relative(self, layer: int, *, global_tokens: bool = False) -> bool:
        """Whether layer `layer`'s Transformer-XL positions are computed inside its attention op.

        With global tokens (a call with a `global_mask`), 'auto' takes the features: global
        tokens reach every offset, which the ops compute only within their windows; 'native'
        stays native, and the op refuses the call.
        """
        if self.position != "txl_relative" or self.relative_positions == "features":
            return False
        if self.relative_positions == "auto":
            native = takes_native_relative(self.attention[layer], sequence_parallel=self.sequence_axis is not None)
            return native and not global_tokens
        return True

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self):
        return jnp.dtype(self.param_dtype)


def _rule(check, **options):
    """An option's rule: `check(value, name=<the config path>, **options)`."""
    return lambda value, name, num_heads: check(value, name=name, **options)


# The rule of every attention option: the attention ops' own checks (`longjax.attention.arguments`),
# given the config path to report and the number of heads (None when model.num_heads is itself
# invalid, which the model config then reports). Checks that need the sequence length
# (max_global_tokens against it, the range of global_blocks) are the ops' alone.
_OPTION_RULES: Mapping[type, Mapping[str, Callable]] = types.MappingProxyType({
    FullAttention: {
        "impl": lambda value, name, num_heads: sections.one_of(name, value, FullAttention.IMPLS),
    },
    SlidingWindowAttention: {
        "window": _rule(arguments.check_window),
        "dilation": lambda value, name, num_heads: arguments.check_dilation(value, num_heads, name=name),
        "global_projections": _rule(arguments.check_bool),
        "max_global_tokens": _rule(arguments.check_max_global_tokens),
        "block_size": _rule(arguments.check_int, optional=True),
        "impl": _rule(arguments.check_impl),
    },
    BlockSparseAttention: {
        "block_size": _rule(arguments.check_int),
        "num_window_blocks": _rule(arguments.check_num_window_blocks),
        "global_blocks": _rule(arguments.check_global_blocks),
        "num_random_blocks": _rule(arguments.check_int, minimum=0),
        "max_global_tokens": _rule(arguments.check_max_global_tokens),
        "impl": _rule(arguments.check_impl),
    },
    PerformerAttention: {
        "num_features": _rule(arguments.check_int),
        "feature_map": _rule(arguments.check_feature_map),
        "orthogonal": _rule(arguments.check_bool),
        "random_features": _rule(arguments.check_bool),
        "redraw_interval": _rule(arguments.check_int, optional=True),
        "chunk_size": _rule(arguments.check_int, optional=True),
        "impl": _rule(arguments.check_impl),
    },
})


def _check_deterministic_features(attention: PerformerAttention, field_name: Callable[[str], str], head_dim: int):
    """`random_features=False` (features `relu(x)`, no projection): the options it fixes must agree."""
    if attention.feature_map != "relu":
        raise ValueError(f"{field_name('random_features')}=False (deterministic features, relu(x)) needs "
                         f"{field_name('feature_map')}='relu', got {attention.feature_map!r}")
    if attention.num_features != head_dim:
        raise ValueError(f"{field_name('random_features')}=False: the features are the head's own, so "
                         f"{field_name('num_features')} must be the head dimension ({head_dim}), got "
                         f"{attention.num_features}")
    if attention.redraw_interval is not None:
        raise ValueError(f"{field_name('random_features')}=False draws no projection to redraw: "
                         f"{field_name('redraw_interval')} must be None, got {attention.redraw_interval}")


def _layer_field_name(layer: int) -> Callable[[str], str]:
    """Names of the fields of layer `layer`'s attention config in a `TransformerConfig`."""
    return lambda field: f"model.attention[{layer}].{field}"


def _check_attention(attention, field_name: Callable[[str], str], num_heads: int | None) -> None:
    """Checks every option of one attention config; `field_name(field)` is the name an error reports."""
    (rules,) = [rules for cls, rules in _OPTION_RULES.items() if isinstance(attention, cls)]
    for field, rule in rules.items():
        rule(getattr(attention, field), field_name(field), num_heads)


def attention_config(
    fields: Mapping[str, Any], *, name: str = "model.attention", num_heads: int | None = None
) -> AttentionConfig:
    """One attention config from a dict with a `type` key and that type's fields.

    Every option is checked by the attention ops' rules, errors naming
    `<name>.<field>`; with `num_heads`, a per-head dilation is checked to have
    one entry per head.
    """
    return _attention_config(fields, name=name, field_name=lambda field: f"{name}.{field}", num_heads=num_heads)


def _attention_config(
    fields: Mapping[str, Any], *, name: str, field_name: Callable[[str], str], num_heads: int | None
) -> AttentionConfig:
    fields = dict(sections.plain(fields))
    kind = fields.pop("type", None)
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"{field_name('type')} must be one of {tuple(ATTENTION_TYPES)}, got {kind!r}")
    cls = ATTENTION_TYPES[kind]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(
            f"{name}: attention type {kind!r} takes no field(s) {unknown}; its fields are {sorted(allowed)}"
        )
    attention = cls(**fields)
    _check_attention(attention, field_name, num_heads)
    return attention


def per_layer_attention(
    base: Mapping[str, Any],
    per_layer: Mapping[str, Sequence] | None,
    num_layers: int,
    *,
    num_heads: int | None = None,
) -> tuple[AttentionConfig, ...]:
    """Expands shared attention fields plus per-layer lists into one config per layer.

    Every value is checked where it was given: an error names
    `model.attention.<field>` for a shared value, and
    `model.attention_per_layer.<field>[<layer>] -> model.attention[<layer>].<field>`
    for one from a per-layer list (the list entry, and the layer's field it sets).
    """
    base = dict(sections.plain(base))
    per_layer = dict(sections.plain(per_layer or {}))
    if "type" not in per_layer:
        attention_config(base, num_heads=num_heads)  # errors in the shared fields name model.attention.<field>
    for field, values in per_layer.items():
        if not isinstance(values, tuple) or len(values) != num_layers:
            raise ValueError(
                f"model.attention_per_layer.{field} must list one value per layer "
                f"(model.num_layers = {num_layers}), got "
                f"{len(values) if isinstance(values, tuple) else 'not a list'}: {values!r}"
            )
    layers = []
    for layer in range(num_layers):
        fields = dict(base)
        fields.update({field: values[layer] for field, values in per_layer.items()})
        layers.append(
            _attention_config(
                fields, name=f"model.attention (layer {layer})", field_name=_source_name(per_layer, layer),
                num_heads=num_heads,
            )
        )
    return tuple(layers)


def _source_name(per_layer: Mapping[str, Sequence], layer: int) -> Callable[[str], str]:
    """The config path of layer `layer`'s field: its per-layer list entry, or the shared field."""

    def name(field: str) -> str:
        if field in per_layer:
            return f"model.attention_per_layer.{field}[{layer}] -> model.attention[{layer}].{field}"
        return f"model.attention.{field}"

    return name


def transformer_config(model: Mapping[str, Any]) -> TransformerConfig:
    """A `TransformerConfig` from the `model` section of an experiment config.

    `model.attention` holds the shared attention fields (with `type`);
    `model.attention_per_layer` (optional) maps field names to per-layer lists.
    Every other key is a `TransformerConfig` field; unknown keys are errors.
    """
    fields = dict(sections.plain(model))
    num_layers = fields.get("num_layers")
    sections.positive_int("model.num_layers", num_layers)
    if "attention" not in fields:
        raise ValueError("model.attention is required (a dict with a 'type' key)")
    num_heads = fields.get("num_heads")
    attention = per_layer_attention(
        fields.pop("attention"), fields.pop("attention_per_layer", None), num_layers,
        num_heads=num_heads if arguments.is_int(num_heads) and num_heads >= 1 else None,
    )
    # sequence_axis is the run's (from mesh.sequence), not the experiment's.
    allowed = {f.name for f in dataclasses.fields(TransformerConfig)} - {"attention", "sequence_axis"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"model: unknown field(s) {unknown}; the fields are {sorted(allowed)}")
    return TransformerConfig(attention=attention, **fields)
