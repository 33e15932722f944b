"""BART and LED checkpoints as LongEncoderDecoder models: load, run as Hugging Face does, generate, save."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from longjax.hf import checkpoint_files
from longjax.hf.pretrained import _mask, bounded_global_mask, with_max_global_tokens
from longjax.hf import encoder_decoder_weights as ed_weights
from longjax.models.decoding import GenerationSettings
from longjax.models.encoder_decoder import EncoderDecoderConfig, LongEncoderDecoder
from longjax.models.generation import generate_jit

GENERATION_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationSettings))


def generation_settings_from_hf(hf_config: Mapping[str, Any], generation_config: Mapping[str, Any] | None,
                                source: str) -> GenerationSettings:
    """Hugging Face's generation defaults: config.json's fields, overridden by generation_config.json's."""
    values: dict[str, Any] = {}
    for layer in (hf_config, generation_config or {}):
        for name in GENERATION_FIELDS:
            if layer.get(name) is not None:
                values[name] = layer[name]
    eos = values.get("eos_token_id")
    if isinstance(eos, list):
        if len(eos) != 1:
            raise ValueError(f"{source}: eos_token_id {eos}: longjax's search takes one EOS token")
        values["eos_token_id"] = eos[0]
    if values.get("forced_eos_token_id") is not None and isinstance(values["forced_eos_token_id"], list):
        (values["forced_eos_token_id"],) = values["forced_eos_token_id"]
    return GenerationSettings(**values)


