"""`summarization`: long-document summarization with LED, arXiv papers (the Longformer paper's Table 11).

* Model: `longjax.models.LongEncoderDecoder` of `config.model` (shared fields,
  plus `encoder` and `decoder` sub-sections; `label_smoothing` of the loss);
  `init_from` a Hugging Face LED directory (`allenai/led-large-16384`, or a
  BART converted with `python -m longjax.convert bart-to-led`).
* Input: `<s> article </s>` truncated to the phase's `seq_len` tokens, global
  attention on `<s>` (LED's setting); target `<s> abstract </s>` truncated to
  `data.max_target_tokens`, teacher-forced with decoder inputs shifted right
  from `</s>` (Hugging Face's `shift_tokens_right`).
* Loss: token cross entropy, optionally label-smoothed. Metrics: loss, nll,
  token accuracy; at evaluation, summaries by `config.decode` (beam search,
  `longjax.models.decoding`) and ROUGE-1/2/L/Lsum (`longjax.data.rouge`)
  against the abstract's sentences.
* Data (`longjax.data.arxiv`): `data.format='release'` reads the JSON-lines
  release (`train.txt`, `val.txt`, `test.txt`) in `data.dir`; `'tfds'` reads
  `scientific_papers/arxiv` prepared by tensorflow-datasets in `data.dir`.
* Evaluation writes `predictions_<split>_<step>.txt`, one summary per line in
  split order (`python -m longjax.summarize` is the same with decoding flags).

Config sections:

    model.encoder / model.decoder   num_layers, num_heads, d_ff, max_positions (+ the encoder's attention)
    model.label_smoothing           of the training loss (0 = plain cross entropy)
    data.format                     'release' | 'tfds'
    data.dir                        the release directory or tfds data_dir ('' = $LONGJAX_DATA_DIR/arxiv-dataset)
    data.max_target_tokens          target tokens, <s> and </s> included
    data.tokenizer                  tokenizer directory ('' = init_from's)
    decode.*                        longjax.models.GenerationSettings (num_beams, max_length, length_penalty, ...)
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from longjax import models, sections
from longjax.data import arxiv, examples, rouge
from longjax.hf import pretrained as hf_pretrained
from longjax.hf.encoder_decoder_pretrained import EncoderDecoderPretrained
from longjax.models.decoding import GenerationSettings
from longjax.models.encoder_decoder import EncoderDecoderConfig
from longjax.models.generation import generate
from longjax.tasks import base, encoder_base

log = logging.getLogger(__name__)

SPLITS = arxiv.SPLITS
_PART_FIELDS = ("num_layers", "num_heads", "d_ff", "max_positions")
# Fields compared with a pretrained checkpoint's config.json, per part.
_COMPARED = ("vocab_size", "num_layers", "num_heads", "d_model", "d_ff", "max_positions", "activation")


@dataclasses.dataclass(frozen=True)
class SummarizerConfig(EncoderDecoderConfig):
    """The LED config plus the label smoothing of its training loss."""

    label_smoothing: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        sections.require(isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 1,
                         "model.label_smoothing", self.label_smoothing, "a number in [0, 1)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """`config.data` of summarization (see the module docstring)."""

    format: str = "release"
    dir: str = ""
    max_target_tokens: int = 512
    tokenizer: str = ""

    def __post_init__(self):
        sections.one_of("data.format", self.format, ("release", "tfds"))
        sections.positive_int("data.max_target_tokens", self.max_target_tokens)
        sections.require(self.max_target_tokens >= 2, "data.max_target_tokens", self.max_target_tokens, ">= 2")


@dataclasses.dataclass
class SummarizationData:
    """Per split: the papers and their feature table; the tokenizer that decodes summaries."""

    papers: dict[str, list[arxiv.Paper]]
    tables: dict[str, dict[str, np.ndarray]]
    tokenizer: object
    fingerprint: str

    def features(self, split: str) -> dict[str, np.ndarray]:
        return self.tables[split]


def _part_config(shared: dict, part: dict | None, name: str, attention) -> models.TransformerConfig:
    if not isinstance(part, dict):
        raise sections.ConfigError(f"model.{name} must be a section with {list(_PART_FIELDS)}, got {part!r}")
    fields = {**shared, "position": "learned", "layer_norm": "post", **part}
    if attention is not None:
        fields["attention"] = attention
    try:
        return models.transformer_config(fields)
    except ValueError as e:
        message = str(e)
        for key in part:  # errors in the part's own fields name them under model.<part>
            message = re.sub(rf"\bmodel\.{key}\b", f"model.{name}.{key}", message)
        raise sections.ConfigError(message) from e


def build_features(papers, tokenizer, seq_len: int, max_target: int) -> dict[str, np.ndarray]:
    """Token tables of `papers`: `<s> article </s>` and `<s> abstract </s>`, truncated and padded.

    Returns:
      input_ids int32 `[n, seq_len]`, padding_mask and global_mask (the first
      token) bool `[n, seq_len]`; labels int32 `[n, max_target]` (-100 after
      the end) and decoder_input_ids int32 `[n, max_target]` (labels shifted
      right after `</s>`, padded).
    """
    bos, eos, pad = (encoder_base.special_id(tokenizer, t) for t in ("<s>", "</s>", "<pad>"))
    n = len(papers)
    input_ids = np.full((n, seq_len), pad, np.int32)
    labels = np.full((n, max_target), -100, np.int32)
    articles = tokenizer.encode_batch([p.article for p in papers], add_special_tokens=False)
    abstracts = tokenizer.encode_batch([" ".join(p.abstract) for p in papers], add_special_tokens=False)
    for i, (article, abstract) in enumerate(zip(articles, abstracts)):
        ids = [bos, *article.ids[: seq_len - 2], eos]
        input_ids[i, : len(ids)] = ids
        target = [bos, *abstract.ids[: max_target - 2], eos]
        labels[i, : len(target)] = target
    decoder_input_ids = np.concatenate([np.full((n, 1), eos, np.int32), labels[:, :-1]], axis=1)
    decoder_input_ids = np.where(decoder_input_ids == -100, pad, decoder_input_ids).astype(np.int32)
    glob = np.zeros((n, seq_len), bool)
    glob[:, 0] = True
    return {"input_ids": input_ids, "padding_mask": input_ids != pad, "global_mask": glob, "labels": labels,
            "decoder_input_ids": decoder_input_ids}


def read_papers(section: DataSection) -> dict[str, list[arxiv.Paper]]:
    directory = encoder_base.data_directory(section.dir, "arxiv-dataset")
    return arxiv.read_arxiv_release(directory) if section.format == "release" else arxiv.read_arxiv_tfds(directory)


class SummarizationEvaluator:
    """Teacher-forced loss, generated summaries and their ROUGE on a split; keeps the summaries for `write_predictions`."""

    def __init__(self, task, model, plan, data: SummarizationData, mesh):
        self._data = data
        self._last = None
        settings = plan.extra["decode"]

        def token_loss(params, batch):
            logits = task.logits(model, params, batch, dropout_key=None)
            labels = batch["labels"]
            mask = labels >= 0
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, labels, 0))
            return {"nll": jnp.sum(nll * mask, axis=-1), "tokens": mask.sum(-1)}

        def summaries(params, batch):
            out = generate(model, params["params"], batch["input_ids"], padding_mask=batch["padding_mask"],
                           global_mask=batch["global_mask"] & batch["padding_mask"], settings=settings)
            return {"sequences": out.sequences[:, 0], "lengths": out.lengths[:, 0]}

        self._loss = encoder_base.BatchedOutputs(token_loss, mesh, plan.eval.batch_size)
        self._generate = encoder_base.BatchedOutputs(summaries, mesh, plan.eval.batch_size)

    def __call__(self, params, split: str, *, trained_steps: int, limit: int | None = None) -> dict:
        table = encoder_base.limited(self._data.features(split), limit)
        n = examples.table_length(table)
        if n == 0:
            raise ValueError(f"the {split} split holds no paper")
        losses = self._loss(params, table, ("input_ids", "padding_mask", "global_mask", "labels",
                                            "decoder_input_ids"))
        generated = self._generate(params, table, ("input_ids", "padding_mask", "global_mask"))
        tokenizer = self._data.tokenizer
        texts = [
            " ".join(tokenizer.decode([int(t) for t in seq[1:length]], skip_special_tokens=True).split())
            for seq, length in zip(generated["sequences"], generated["lengths"])
        ]
        papers = self._data.papers[split][:n]
        scores = rouge.rouge([rouge.split_sentences(t) for t in texts], [p.abstract for p in papers])
        self._last = texts
        # summary_tokens: generated tokens per summary, its </s> included.
        return {**scores, "loss": float(losses["nll"].sum() / max(int(losses["tokens"].sum()), 1)),
                "summary_tokens": float(np.mean(generated["lengths"] - 1)), "documents": int(n)}

    def write_predictions(self, stem: Path) -> Path:
        """`<stem>.txt`: the last call's summaries, one per line, in split order."""
        if self._last is None:
            raise RuntimeError("write_predictions: the evaluator has not scored a split yet")
        path = stem.with_suffix(".txt")
        path.write_text("".join(text.replace("\n", " ") + "\n" for text in self._last), encoding="utf-8")
        return path


