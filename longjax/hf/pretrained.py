"""`from_pretrained` / `save_pretrained`: Hugging Face RoBERTa and Longformer checkpoints as longjax models."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from longjax.hf import checkpoint_files, configs, weights
from longjax.models import positions as positions_lib
from longjax.models.config import SlidingWindowAttention, TransformerConfig
from longjax.models.heads import EncoderWithHead

def _global_bucket(count: int) -> int:
    """Static global-token bound for `count` globals: the next power of two, so few shapes compile."""
    return 1 << max(count - 1, 0).bit_length()


def bounded_global_mask(glob: np.ndarray | None, padding: np.ndarray | None, seq: int) -> tuple[np.ndarray | None, int | None]:
    """(the global mask without marks on padding, None when no token is global; its static per-row bound).

    The bound is the next power of two of the most global tokens in a row,
    capped at `seq`, so that few shapes compile.
    """
    if glob is None:
        return None, None
    if padding is not None:
        glob = glob & padding
    count = int(glob.reshape(-1, seq).sum(-1).max(initial=0))
    if count == 0:
        return None, None
    return glob, min(_global_bucket(count), seq)


def with_max_global_tokens(config: TransformerConfig, bound: int | None) -> TransformerConfig:
    """`config` with every sliding-window layer bound to `bound` global tokens per row (unchanged for None)."""
    if bound is None:
        return config
    return dataclasses.replace(config, attention=tuple(
        dataclasses.replace(a, max_global_tokens=bound) if isinstance(a, SlidingWindowAttention) else a
        for a in config.attention
    ))


@dataclasses.dataclass
class Pretrained:
    """A loaded checkpoint: the longjax config and parameters, and Hugging Face's calling convention.

    Attributes:
      config: the encoder's TransformerConfig.
      params: the parameter tree of `module` ({'encoder', 'pooler'?, 'head'?}).
      hf_config: config.json as read (written back by save_pretrained).
      architecture: the Hugging Face class, e.g. 'LongformerForQuestionAnswering'.
      source: the directory it was read from.
      newly_initialized: Hugging Face names of pooler/head weights the
        checkpoint lacked, drawn fresh (when `architecture=` chose a head the
        checkpoint was not trained with).
    """

    config: TransformerConfig
    params: dict
    hf_config: dict
    architecture: str
    source: str = ""
    newly_initialized: tuple[str, ...] = ()

    def __post_init__(self):
        self._compiled: dict[int, Any] = {}

    @property
    def arch(self) -> configs.Architecture:
        return configs.ARCHITECTURES[self.architecture]

    @property
    def num_labels(self) -> int:
        return _num_labels(self.hf_config, self.arch)

    def module(self, max_global_tokens: int | None = None) -> EncoderWithHead:
        """The Flax module; Longformer layers bound to `max_global_tokens` global tokens per row."""
        cfg = with_max_global_tokens(self.config, max_global_tokens)
        return EncoderWithHead(cfg, head=self.arch.head, num_labels=self.num_labels, pooler=self.arch.pooler)

    def default_global_attention_mask(self, input_ids) -> np.ndarray | None:
        """Hugging Face's global tokens when none are given: [CLS] for classification,
        the question (tokens before the first separator) for QA, the answer
        (after the question's two separators) per choice for multiple choice;
        none for RoBERTa, the bare model and the masked LM."""
        if self.arch.family != "longformer" or self.arch.head in (None, "masked_lm"):
            return None
        ids = np.asarray(input_ids)
        if self.arch.head == "classification":
            mask = np.zeros(ids.shape, bool)
            mask[..., 0] = True
            return mask
        sep = self.hf_config.get("sep_token_id")
        if sep is None:
            raise ValueError(f"{self.source}: config.json has no sep_token_id, needed for the default global attention")
        flat = ids.reshape(-1, ids.shape[-1])
        is_sep = flat == sep
        if not np.all(is_sep.sum(-1) == 3):
            raise ValueError(
                f"input_ids: {self.architecture} puts global attention on the question by default, which needs "
                f"exactly three sep tokens ({sep}) per sequence (<s> question </s></s> context </s>), got counts "
                f"{is_sep.sum(-1).tolist()}; pass global_attention_mask instead"
            )
        question_end = np.argmax(is_sep, axis=-1)[:, None]
        positions = np.arange(flat.shape[-1])[None, :]
        mask = positions < question_end if self.arch.head == "question_answering" else positions > question_end + 1
        return mask.reshape(ids.shape)

    def outputs(self, input_ids, attention_mask=None, global_attention_mask=None, token_type_ids=None,
                *, deterministic: bool = True, rng=None) -> dict[str, jax.Array]:
        """Every output of the Hugging Face model, with its argument meanings.

        Args:
          input_ids: int `[batch, seq]` (`[batch, choices, seq]` for multiple choice).
          attention_mask: optional 0/1 like input_ids; None attends to every
            token. Positions come from `input_ids != pad_token_id` either way, as in transformers.
          global_attention_mask: optional 0/1 (Longformer only); None takes the
            head's default (see `default_global_attention_mask`). Global marks on
            padded positions are ignored.
          token_type_ids: optional int like input_ids.
          deterministic, rng: dropout off, or on with a 'dropout' rng.

        Returns:
          dict of float32 arrays: 'last_hidden_state' `[..., seq, d_model]`,
          'pooler_output' (models with a pooler), and 'logits' or
          'start_logits'/'end_logits' for the heads. Padded positions hold
          longjax's values, which are zero attention output where Hugging
          Face's RoBERTa attends from padding too; compare real positions.
        """
        ids = np.asarray(input_ids)
        expect = 3 if self.arch.head == "multiple_choice" else 2
        if ids.ndim != expect or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be an int array of rank {expect} for {self.architecture}, got "
                             f"{ids.dtype} {list(ids.shape)}")
        pad = self.hf_config["pad_token_id"]
        positions = positions_lib.roberta_position_ids(jnp.asarray(ids != pad), pad)
        padding = None if attention_mask is None else _mask("attention_mask", attention_mask, ids.shape)
        if global_attention_mask is not None:
            if self.arch.family != "longformer":
                raise ValueError(f"global_attention_mask: {self.architecture} has no global attention")
            glob = _mask("global_attention_mask", global_attention_mask, ids.shape)
        else:
            glob = self.default_global_attention_mask(ids)
        glob, bound = bounded_global_mask(glob, padding, ids.shape[-1])
        types = None if token_type_ids is None else np.asarray(token_type_ids, np.int32)
        fn = self._compiled.get(bound)
        if fn is None:
            module = self.module(bound)

            def forward(params, ids, padding, glob, types, positions, rng):
                rngs = None if rng is None else {"dropout": rng}
                return module.apply(
                    {"params": params}, ids, padding_mask=padding, global_mask=glob, token_type_ids=types,
                    position_ids=positions, deterministic=rng is None, rngs=rngs,
                )

            fn = self._compiled[bound] = jax.jit(forward)
        if not deterministic and rng is None:
            raise ValueError("deterministic=False needs rng (a jax.random key for dropout)")
        return fn(self.params, jnp.asarray(ids, jnp.int32), None if padding is None else jnp.asarray(padding),
                  None if glob is None else jnp.asarray(glob), types, positions, None if deterministic else rng)

    def with_new_tokens(self, rows: Sequence[Sequence[int]]) -> Pretrained:
        """A copy with one more vocabulary entry per element of `rows`, for added task tokens.

        Each new embedding row (and masked-LM bias) is the mean of the
        existing rows it lists, e.g. the pieces `add_task_tokens` returns, so
        a new token starts from what its spelling meant to the model.

        Args:
          rows: for each new token (ids `vocab_size`, `vocab_size + 1`, ...),
            a non-empty list of existing ids.
        """
        vocab = self.config.vocab_size
        for i, ids in enumerate(rows):
            if not len(ids) or any(not 0 <= int(j) < vocab for j in ids):
                raise ValueError(f"rows[{i}] must be a non-empty list of ids in [0, {vocab}), got {list(ids)}")

        def grow(table):
            new = jnp.stack([table[jnp.asarray(ids)].astype(jnp.float32).mean(0) for ids in rows])
            return jnp.concatenate([table, new.astype(table.dtype)])

        params = jax.tree_util.tree_map(lambda a: a, self.params)
        params["encoder"] = dict(params["encoder"], embed={"embedding": grow(params["encoder"]["embed"]["embedding"])})
        if self.arch.head == "masked_lm":
            params["head"] = dict(params["head"], bias=grow(params["head"]["bias"][:, None])[:, 0])
        config = dataclasses.replace(self.config, vocab_size=vocab + len(rows))
        hf_config = dict(self.hf_config, vocab_size=config.vocab_size)
        return Pretrained(config, params, hf_config, self.architecture, self.source, self.newly_initialized)

    def apply(self, input_ids, attention_mask=None, global_attention_mask=None, token_type_ids=None):
        """The last hidden states, float32 `[batch, seq, d_model]`; arguments as in `outputs`."""
        return self.outputs(input_ids, attention_mask, global_attention_mask, token_type_ids)["last_hidden_state"]


def _mask(name: str, value, shape) -> np.ndarray:
    array = np.asarray(value)
    if array.shape != tuple(shape):
        raise ValueError(f"{name} must have input_ids' shape {list(shape)}, got {list(array.shape)}")
    if not np.all((array == 0) | (array == 1)):
        raise ValueError(f"{name} must hold only 0 and 1")
    return array.astype(bool)


def _num_labels(hf_config: Mapping[str, Any], arch: configs.Architecture) -> int:
    if arch.head != "classification":
        return 2
    if "id2label" in hf_config:
        return len(hf_config["id2label"])
    return int(hf_config.get("num_labels", 2))


def _resolve(path: str | os.PathLike) -> pathlib.Path:
    directory = pathlib.Path(path)
    if directory.is_dir():
        return directory
    if directory.exists():
        raise ValueError(f"{path}: expected a checkpoint directory, got a file")
    if importlib.util.find_spec("huggingface_hub") is None:
        raise FileNotFoundError(
            f"{path}: no such directory. Download the checkpoint (for example `hf download {path} "
            f"--local-dir DIR` on a machine with network access) and pass its directory; hub names are "
            "resolved only when huggingface_hub is installed (pip install 'longjax[hub]')"
        )
    import huggingface_hub  # optional: only for hub names

    try:
        return pathlib.Path(huggingface_hub.snapshot_download(os.fspath(path)))
    except Exception as e:  # the hub's errors vary by version; all mean "not available here"
        raise FileNotFoundError(
            f"{path}: not a directory, and the hub could not provide it ({type(e).__name__}: {e}). "
            "Download the checkpoint and pass its directory"
        ) from e


def from_pretrained(
    path: str | os.PathLike, *, architecture: str | None = None, dtype: str = "float32",
    param_dtype: str = "float32", attention_impl: str | None = None, seed: int = 0,
) -> Pretrained:
    """Loads a Hugging Face RoBERTa, Longformer, BART or LED checkpoint directory.

    BART and LED (`BartModel`, `BartForConditionalGeneration`, `LEDModel`,
    `LEDForConditionalGeneration`) load as an `EncoderDecoderPretrained`
    around a `LongEncoderDecoder`, with `generate`; the others as a `Pretrained`.

    Args:
      path: a directory with config.json and model.safetensors, sharded
        safetensors with their index, or a legacy pytorch_model.bin; or a hub
        name when huggingface_hub is installed and the network allows.
      architecture: the Hugging Face class to build (default: config.json's
        `architectures[0]`); a head the checkpoint lacks is drawn fresh (see
        `Pretrained.newly_initialized`, and a warning names it). Weights the
        architecture does not use are dropped with a warning naming them.
      dtype: computation dtype; param_dtype: the parameters' dtype (float32
        by default, whatever the file stores).
      attention_impl: implementation of every attention layer: Longformer's
        sliding window takes None, 'xla', 'pallas' or 'reference', RoBERTa's
        dense attention None, 'xla', 'cudnn' or 'reference'.
      seed: initialises the freshly drawn head, if any.

    Returns:
      A `Pretrained`.

    Raises:
      ValueError for an unknown architecture, a missing encoder weight, or a weight whose shape
      does not match config.json, naming the file and the weight.
    """
    directory = _resolve(path)
    hf_config = configs.read_config_json(directory)
    name = architecture or (hf_config.get("architectures") or [None])[0]
    if name in configs.ENCODER_DECODERS:
        from longjax.hf import encoder_decoder_pretrained  # it builds on this module's helpers

        return encoder_decoder_pretrained.load_encoder_decoder(
            directory, hf_config, name, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    arch = configs.architecture_of(hf_config, f"{directory}/config.json", architecture)
    config = configs.transformer_config_from_hf(
        hf_config, arch, f"{directory}/config.json", dtype=dtype, param_dtype=param_dtype,
        attention_impl=attention_impl,
    )
    tensors, source = checkpoint_files.read_checkpoint_tensors(directory)
    module = EncoderWithHead(config, head=arch.head, num_labels=_num_labels(hf_config, arch), pooler=arch.pooler)
    shape = (1, 2, 4) if arch.head == "multiple_choice" else (1, 4)
    init = lambda key: module.init(key, jnp.full(shape, 5, jnp.int32))["params"]
    expected = jax.eval_shape(init, jax.random.key(seed))
    loaded = weights.params_from_hf(tensors, config, arch, expected=expected, source=str(source))
    if loaded.unused:
        # Published checkpoints carry weights their declared class drops (roberta-base's pooler under
        # RobertaForMaskedLM); transformers warns and so does this.
        warnings.warn(f"{source}: weights not used by {arch.name}: {list(loaded.unused)}", stacklevel=2)
    params = loaded.params
    if loaded.missing:
        if architecture is None:
            raise ValueError(f"{source}: weights {list(loaded.missing)} are missing (needed by {arch.name})")
        fresh = init(jax.random.key(seed))
        for part in ("pooler", "head"):
            if part in fresh and part not in params:
                params[part] = jax.tree_util.tree_map(np.asarray, fresh[part])
        warnings.warn(f"{source}: {arch.name} weights {list(loaded.missing)} are not in the checkpoint; "
                      "drawn fresh (train them before use)", stacklevel=2)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, config.parameter_dtype), params)
    hf_config = dict(hf_config, architectures=[arch.name])
    return Pretrained(config, params, hf_config, arch.name, str(directory), loaded.missing)


def save_pretrained(
    pretrained: Pretrained, out_dir: str | os.PathLike, *, dtype: str | None = None,
    max_shard_bytes: int | None = None, copy_tokenizer: bool = True, tokenizer=None,
) -> pathlib.Path:
    """Writes a Pretrained back as a Hugging Face checkpoint directory that transformers loads.

    Args:
      pretrained: the model (its params may have been trained in longjax).
      out_dir: the directory to write (created; existing weight files replaced).
      dtype: the stored dtype ('float32', 'bfloat16', 'float16'); default the params' own.
      max_shard_bytes: shard the safetensors above this size.
      copy_tokenizer: copy the tokenizer files from `pretrained.source`.
      tokenizer: a `tokenizers.Tokenizer` (e.g. with added task tokens) to
        write as tokenizer.json instead of the source's.

    Returns:
      The directory.
    """
    out = pathlib.Path(out_dir)
    if not isinstance(pretrained, Pretrained):
        from longjax.hf import encoder_decoder_pretrained  # it builds on this module's helpers

        if not isinstance(pretrained, encoder_decoder_pretrained.EncoderDecoderPretrained):
            raise TypeError(f"pretrained must be a Pretrained or EncoderDecoderPretrained, got {type(pretrained).__name__}")
        return encoder_decoder_pretrained.save_encoder_decoder(
            pretrained, out, dtype=dtype, max_shard_bytes=max_shard_bytes, copy_tokenizer=copy_tokenizer,
            tokenizer=tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    params = jax.tree_util.tree_map(np.asarray, pretrained.params)
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.dtype(dtype)), params)
    tensors = weights.params_to_hf(params, pretrained.config, pretrained.arch)
    checkpoint_files.replace_checkpoint_tensors(out, tensors, max_shard_bytes=max_shard_bytes)
    stored = str(next(iter(tensors.values())).dtype)
    hf_config = dict(
        pretrained.hf_config, architectures=[pretrained.architecture], vocab_size=pretrained.config.vocab_size,
        max_position_embeddings=pretrained.config.max_positions, dtype=stored,
    )
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    source = pathlib.Path(pretrained.source) if pretrained.source else None
    if copy_tokenizer and source is not None and source.resolve() != out.resolve():
        for name in checkpoint_files.TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, out / name)
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    return out
