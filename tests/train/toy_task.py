"""A task that lives outside longjax (`config.task = 'tests.train.toy_task'`): the run trains it unchanged.

Classification of random token sequences: the label says whether the first
token is larger than the last, so the answer needs attention across the whole
sequence (here: a LongEncoder whose first token is global). Its data, loss,
metric (accuracy) and evaluator are all the task's; the loop knows none of them.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from longjax import models, sections
from longjax.tasks import base


@dataclasses.dataclass(frozen=True)
class DataSection:
    vocab: int = 8  # token ids in [0, vocab)
    eval_examples: int = 64  # examples in each evaluation split

    def __post_init__(self):
        sections.positive_int("data.vocab", self.vocab)
        sections.positive_int("data.eval_examples", self.eval_examples)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection(base.EvalSection):
    seq_len: int = 16  # length of the evaluation sequences
    batch_size: int = 16


def examples(seed: int, indices: np.ndarray, seq_len: int, vocab: int):
    """(tokens int32 [n, seq_len], labels int32 [n]) of the examples `indices`: a pure function of the seed."""
    rows = [np.random.default_rng([seed, int(i)]).integers(0, vocab, seq_len) for i in indices]
    tokens = np.stack(rows).astype(np.int32)
    return tokens, (tokens[:, 0] > tokens[:, -1]).astype(np.int32)


class Classifier(nn.Module):
    config: models.TransformerConfig

    @nn.compact
    def __call__(self, tokens, *, deterministic=True, step=None):
        global_mask = jnp.zeros(tokens.shape, bool).at[:, 0].set(True)
        x = models.LongEncoder(self.config, name="encoder")(
            tokens, global_mask=global_mask, deterministic=deterministic, step=step
        )
        return nn.Dense(2, name="head")(x[:, 0])


class Batches:
    """Training batches of one phase: a pure function of (seed, step), resumable by its step."""

    def __init__(self, seed, phase, vocab):
        self.seed, self.phase, self.vocab, self.step = seed, phase, vocab, 0

    def __next__(self):
        first = self.step * self.phase.batch_size
        tokens, labels = examples(self.seed, np.arange(first, first + self.phase.batch_size), self.phase.seq_len,
                                  self.vocab)
        self.step += 1
        return {"tokens": tokens, "labels": labels}

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]

    def close(self):
        pass


@dataclasses.dataclass(frozen=True)
class Data:
    vocab: int
    eval_examples: int

    @property
    def fingerprint(self) -> str:
        return f"toy-v1-{self.vocab}-{self.eval_examples}"


class Accuracy:
    def __init__(self, plan, data, phase):
        self.plan, self.data = plan, data
        self._logits = jax.jit(Classifier(phase.model).apply)

    def __call__(self, params, split, *, trained_steps, limit=None):
        del trained_steps
        count = self.data.eval_examples if limit is None else min(limit, self.data.eval_examples)
        seed = {"validation": 1, "test": 2, "train": 0}[split]
        tokens, labels = examples(10_000 + seed, np.arange(count), self.plan.eval.seq_len, self.data.vocab)
        predictions = np.argmax(np.asarray(self._logits(params, tokens)), axis=-1)
        return {"accuracy": float(np.mean(predictions == labels)), "examples": count}


class ToyTask(base.Task):
    data_section = DataSection
    eval_section = EvalSection
    curve_metric = "accuracy"

    def build_model(self, model_config):
        return Classifier(model_config)

    def init_params(self, model, key):
        return model.init(key, jnp.zeros((1, 8), jnp.int32))

    def load_data(self, plan):
        return Data(plan.data.vocab, plan.data.eval_examples)

    def train_batches(self, plan, data, phase, *, seed):
        return Batches(seed, phase, data.vocab)

    def loss(self, model, params, batch, *, step, dropout_key):
        rngs = None if dropout_key is None else {"dropout": dropout_key}
        logits = model.apply(params, batch["tokens"], deterministic=dropout_key is None, step=step, rngs=rngs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"])}

    def evaluator(self, plan, data, phase, mesh):
        return Accuracy(plan, data, phase)

    def summary(self, split, metrics):
        return f"{split} accuracy {metrics['accuracy']:.4f} over {metrics['examples']} examples"


TASK = ToyTask()
