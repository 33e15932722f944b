"""`char_lm`: the Longformer character LM, next-character prediction on enwik8, text8 or the demo corpus.

* Model: `longjax.models.CharLM` (causal) of `config.model`.
* Data: random windows of `seq_len + 1` characters of the training split
  (`longjax.data.pipeline`), a pure function of (seed, example index).
* Loss: mean next-character cross entropy in nats; metric `bpc` = loss / ln 2.
* Evaluation: bits per character with the Transformer-XL protocol
  (`longjax.bpc`): windows of `eval.seq_len` advancing `eval.step`, each
  character scored once, with the windows the phase trained with.

Config sections:

    data.name          'enwik8' | 'text8' | 'pydoc_topics' (embedded, no download)
    data.dir           directory of the corpus files ('' = $LONGJAX_DATA_DIR, else ~/.cache/longjax/data)
    data.download      fetch a missing corpus (checksum-verified)
    eval.seq_len       characters the model sees per evaluation window (L)
    eval.step          characters scored per window after the first (S <= L)
    eval.batch_size    windows per evaluation call
    eval.every_steps   validation BPC every N training steps (None: at each phase's end only)
    eval.max_chars     validation characters scored during training (None: all)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from longjax import bpc, models, sections
from longjax.data import corpora, pipeline
from longjax.data.corpus import SPLITS, Corpus
from longjax.tasks import base

CORPUS_NAMES = (*sorted(corpora.CORPORA), corpora.EMBEDDED_CORPUS)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """`config.data` of the character LM (see the module docstring)."""

    name: str
    dir: str = ""
    download: bool = True

    def __post_init__(self):
        sections.one_of("data.name", self.name, CORPUS_NAMES)

    @property
    def alphabet_size(self) -> int:
        return len(corpora.CORPORA[self.name].alphabet) if self.name in corpora.CORPORA else 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection(base.EvalSection):
    """`config.eval` of the character LM (see the module docstring)."""

    seq_len: int
    step: int
    batch_size: int = 1
    max_chars: int | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("seq_len", "step", "batch_size"):
            sections.positive_int(f"eval.{name}", getattr(self, name))
        if self.step > self.seq_len:
            raise sections.ConfigError(f"eval.step ({self.step}) must not exceed eval.seq_len ({self.seq_len})")
        if self.max_chars is not None:
            sections.require(
                sections.is_int(self.max_chars) and self.max_chars >= 2, "eval.max_chars", self.max_chars,
                "None or an int >= 2 (one scored character needs two)",
            )

    @property
    def training_limit(self) -> int | None:
        return self.max_chars


def log_prob_fn(model: models.CharLM):
    """`log_probs(params, tokens [batch, n], step) -> [batch, n - 1]`: ln p(tokens[:, 1:] | prefix), float32."""

    def log_probs(params, tokens, step):
        logits = model.apply(params, tokens[:, :-1], deterministic=True, step=step)
        log_softmax = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(log_softmax, tokens[:, 1:, None], axis=-1)[..., 0]

    return log_probs


class BpcEvaluator:
    """Scores a split of the corpus with the model of one phase, in windows of the eval length.

    The jitted log-probability function is built once per phase and reused by
    every evaluation of that phase. Every process plans the same windows; a
    batch of them is split over the mesh's batch axes when `eval.batch_size` is a
    multiple of their devices (else each device scores the whole batch), and
    the scores come back replicated, so every process computes the same BPC.
    """

    def __init__(self, eval_section: EvalSection, corpus: Corpus, phase, mesh):
        self.eval_section = eval_section
        self.corpus = corpus
        # The phase's own model: windows as trained (scaled and clipped to the
        # training length). Widening them to the evaluation length would score
        # attention spans the model never saw.
        self.model_config = phase.model
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._windows = base.eval_rows_sharding(mesh, eval_section.batch_size)
        self._log_probs = jax.jit(log_prob_fn(models.CharLM(phase.model)), out_shardings=self._replicated)

    def __call__(self, params, split: str, *, trained_steps: int, limit: int | None = None) -> dict[str, float]:
        """`{'bpc', 'loss', 'chars'}` of the first `limit` characters of `split` (all when None).

        `trained_steps` is the number of optimizer steps behind `params`; layers
        that redraw their projection (Performer) use that of the last of them,
        the projection the parameters were last trained with.
        """
        data = self.corpus.split(split)
        data = data if limit is None else data[:limit]
        ev = self.eval_section
        step_array = jax.device_put(np.int32(max(trained_steps - 1, 0)), self._replicated)

        def score(tokens):
            # Every process holds the whole batch, so each device reads its rows from it.
            tokens = jax.make_array_from_callback(tokens.shape, self._windows, lambda index: tokens[index])
            return self._log_probs(params, tokens, step_array)

        result = bpc.evaluate_bpc(score, data, eval_len=ev.seq_len, step=ev.step, batch_size=ev.batch_size)
        return {"bpc": result.bpc, "loss": result.bpc * math.log(2.0), "chars": int(result.num_scored)}


class CharLMTask(base.Task):
    """The character LM; see the module docstring."""

    data_section = DataSection
    eval_section = EvalSection
    splits = SPLITS
    validation_split = "validation"
    curve_metric = "bpc"

    def check(self, plan) -> None:
        model = plan.model
        if model.vocab_size < plan.data.alphabet_size:
            raise sections.ConfigError(
                f"model.vocab_size ({model.vocab_size}) is smaller than the {plan.data.name} alphabet "
                f"({plan.data.alphabet_size})"
            )
        longest = max([p.seq_len for p in plan.phases] + [plan.eval.seq_len])
        if model.position == "learned" and model.max_positions < longest:
            raise sections.ConfigError(
                f"model.max_positions ({model.max_positions}) is shorter than the longest sequence ({longest})"
            )
        for layer, attention in enumerate(model.attention):
            window = getattr(attention, "window", None)
            if isinstance(window, tuple) and window[1] != 0:
                raise sections.ConfigError(
                    f"model.attention (layer {layer}): window {window!r} looks right, but the character LM "
                    "is causal; give (left, 0) or an int (keys to the left)"
                )

    def build_model(self, model_config) -> models.CharLM:
        return models.CharLM(model_config)

    def init_params(self, model, key):
        tokens = jnp.zeros((1, 8), jnp.int32)
        return model.init(key, tokens, step=jnp.zeros((), jnp.int32))

    def load_data(self, plan) -> Corpus:
        return corpora.load_corpus(plan.data.name, plan.data.dir or None, download=plan.data.download)

    def train_batches(self, plan, data, phase, *, seed: int) -> pipeline.TrainIterator:
        return pipeline.make_train_iterator(
            data.train, seq_len=phase.seq_len, global_batch_size=phase.batch_size, seed=seed
        )

    def loss(self, model, params, batch, *, step, dropout_key):
        tokens = batch["tokens"]
        deterministic = dropout_key is None
        rngs = None if deterministic else {"dropout": dropout_key}
        logits = model.apply(params, tokens[:, :-1], deterministic=deterministic, step=step, rngs=rngs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return loss, {"bpc": loss / math.log(2.0)}

    def evaluator(self, plan, data, phase, mesh) -> BpcEvaluator:
        return BpcEvaluator(plan.eval, data, phase, mesh)

    def summary(self, split: str, metrics) -> str:
        return f"{split} BPC {metrics['bpc']:.4f} over {int(metrics['chars']):,} characters"


TASK = CharLMTask()
