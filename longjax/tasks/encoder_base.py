"""What the long-encoder tasks share (mlm, classification, triviaqa, wikihop): model, checkpoint, tokenizer, batching.

* Model: `longjax.models.EncoderWithHead` with the task's head, of `config.model`
  (RoBERTa/Longformer's shape: learned positions offset by the padding id,
  post-LayerNorm; `configs/mlm_longformer_base.py` gives longformer-base-4096's).
* `init_from`: a Hugging Face checkpoint directory (e.g. `allenai/longformer-base-4096`
  downloaded, or a RoBERTa converted with `python -m longjax.convert
  roberta-to-longformer`), read with the task's Hugging Face class, after
  checking that config.json describes the model `config.model` does; or a
  longjax run (continue from an MLM run). A head the checkpoint lacks starts fresh.
* Tokenizer: `data.tokenizer`, a directory with tokenizer.json or
  vocab.json/merges.txt; '' takes `init_from`'s.
* Features: every split is tokenised once, at load, into a fixed-shape table
  at the phases' sequence length (one length for every phase of these tasks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from longjax import models, sections
from longjax.data import corpora, examples
from longjax.hf import configs as hf_configs
from longjax.hf import pretrained as hf_pretrained
from longjax.hf import tokenizer as hf_tokenizer
from longjax.tasks import base

log = logging.getLogger(__name__)

# TransformerConfig fields that change what a pretrained encoder computes, compared with config.json's.
_COMPARED_FIELDS = (
    "vocab_size", "num_layers", "num_heads", "d_model", "d_ff", "position", "max_positions", "position_offset",
    "type_vocab_size", "layer_norm", "layer_norm_epsilon", "activation",
)
# The Hugging Face class read for each head (family prefix added): it maps the head's weights one to one.
_HF_CLASS = {
    None: "Model", "masked_lm": "ForMaskedLM", "classification": "ForSequenceClassification",
    "question_answering": "ForQuestionAnswering", "token_scoring": "Model", "span_type_and_tokens": "Model",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection(base.EvalSection):
    """`config.eval` of the encoder tasks.

    Attributes:
      batch_size: examples per evaluation call.
      max_examples: examples of the validation split scored during training (None: all).
    """

    batch_size: int = 8
    max_examples: int | None = None

    def __post_init__(self):
        super().__post_init__()
        sections.positive_int("eval.batch_size", self.batch_size)
        if self.max_examples is not None:
            sections.positive_int("eval.max_examples", self.max_examples)

    @property
    def training_limit(self) -> int | None:
        return self.max_examples


def data_directory(configured: str, default_name: str) -> Path:
    """`data.dir`, else `<$LONGJAX_DATA_DIR or ~/.cache/longjax/data>/<default_name>`, with `~` expanded."""
    return Path(configured).expanduser() if configured else corpora.resolve_data_dir() / default_name


def tokenizer_directory(plan) -> Path:
    """`data.tokenizer`, else the `init_from` directory; ConfigError when neither is given."""
    directory = plan.data.tokenizer or plan.init_from
    if not directory:
        raise sections.ConfigError(
            "data.tokenizer: give the tokenizer's directory (tokenizer.json or vocab.json + merges.txt), "
            "or init_from a Hugging Face checkpoint directory that holds one"
        )
    return Path(directory).expanduser()


def load_tokenizer(plan):
    """The run's tokenizer (see `tokenizer_directory`); FileNotFoundError naming the directory."""
    return hf_tokenizer.load_tokenizer(tokenizer_directory(plan))


def special_id(tokenizer, token: str) -> int:
    """The id of a special token; ValueError naming it when the tokenizer lacks it."""
    index = tokenizer.token_to_id(token)
    if index is None:
        raise ValueError(f"the tokenizer has no {token!r} token (a RoBERTa tokenizer is expected)")
    return index


def check_global_tokens(plan, global_mask: np.ndarray, split: str, what: str) -> None:
    """ConfigError when a row of `global_mask` `[n, ..., seq]` has more global tokens than the model's bound."""
    bounds = [a.max_global_tokens for a in plan.model.attention
              if isinstance(a, models.SlidingWindowAttention) and a.max_global_tokens is not None]
    most = int(np.asarray(global_mask).sum(-1).max())
    if bounds and most > min(bounds):
        raise sections.ConfigError(
            f"model.attention.max_global_tokens ({min(bounds)}) is below the {most} global tokens ({what}) of a "
            f"{split} example: raise it"
        )