@dataclasses.dataclass
class EncoderDecoderPretrained:
    """A loaded BART or LED checkpoint.

    Attributes:
      config: the EncoderDecoderConfig.
      params: the LongEncoderDecoder parameters.
      hf_config: config.json as read.
      architecture: e.g. 'LEDForConditionalGeneration'.
      source: the directory it was read from.
      generation: the checkpoint's generation defaults.
      newly_initialized: weights the checkpoint lacked (a bare model's 'final_logits_bias', zeros).
    """

    config: EncoderDecoderConfig
    params: dict
    hf_config: dict
    architecture: str
    source: str = ""
    generation: GenerationSettings = GenerationSettings()
    newly_initialized: tuple[str, ...] = ()

    def __post_init__(self):
        self._compiled: dict = {}

    @property
    def family(self) -> str:
        return ed_weights.ARCHITECTURES[self.architecture][0]

    def module(self, max_global_tokens: int | None = None) -> LongEncoderDecoder:
        """The Flax module; the encoder's sliding-window layers bound to `max_global_tokens` per row."""
        cfg = self.config
        return LongEncoderDecoder(dataclasses.replace(cfg, encoder=with_max_global_tokens(cfg.encoder, max_global_tokens)))

    def _masks(self, ids, attention_mask, global_attention_mask):
        padding = None if attention_mask is None else _mask("attention_mask", attention_mask, ids.shape)
        if self.family != "led":
            if global_attention_mask is not None:
                raise ValueError(f"global_attention_mask: {self.architecture} has no global attention")
            return padding, None, None
        if global_attention_mask is None:
            glob = np.zeros(ids.shape, bool)
            glob[:, 0] = True  # LED's setting: global attention on the first <s>
        else:
            glob = _mask("global_attention_mask", global_attention_mask, ids.shape)
        return (padding, *bounded_global_mask(glob, padding, ids.shape[-1]))

    def _ids(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be an int array [batch, seq], got {ids.dtype} {list(ids.shape)}")
        return ids

    def shift_tokens_right(self, labels) -> np.ndarray:
        """Hugging Face's decoder inputs for `labels`: the start token, then labels[:-1] (-100 as padding)."""
        labels = np.asarray(labels)
        shifted = np.concatenate(
            [np.full(labels.shape[:-1] + (1,), self.generation.decoder_start_token_id), labels[..., :-1]], -1)
        return np.where(shifted == -100, self.hf_config["pad_token_id"], shifted)

    def outputs(self, input_ids, attention_mask=None, global_attention_mask=None, decoder_input_ids=None
                ) -> dict[str, jax.Array]:
        """What `LEDForConditionalGeneration` / `BartForConditionalGeneration` return.

        Args:
          input_ids: int `[batch, source]`.
          attention_mask: optional 0/1 `[batch, source]`.
          global_attention_mask: optional 0/1 (LED only; None: the first token).
          decoder_input_ids: int `[batch, target]`; None shifts input_ids right, as transformers does.

        Returns:
          float32 'logits' `[batch, target, vocab]`, 'last_hidden_state'
          (the decoder's) and 'encoder_last_hidden_state' `[batch, source, d_model]`
          (padded positions hold longjax's zeros; compare real ones).
        """
        ids = self._ids(input_ids)
        decoder_ids = self.shift_tokens_right(ids) if decoder_input_ids is None else self._ids(decoder_input_ids)
        padding, glob, bound = self._masks(ids, attention_mask, global_attention_mask)
        key = ("outputs", bound)
        if key not in self._compiled:
            module = self.module(bound)

            def forward(params, ids, decoder_ids, padding, glob):
                v = {"params": params}
                encoded = module.apply(v, ids, padding_mask=padding, global_mask=glob, method=LongEncoderDecoder.encode)
                cross = module.apply(v, encoded, method=LongEncoderDecoder.cross_key_values)
                hidden = module.apply(v, decoder_ids, cross, source_mask=padding,
                                      method=LongEncoderDecoder.decoder_hidden)
                logits = module.apply(v, hidden, method=LongEncoderDecoder.logits)
                return dict(logits=logits, last_hidden_state=hidden, encoder_last_hidden_state=encoded)

            self._compiled[key] = jax.jit(forward)
        return self._compiled[key](
            self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(decoder_ids, jnp.int32),
            None if padding is None else jnp.asarray(padding), None if glob is None else jnp.asarray(glob))

    def generate(self, input_ids, attention_mask=None, global_attention_mask=None, **settings):
        """Hugging Face's `generate(...)`: sequences and scores as `return_dict_in_generate` gives them.

        Args:
          input_ids, attention_mask, global_attention_mask: as in `outputs`.
          **settings: GenerationSettings fields overriding the checkpoint's
            defaults (num_beams, max_length, length_penalty, early_stopping, ...).

        Returns:
          (sequences int `[batch * num_return_sequences, length]` cropped to the
          longest, as transformers crops them; scores float32
          `[batch * num_return_sequences]`, beam search's `sequences_scores`).
        """
        unknown = sorted(set(settings) - set(GENERATION_FIELDS))
        if unknown:
            raise ValueError(f"generate: unknown setting(s) {unknown}; the settings are {list(GENERATION_FIELDS)}")
        generation = dataclasses.replace(self.generation, **settings)
        ids = self._ids(input_ids)
        padding, glob, bound = self._masks(ids, attention_mask, global_attention_mask)
        out = generate_jit(
            self.module(bound), self.params, jnp.asarray(ids, jnp.int32),
            None if padding is None else jnp.asarray(padding), None if glob is None else jnp.asarray(glob),
            settings=generation)
        lengths = np.asarray(out.lengths).reshape(-1)
        sequences = np.asarray(out.sequences).reshape(len(lengths), -1)[:, : lengths.max()]
        return sequences, np.asarray(out.scores).reshape(-1)


def load_encoder_decoder(directory: pathlib.Path, hf_config: dict, architecture: str, *, dtype: str = "float32",
                         param_dtype: str = "float32", attention_impl: str | None = None) -> EncoderDecoderPretrained:
    """Loads a BART or LED checkpoint directory (called by `longjax.hf.from_pretrained`)."""
    if architecture not in ed_weights.ARCHITECTURES:
        raise ValueError(f"{directory}: {architecture!r} is not one of {sorted(ed_weights.ARCHITECTURES)}")
    family, _ = ed_weights.ARCHITECTURES[architecture]
    source = f"{directory}/config.json"
    config = ed_weights.encoder_decoder_config_from_hf(
        hf_config, family, source, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    tensors, weights_file = checkpoint_files.read_checkpoint_tensors(directory)
    module = LongEncoderDecoder(config)
    expected = jax.eval_shape(
        lambda key: module.init(key, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 2), jnp.int32))["params"],
        jax.random.key(0))
    params, missing, unused = ed_weights.params_from_hf(
        tensors, config, family, expected=expected, source=str(weights_file))
    if unused:
        warnings.warn(f"{weights_file}: weights not used by {architecture}: {list(unused)}", stacklevel=3)
    generation_path = directory / "generation_config.json"
    generation_config = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    generation = generation_settings_from_hf(hf_config, generation_config, source)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, config.encoder.parameter_dtype), params)
    return EncoderDecoderPretrained(config, params, dict(hf_config, architectures=[architecture]), architecture,
                                    str(directory), generation, missing)


def save_encoder_decoder(pretrained: EncoderDecoderPretrained, out: pathlib.Path, *, dtype: str | None,
                         max_shard_bytes: int | None, copy_tokenizer: bool, tokenizer) -> pathlib.Path:
    """Writes the model back as a Hugging Face BART/LED directory (called by `longjax.hf.save_pretrained`)."""
    out.mkdir(parents=True, exist_ok=True)
    params = jax.tree_util.tree_map(np.asarray, pretrained.params)
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.dtype(dtype)), params)
    with_head = pretrained.architecture.endswith("ForConditionalGeneration")
    tensors = ed_weights.params_to_hf(params, pretrained.config, pretrained.family, with_head=with_head)
    checkpoint_files.replace_checkpoint_tensors(out, tensors, max_shard_bytes=max_shard_bytes)
    stored = str(next(iter(tensors.values())).dtype)
    hf_config = dict(pretrained.hf_config, architectures=[pretrained.architecture],
                     vocab_size=pretrained.config.encoder.vocab_size, dtype=stored)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    source = pathlib.Path(pretrained.source) if pretrained.source else None
    if source is not None and source.resolve() != out.resolve():
        names = (checkpoint_files.TOKENIZER_FILES if copy_tokenizer else ()) + ("generation_config.json",)
        for name in names:
            if (source / name).is_file():
                shutil.copy(source / name, out / name)
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    return out
