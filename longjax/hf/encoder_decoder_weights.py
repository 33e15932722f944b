"""BART and LED checkpoints: config.json as an EncoderDecoderConfig, and weight names both ways.

BART's encoder self-attention is `self_attn.{q,k,v,out}_proj`; LED's is
`self_attn.longformer_self_attn.{query,key,value}` with their `_global`
copies and `self_attn.output`. Everything else (decoder, embeddings, the
tied output projection and `final_logits_bias`) is named alike. Bare models
(`BartModel`, `LEDModel`) store no prefix; the generation classes store
'model.' (BART) or 'led.' (LED) before the base model's names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from longjax.hf.configs import _ACTIVATIONS, _require
from longjax.hf.weights import _get, _set, _suffixes, _to_hf, _to_longjax
from longjax.models.config import FullAttention, SlidingWindowAttention, TransformerConfig
from longjax.models.encoder_decoder import EncoderDecoderConfig

ARCHITECTURES = {
    "BartModel": ("bart", False), "BartForConditionalGeneration": ("bart", True),
    "LEDModel": ("led", False), "LEDForConditionalGeneration": ("led", True),
}
_PREFIX = {"bart": "model.", "led": "led."}
_BART_OFFSET = 2  # BartLearnedPositionalEmbedding's fixed offset
# Copies that a checkpoint may hold of the shared embedding, and position buffers.
_TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def encoder_decoder_config_from_hf(
    hf_config: Mapping[str, Any], family: str, source: str, *, dtype: str = "float32", param_dtype: str = "float32",
    attention_impl: str | None = None,
) -> EncoderDecoderConfig:
    """The LongEncoderDecoder config computing what the BART or LED checkpoint computes.

    Raises ValueError naming the config.json field for settings longjax does
    not reproduce (pre-LayerNorm mBART-style flags, unknown activations).
    """
    get = lambda key: _require(hf_config, key, source)
    if hf_config.get("model_type") != family:
        raise ValueError(f"{source}: model_type is {hf_config.get('model_type')!r}, expected {family!r}")
    for flag in ("normalize_before", "add_final_layer_norm"):
        if hf_config.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported (longjax follows bart-base/large and LED)")
    if hf_config.get("tie_word_embeddings", True) is False:
        raise ValueError(f"{source}: tie_word_embeddings=false is not supported: the output projection is the embedding")
    act = get("activation_function")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{source}: activation_function {act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    if family == "led":
        windows = get("attention_window")
        layers = get("encoder_layers")
        windows = [windows] * layers if isinstance(windows, int) else list(windows)
        if len(windows) != layers or any(not isinstance(w, int) or w <= 0 or w % 2 for w in windows):
            raise ValueError(f"{source}: attention_window must be a positive even int per encoder layer, got {windows}")
        attention = tuple(SlidingWindowAttention(window=w // 2, global_projections=True, impl=attention_impl)
                          for w in windows)
        encoder_positions, decoder_positions = get("max_encoder_position_embeddings"), get("max_decoder_position_embeddings")
        offset = 0
    else:
        attention = (FullAttention(impl=attention_impl),) * get("encoder_layers")
        encoder_positions = decoder_positions = get("max_position_embeddings")
        offset = _BART_OFFSET
    common = dict(
        vocab_size=get("vocab_size"), d_model=get("d_model"), position="learned", layer_norm="post",
        layer_norm_epsilon=1e-5, activation=_ACTIVATIONS[act], dropout=float(hf_config.get("dropout", 0.1)),
        attention_dropout=float(hf_config.get("attention_dropout", 0.0)),
        activation_dropout=float(hf_config.get("activation_dropout", 0.0)), dtype=dtype, param_dtype=param_dtype,
    )
    encoder = TransformerConfig(
        num_layers=get("encoder_layers"), num_heads=get("encoder_attention_heads"), d_ff=get("encoder_ffn_dim"),
        attention=attention, max_positions=encoder_positions, **common,
    )
    decoder = TransformerConfig(
        num_layers=get("decoder_layers"), num_heads=get("decoder_attention_heads"), d_ff=get("decoder_ffn_dim"),
        attention=(FullAttention(),) * get("decoder_layers"), max_positions=decoder_positions, **common,
    )
    return EncoderDecoderConfig(encoder, decoder, position_offset=offset,
                                scale_embedding=bool(hf_config.get("scale_embedding", False)))


@dataclasses.dataclass(frozen=True)
class _Weight:
    hf: str  # without the base model's prefix
    path: tuple[str, ...]
    kind: str  # as in weights._to_longjax: 'embed', 'layer_norm', 'qkv', 'out', 'linear', 'bias'
    part: TransformerConfig  # the config whose heads shape the tensor


def _weights(config: EncoderDecoderConfig, family: str) -> list[_Weight]:
    enc, dec = config.encoder, config.decoder
    out = [
        _Weight("shared", ("shared",), "embed", enc),
        _Weight("encoder.embed_positions", ("encoder", "position_embed"), "embed", enc),
        _Weight("encoder.layernorm_embedding", ("encoder", "embed_norm"), "layer_norm", enc),
        _Weight("decoder.embed_positions", ("decoder", "position_embed"), "embed", dec),
        _Weight("decoder.layernorm_embedding", ("decoder", "embed_norm"), "layer_norm", dec),
    ]
    if family == "led":
        projections = [(f"longformer_self_attn.{a}", b) for a, b in (
            ("query", "query"), ("key", "key"), ("value", "value"), ("query_global", "global_query"),
            ("key_global", "global_key"), ("value_global", "global_value"))] + [("output", "out")]
    else:
        projections = [("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "out")]

    def mlp(hf, path, cfg):
        return [
            _Weight(f"{hf}.fc1", path + ("mlp", "wi"), "linear", cfg),
            _Weight(f"{hf}.fc2", path + ("mlp", "wo"), "linear", cfg),
            _Weight(f"{hf}.final_layer_norm", path + ("mlp_norm",), "layer_norm", cfg),
        ]

    for i in range(enc.num_layers):
        hf, path = f"encoder.layers.{i}", ("encoder", "transformer", f"layer_{i}")
        out += [_Weight(f"{hf}.self_attn.{a}", path + ("attention", b), "out" if b == "out" else "qkv", enc)
                for a, b in projections]
        out += [_Weight(f"{hf}.self_attn_layer_norm", path + ("attention_norm",), "layer_norm", enc)]
        out += mlp(hf, path, enc)
    for i in range(dec.num_layers):
        hf, path = f"decoder.layers.{i}", ("decoder", f"layers_{i}")
        for hf_attn, attn in (("self_attn", "self_attention"), ("encoder_attn", "cross_attention")):
            out += [_Weight(f"{hf}.{hf_attn}.{a}_proj", path + (attn, b), "out" if b == "out" else "qkv", dec)
                    for a, b in (("q", "query"), ("k", "key"), ("v", "value"), ("out", "out"))]
            out += [_Weight(f"{hf}.{hf_attn}_layer_norm", path + (f"{attn}_norm",), "layer_norm", dec)]
        out += mlp(hf, path, dec)
    return out


def params_from_hf(
    tensors: Mapping[str, np.ndarray], config: EncoderDecoderConfig, family: str, *, expected: Mapping | None,
    source: str,
) -> tuple[dict, tuple[str, ...], tuple[str, ...]]:
    """LongEncoderDecoder parameters from a BART or LED state dict, bare or under its generation head.

    Returns:
      (params, missing, unused): `missing` is ('final_logits_bias',) for a
      bare model's checkpoint (the bias starts at zeros, as in transformers);
      `unused` lists checkpoint names no parameter took.

    Raises:
      ValueError naming the file and weight for a missing base-model weight,
      a shape that differs from the model's, or a tied copy that is not a copy.
    """
    prefix = _PREFIX[family]
    names = {n[len(prefix):] if n.startswith(prefix) else n: t for n, t in tensors.items()}
    if "shared.weight" not in names and "encoder.embed_tokens.weight" in names:
        names["shared.weight"] = names["encoder.embed_tokens.weight"]  # some exports keep only the tied copies
    params: dict = {}
    used = set()
    for weight in _weights(config, family):
        for suffix in _suffixes(weight.kind):
            name = f"{weight.hf}.{suffix}"
            if name not in names:
                raise ValueError(f"{source}: weight {prefix}{name!r} is missing")
            array = np.asarray(names[name])
            leaf, value = _to_longjax(weight.kind, suffix, array, weight.part)
            path = weight.path + (leaf,)
            if expected is not None:
                want = tuple(_get(expected, path).shape)
                if tuple(value.shape) != want:
                    raise ValueError(
                        f"{source}: weight {prefix}{name!r} has shape {list(array.shape)}, which gives "
                        f"{list(value.shape)} for {'/'.join(path)}; the model built from config.json needs {list(want)}"
                    )
            _set(params, path, value)
            used.add(name)
    for tied in _TIED:
        if tied in names:
            if not np.array_equal(names[tied], names["shared.weight"]):
                raise ValueError(f"{source}: {tied!r} differs from the shared embedding; untied embeddings are not supported")
            used.add(tied)
    missing = ()
    if "final_logits_bias" in names:
        params["final_logits_bias"] = np.asarray(names["final_logits_bias"]).reshape(-1)
        used.add("final_logits_bias")
    else:
        params["final_logits_bias"] = np.zeros((config.encoder.vocab_size,), np.float32)
        missing = ("final_logits_bias",)
    unused = tuple(sorted(n for n in names if n not in used))
    return params, missing, unused


def params_to_hf(params: Mapping, config: EncoderDecoderConfig, family: str, *, with_head: bool) -> dict[str, np.ndarray]:
    """The state dict of LongEncoderDecoder parameters (inverse of `params_from_hf`).

    `with_head` writes the generation class's layout (prefixed names and
    `final_logits_bias [1, vocab]`); the tied copies are not written.
    """
    prefix = _PREFIX[family] if with_head else ""
    out = {}
    for weight in _weights(config, family):
        node = _get(params, weight.path)
        for leaf, value in node.items():
            suffix, array = _to_hf(weight.kind, leaf, np.asarray(value))
            out[f"{prefix}{weight.hf}.{suffix}"] = np.ascontiguousarray(array)
    if with_head:
        out["final_logits_bias"] = np.asarray(params["final_logits_bias"]).reshape(1, -1)
    return out