class EncoderTask(base.Task):
    """Base of the long-encoder tasks; see the module docstring.

    Subclasses set `head` (an `EncoderWithHead` head), `uses_global_attention`,
    and `task_tokens`: special tokens the task adds to the tokenizer and, each
    as the mean of the embedding rows of its former spelling, to a pretrained
    checkpoint (`model.vocab_size` must count them).
    """

    head: str | None = None
    uses_global_attention: bool = True
    task_tokens: tuple[str, ...] = ()
    eval_section = EvalSection
    curve_metric = "loss"

    # --- config ---------------------------------------------------------------------------------

    def num_labels(self, model_config) -> int:
        return 2

    def check(self, plan) -> None:
        model = plan.model
        lengths = sorted({p.seq_len for p in plan.phases})
        if len(lengths) > 1:
            raise sections.ConfigError(
                f"phases.seq_len: the {plan.task} task tokenises its data once, at one length; got {lengths}"
            )
        if model.position != "learned":
            raise sections.ConfigError(
                f"model.position must be 'learned' (RoBERTa/Longformer's positions) for {plan.task}, "
                f"got {model.position!r}"
            )
        if lengths[0] + model.position_offset >= model.max_positions:
            raise sections.ConfigError(
                f"phases.seq_len ({lengths[0]}) plus model.position_offset ({model.position_offset}) must be below "
                f"model.max_positions ({model.max_positions})"
            )
        for layer, attention in enumerate(model.attention):
            if not isinstance(attention, (models.SlidingWindowAttention, models.FullAttention)):
                raise sections.ConfigError(
                    f"model.attention (layer {layer}): {plan.task} needs sliding-window (Longformer) or full "
                    f"(RoBERTa) attention, got {type(attention).__name__}"
                )
            if (self.uses_global_attention and isinstance(attention, models.SlidingWindowAttention)
                    and attention.max_global_tokens is None):
                raise sections.ConfigError(
                    f"model.attention.max_global_tokens (layer {layer}) must bound the global tokens per "
                    f"sequence for {plan.task}, which puts global attention on some tokens"
                )
        if plan.optimizer.grad_accumulation < 1:
            raise sections.ConfigError("optimizer.grad_accumulation must be >= 1")

    # --- model ----------------------------------------------------------------------------------

    def build_model(self, model_config) -> models.EncoderWithHead:
        return models.EncoderWithHead(model_config, head=self.head, num_labels=self.num_labels(model_config))

    def init_params(self, model, key):
        # At least as many tokens as the global-token bound, which the ops check against the length.
        length = max([8] + [getattr(a, "max_global_tokens", None) or 0 for a in model.config.attention])
        tokens = jnp.full((1, length), 5, jnp.int32)
        glob = jnp.zeros((1, length), bool).at[0, 0].set(True) if self.uses_global_attention else None
        return model.init(key, tokens, global_mask=glob)

    def adapt_pretrained(self, plan, pretrained):
        """The checkpoint made to fit the task before it is compared and merged: with the task tokens' rows."""
        if not self.task_tokens:
            return pretrained
        _, pieces = self.task_tokenizer(plan)
        return pretrained.with_new_tokens(pieces)

    def task_tokenizer(self, plan):
        """The run's tokenizer with `task_tokens` added, and the pieces each was spelled with before."""
        tokenizer = load_tokenizer(plan)
        pieces = hf_tokenizer.add_task_tokens(tokenizer, self.task_tokens) if self.task_tokens else {}
        return tokenizer, pieces

    def checked_tokenizer(self, plan):
        """`task_tokenizer`'s tokenizer; ConfigError unless `model.vocab_size` is its vocabulary."""
        tokenizer, _ = self.task_tokenizer(plan)
        if self.task_tokens and tokenizer.get_vocab_size() != plan.model.vocab_size:
            raise sections.ConfigError(
                f"model.vocab_size ({plan.model.vocab_size}) must be the tokenizer's vocabulary with the "
                f"{len(self.task_tokens)} task tokens added ({tokenizer.get_vocab_size()})"
            )
        return tokenizer

    def params_from_pretrained(self, plan, directory):
        from longjax.run.errors import InitFromError

        try:
            hf_config = hf_configs.read_config_json(directory)
            family = "longformer" if hf_config.get("model_type") == "longformer" else "roberta"
            architecture = ("Longformer" if family == "longformer" else "Roberta") + _HF_CLASS[self.head]
            pretrained = hf_pretrained.from_pretrained(
                directory, architecture=architecture, param_dtype=plan.model.param_dtype, seed=plan.seed
            )
        except (ValueError, FileNotFoundError, NotImplementedError) as e:
            raise InitFromError(f"init_from: {e}") from e
        pretrained = self.adapt_pretrained(plan, pretrained)
        differences = [
            f"model.{field}: {getattr(pretrained.config, field)!r} there, {getattr(plan.model, field)!r} here"
            for field in _COMPARED_FIELDS if getattr(pretrained.config, field) != getattr(plan.model, field)
        ]
        if differences:
            hint = ""
            if family == "roberta" and pretrained.config.max_positions < plan.model.max_positions:
                hint = (" This looks like a RoBERTa checkpoint: make it a Longformer first, "
                        "`python -m longjax.convert roberta-to-longformer --src=DIR --out=DIR`.")
            raise InitFromError(
                f"init_from: {directory}/config.json describes another model than config.model ("
                + "; ".join(differences) + "): set those config fields to the checkpoint's." + hint
            )
        params = dict(pretrained.params)
        # A head (or pooler) the checkpoint did not have was drawn by from_pretrained; the run's own
        # initialisation draws it instead, so it has this model's shape (e.g. num_labels) and the run's seed.
        fresh = pretrained.newly_initialized
        if any("pooler." in name for name in fresh):
            params.pop("pooler", None)
        if any("pooler." not in name for name in fresh):
            params.pop("head", None)
        what = f"the Hugging Face checkpoint {directory} (read as {pretrained.architecture})"
        return {"params": params}, what

    # --- data -----------------------------------------------------------------------------------

    def train_batches(self, plan, data, phase, *, seed: int):
        return examples.make_example_iterator(
            data.features("train"), global_batch_size=phase.batch_size, seed=seed,
            transform=self.train_transform(plan, data, seed),
        )

    def train_transform(self, plan, data, seed: int) -> examples.Transform | None:
        """A pure function of a batch and its global example indices (e.g. MLM masking), or None."""
        return None

    def tokens_per_batch(self, phase) -> int:
        return phase.batch_size * phase.seq_len

    # --- model calls ----------------------------------------------------------------------------

    def forward(self, model, params, batch, *, dropout_key, step=None) -> dict[str, jax.Array]:
        """The model's outputs on a batch of features ('input_ids', 'padding_mask', optional 'global_mask')."""
        deterministic = dropout_key is None
        rngs = None if deterministic else {"dropout": dropout_key}
        glob = batch.get("global_mask") if self.uses_global_attention else None
        if glob is not None:
            glob = jnp.logical_and(glob, batch["padding_mask"])
        return model.apply(
            params, batch["input_ids"], padding_mask=batch["padding_mask"], global_mask=glob,
            deterministic=deterministic, rngs=rngs,
        )


