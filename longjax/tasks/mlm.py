"""`mlm`: continued masked-LM pretraining of a long encoder (the Longformer paper's section 5, Table 5).

* Model: `EncoderWithHead(head='masked_lm')` (RoBERTa's tied LM head), no global attention.
* Data: documents, plain-text files (one document each) or JSON lines with a
  `text` field, in `data.dir/train/` and `data.dir/validation/`
  (`longjax.data.mlm_text`); tokenised, each document wrapped in `<s> ... </s>`,
  and packed into blocks of `seq_len` tokens that run across document ends
  (RoBERTa's full-sentences packing).
* Masking: RoBERTa's (`mlm_text.mask_tokens`): 15% of the tokens, 80% `<mask>`,
  10% a random token, 10% kept, drawn afresh for every example the run sees,
  a pure function of (seed, example index); validation uses one fixed draw.
* Loss: mean cross entropy over the masked tokens (nats). Metric `bpc`: the
  masked tokens' loss in bits divided by the characters they spell (the
  paper's bits per character).

Config sections:

    data.dir           directory holding train/ and validation/ (optionally test/) ('' = $LONGJAX_DATA_DIR/mlm)
    data.tokenizer     tokenizer directory ('' = init_from's)
    data.mask_prob     fraction of tokens chosen for prediction (0.15)
    eval.batch_size    blocks per evaluation call
    eval.max_examples  validation blocks scored during training (None: all)
    eval.every_steps   validation every N steps (None: at each phase's end)
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

from longjax import sections
from longjax.data import examples, mlm_text
from longjax.tasks import encoder_base

SPLITS = ("train", "validation", "test")
# The validation masks are one fixed draw, the same for every run, so runs compare.
_EVAL_MASK_SEED = 20_200_410


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """`config.data` of the masked LM (see the module docstring)."""

    dir: str = ""
    tokenizer: str = ""
    mask_prob: float = 0.15

    def __post_init__(self):
        sections.require(0 < self.mask_prob < 1, "data.mask_prob", self.mask_prob, "in (0, 1)")


@dataclasses.dataclass
class MaskedLMData:
    """Packed blocks per split (`tokens` int32 `[n, seq]`, `token_chars` float32 `[n, seq]`) and the masking ids."""

    splits: dict[str, dict[str, np.ndarray]]
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    fingerprint: str

    def features(self, split: str) -> dict[str, np.ndarray]:
        if split not in self.splits:
            raise FileNotFoundError(f"the masked-LM data has no {split!r} split (a {split}/ directory)")
        return self.splits[split]


def mask_fn(data: MaskedLMData, mask_prob: float, seed: int):
    """`transform(batch, example_indices)`: each row masked with the rng of (seed, its example index)."""

    def transform(batch, indices):
        inputs, targets = [], []
        for row, index in zip(batch["tokens"], indices):
            rng = np.random.default_rng([seed, int(index)])
            x, y = mlm_text.mask_tokens(
                row[None], rng, mask_id=data.mask_id, vocab_size=data.vocab_size, special_ids=data.special_ids,
                mask_prob=mask_prob,
            )
            inputs.append(x[0])
            targets.append(y[0])
        return {
            "input_ids": np.stack(inputs).astype(np.int32), "targets": np.stack(targets).astype(np.int32),
            "padding_mask": np.ones(batch["tokens"].shape, bool), "token_chars": batch["token_chars"],
        }

    return transform


def masked_lm_sums(model, params, batch, *, dropout_key=None):
    """Per row of the batch: (summed loss in nats, characters, count) of its masked tokens; float32 `[batch]`."""
    out = model.apply(
        params, batch["input_ids"], padding_mask=batch["padding_mask"], deterministic=dropout_key is None,
        rngs=None if dropout_key is None else {"dropout": dropout_key},
    )
    chosen = batch["targets"] >= 0
    losses = optax.softmax_cross_entropy_with_integer_labels(out["logits"], jnp.maximum(batch["targets"], 0))
    losses = jnp.where(chosen, losses, 0.0)
    chars = jnp.where(chosen, batch["token_chars"], 0.0)
    return losses.sum(-1), chars.sum(-1), chosen.sum(-1).astype(jnp.float32)


class MaskedLMEvaluator:
    """Masked-LM loss and bits per character of a split under one fixed masking."""

    def __init__(self, model, plan, data: MaskedLMData, mesh):
        self._data, self._mask_prob = data, plan.data.mask_prob

        def sums(params, batch):
            loss, chars, count = masked_lm_sums(model, params, batch)
            return {"loss": loss, "chars": chars, "count": count}

        self._run = encoder_base.BatchedOutputs(sums, mesh, plan.eval.batch_size)

    def __call__(self, params, split: str, *, trained_steps: int, limit: int | None = None) -> dict:
        blocks = encoder_base.limited(self._data.features(split), limit)
        n = examples.table_length(blocks)
        masked = mask_fn(self._data, self._mask_prob, _EVAL_MASK_SEED)(blocks, np.arange(n))
        out = self._run(params, masked, ("input_ids", "targets", "padding_mask", "token_chars"))
        loss, chars, count = (float(np.sum(out[k])) for k in ("loss", "chars", "count"))
        if count == 0:
            raise ValueError(f"the {split} split's masking chose no token: too few blocks to evaluate")
        return {"loss": loss / count, "bpc": loss / math.log(2.0) / chars, "masked_tokens": int(count),
                "blocks": int(n)}


class MaskedLMTask(encoder_base.EncoderTask):
    """Continued masked-LM pretraining; see the module docstring."""

    head = "masked_lm"
    uses_global_attention = False
    data_section = DataSection
    splits = SPLITS
    curve_metric = "bpc"

    def load_data(self, plan) -> MaskedLMData:
        tokenizer = encoder_base.load_tokenizer(plan)
        ids = {t: encoder_base.special_id(tokenizer, t) for t in ("<s>", "</s>", "<pad>", "<mask>")}
        special = tuple(sorted({*ids.values(), *(i for i in (tokenizer.token_to_id("<unk>"),) if i is not None)}))
        seq_len = plan.phases[0].seq_len
        root = encoder_base.data_directory(plan.data.dir, "mlm")
        if not root.is_dir():
            raise FileNotFoundError(f"data.dir: {root} is not a directory (expected train/ and validation/ in it)")
        splits = {}
        for split in SPLITS:
            directory = root / split
            if split == "test" and not directory.exists():
                continue
            documents = mlm_text.read_documents(directory)
            packed = mlm_text.pack_documents_with_tokenizer(
                documents, tokenizer, seq_len, bos_id=ids["<s>"], eos_id=ids["</s>"]
            )
            if len(packed.tokens) == 0:
                raise ValueError(f"{directory}: its documents hold fewer tokens than one block of {seq_len}")
            splits[split] = {"tokens": packed.tokens, "token_chars": packed.token_chars}
        fingerprint = "-".join(examples.fingerprint(splits[s]) for s in sorted(splits))
        return MaskedLMData(splits, ids["<mask>"], tokenizer.get_vocab_size(), special, fingerprint)

    def train_transform(self, plan, data, seed):
        return mask_fn(data, plan.data.mask_prob, seed)

    def loss(self, model, params, batch, *, step, dropout_key):
        loss, chars, count = (x.sum() for x in masked_lm_sums(model, params, batch, dropout_key=dropout_key))
        return loss / jnp.maximum(count, 1.0), {"bpc": loss / math.log(2.0) / jnp.maximum(chars, 1.0)}

    def loss_weight(self, batch):
        return (batch["targets"] >= 0).sum()

    def evaluator(self, plan, data, phase, mesh) -> MaskedLMEvaluator:
        return MaskedLMEvaluator(self.build_model(phase.model), plan, data, mesh)

    def summary(self, split: str, metrics) -> str:
        return encoder_base.summary_line(split, metrics, ("bpc", "loss", "masked_tokens"))


TASK = MaskedLMTask()