class SummarizationTask(base.Task):
    """Summarization with LongEncoderDecoder; see the module docstring."""

    data_section = DataSection
    eval_section = encoder_base.EvalSection
    extra_sections = {"decode": GenerationSettings}
    splits = SPLITS
    curve_metric = "loss"

    # --- config ---------------------------------------------------------------------------------

    def model_config(self, section) -> SummarizerConfig:
        fields = dict(sections.plain(section))
        encoder, decoder = fields.pop("encoder", None), fields.pop("decoder", None)
        extra = {name: fields.pop(name) for name in ("position_offset", "scale_embedding", "label_smoothing")
                 if name in fields}
        decoder_attention = dict(type="full")
        return SummarizerConfig(
            _part_config(fields, encoder, "encoder", None), _part_config(fields, decoder, "decoder", decoder_attention),
            **extra)

    def phase_model(self, model, *, window_scale: int, seq_len: int):
        return dataclasses.replace(
            model, encoder=super().phase_model(model.encoder, window_scale=window_scale, seq_len=seq_len))

    def describe_model(self, model) -> str:
        return "encoder " + super().describe_model(model.encoder)

    def check(self, plan) -> None:
        model, decode = plan.model, plan.extra["decode"]
        lengths = sorted({p.seq_len for p in plan.phases})
        if len(lengths) > 1:
            raise sections.ConfigError(f"phases.seq_len: summarization tokenises its data once, at one length; got {lengths}")
        if lengths[0] > model.encoder.max_positions:
            raise sections.ConfigError(f"phases.seq_len ({lengths[0]}) must be <= model.encoder.max_positions "
                                       f"({model.encoder.max_positions})")
        for name, length in (("data.max_target_tokens", plan.data.max_target_tokens),
                             ("decode.max_length", decode.max_length)):
            if length > model.decoder.max_positions:
                raise sections.ConfigError(f"{name} ({length}) must be <= model.decoder.max_positions "
                                           f"({model.decoder.max_positions})")
        for layer, attention in enumerate(model.encoder.attention):
            bounded = (models.SlidingWindowAttention, models.BlockSparseAttention)
            if isinstance(attention, bounded) and attention.max_global_tokens is None:
                raise sections.ConfigError(
                    f"model.encoder.attention.max_global_tokens (layer {layer}) must be set (>= 1): the first token "
                    "has global attention")
            if isinstance(attention, (models.PerformerAttention,)):
                raise sections.ConfigError(f"model.encoder.attention (layer {layer}): performer attention has no "
                                           "global tokens, which LED's input puts on <s>")

    # --- model ----------------------------------------------------------------------------------

    def build_model(self, model_config) -> models.LongEncoderDecoder:
        return models.LongEncoderDecoder(model_config)

    def init_params(self, model, key):
        length = max([8] + [getattr(a, "max_global_tokens", None) or 0 for a in model.config.encoder.attention])
        tokens = jnp.full((1, length), 5, jnp.int32)
        glob = jnp.zeros((1, length), bool).at[0, 0].set(True)
        return model.init(key, tokens, jnp.full((1, 4), 5, jnp.int32), global_mask=glob)

    def params_from_pretrained(self, plan, directory):
        from longjax.run.errors import InitFromError

        try:
            pretrained = hf_pretrained.from_pretrained(directory, param_dtype=plan.model.encoder.param_dtype)
        except (ValueError, FileNotFoundError) as e:
            raise InitFromError(f"init_from: {e}") from e
        if not isinstance(pretrained, EncoderDecoderPretrained):
            raise InitFromError(f"init_from: {directory} holds a {pretrained.architecture}, not a BART or LED checkpoint")
        differences = []
        for part in ("encoder", "decoder"):
            there, here = getattr(pretrained.config, part), getattr(plan.model, part)
            differences += [f"model.{part}.{f}: {getattr(there, f)!r} there, {getattr(here, f)!r} here"
                            for f in _COMPARED if getattr(there, f) != getattr(here, f)]
        for field in ("position_offset", "scale_embedding"):
            there, here = getattr(pretrained.config, field), getattr(plan.model, field)
            if there != here:
                differences.append(f"model.{field}: {there!r} there, {here!r} here")
        if differences:
            hint = ""
            if pretrained.family == "bart":
                hint = (" A BART checkpoint: make it an LED first, "
                        "`python -m longjax.convert bart-to-led --src=DIR --out=DIR`.")
            raise InitFromError(f"init_from: {directory}/config.json describes another model than config.model ("
                                + "; ".join(differences) + "): set those config fields to the checkpoint's." + hint)
        what = f"the Hugging Face checkpoint {directory} (read as {pretrained.architecture})"
        return {"params": dict(pretrained.params)}, what

    # --- data -----------------------------------------------------------------------------------

    def load_data(self, plan) -> SummarizationData:
        tokenizer = encoder_base.load_tokenizer(plan)
        # The features shift targets right after </s> and pad with <pad>: decoding must use the same ids.
        decode = plan.extra["decode"]
        for field, token in (("decoder_start_token_id", "</s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>")):
            expected = encoder_base.special_id(tokenizer, token)
            if getattr(decode, field) != expected:
                raise sections.ConfigError(
                    f"decode.{field} ({getattr(decode, field)}) must be the tokenizer's {token} id ({expected})")
        papers = read_papers(plan.data)
        tables = {}
        for split in SPLITS:
            if not papers[split]:
                raise ValueError(f"data: the arXiv {split} split holds no paper")
            tables[split] = build_features(papers[split], tokenizer, plan.phases[0].seq_len, plan.data.max_target_tokens)
            log.info("arxiv %s: %d papers", split, len(papers[split]))
        fingerprint = "-".join(examples.fingerprint(tables[s]) for s in SPLITS)
        return SummarizationData(papers, tables, tokenizer, fingerprint)

    def train_batches(self, plan, data, phase, *, seed: int):
        return examples.make_example_iterator(data.features("train"), global_batch_size=phase.batch_size, seed=seed)

    # --- loss and evaluation --------------------------------------------------------------------

    def logits(self, model, params, batch, *, dropout_key) -> jax.Array:
        """Teacher-forced logits `[batch, target, vocab]` of a batch of features."""
        deterministic = dropout_key is None
        return model.apply(
            params, batch["input_ids"], batch["decoder_input_ids"], padding_mask=batch["padding_mask"],
            global_mask=jnp.logical_and(batch["global_mask"], batch["padding_mask"]), deterministic=deterministic,
            rngs=None if deterministic else {"dropout": dropout_key},
        )

    def loss(self, model, params, batch, *, step, dropout_key):
        logits = self.logits(model, params, batch, dropout_key=dropout_key)
        labels = batch["labels"]
        mask = labels >= 0
        targets = jax.nn.one_hot(jnp.where(mask, labels, 0), logits.shape[-1])
        eps = model.config.label_smoothing
        smoothed = optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, eps) if eps else targets)
        nll = optax.softmax_cross_entropy(logits, targets)
        count = jnp.maximum(mask.sum(), 1)
        accuracy = jnp.sum((logits.argmax(-1) == labels) & mask) / count
        return jnp.sum(smoothed * mask) / count, {"nll": jnp.sum(nll * mask) / count, "token_accuracy": accuracy}

    def loss_weight(self, batch):
        return jnp.sum(batch["labels"] >= 0)

    def evaluator(self, plan, data, phase, mesh) -> SummarizationEvaluator:
        return SummarizationEvaluator(self, self.build_model(phase.model), plan, data, mesh)

    def summary(self, split: str, metrics) -> str:
        return encoder_base.summary_line(
            split, metrics, ("rouge1", "rouge2", "rougeL", "rougeLsum", "loss", "summary_tokens", "documents"))


TASK = SummarizationTask()