class BatchedOutputs:
    """Runs a jitted `fn(params, batch) -> dict of arrays [batch, ...]` over a whole feature table.

    The table is cut into batches of `batch_size` rows (the last padded by
    repeating its first row and trimmed after); a batch is split over the
    mesh's batch axes when `batch_size` is a multiple of their devices. Every
    process computes the same outputs.
    """

    def __init__(self, fn: Callable, mesh, batch_size: int):
        replicated = NamedSharding(mesh, PartitionSpec())
        self._rows = base.eval_rows_sharding(mesh, batch_size)
        self._fn = jax.jit(fn, out_shardings=replicated)
        self._batch_size = batch_size

    def __call__(self, params, features: Mapping[str, np.ndarray], keys) -> dict[str, np.ndarray]:
        n = examples.table_length(features)
        outputs: dict[str, list] = {}
        for start in range(0, n, self._batch_size):
            rows = np.arange(start, start + self._batch_size)
            rows = np.where(rows < n, rows, start)
            batch = {}
            for key in keys:
                array = np.asarray(features[key])[rows]
                batch[key] = jax.make_array_from_callback(array.shape, self._rows, lambda index, a=array: a[index])
            out = self._fn(params, batch)
            for key, value in out.items():
                outputs.setdefault(key, []).append(np.asarray(value)[: min(self._batch_size, n - start)])
        return {key: np.concatenate(parts) for key, parts in outputs.items()}


def limited(features: Mapping[str, np.ndarray], limit: int | None) -> dict[str, np.ndarray]:
    """The first `limit` rows of a feature table (all when None)."""
    return {k: np.asarray(v)[:limit] for k, v in features.items()}


def write_json_predictions(stem: Path, predictions: Mapping[str, str] | None) -> Path:
    """Writes `<stem>.json`, `{id: prediction}` (sorted, UTF-8 kept); `predictions` None: nothing scored yet, an error."""
    if predictions is None:
        raise RuntimeError("write_predictions: the evaluator has not scored a split yet")
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(dict(predictions), indent=1, ensure_ascii=False, sort_keys=True))
    return path


def summary_line(split: str, metrics: Mapping[str, Any], names: tuple[str, ...]) -> str:
    """`split: name value, ...` for the named metrics present."""
    parts = []
    for name in names:
        if name in metrics:
            value = metrics[name]
            parts.append(f"{name} {value:,}" if isinstance(value, int) else f"{name} {value:.4f}")
    return f"{split}: " + ", ".join(parts)
