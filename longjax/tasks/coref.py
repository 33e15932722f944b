"""`coref`: OntoNotes coreference with a long encoder over whole documents (the Longformer paper's Table 7).

* Data (`longjax.data.coref`): the JSON lines of Joshi et al.'s `minimize.py`
  in `data.dir` (`data.train_file`, `data.validation_file`, optional
  `data.test_file`); one document is one encoder input of `seq_len` tokens.
* Model (`longjax.models.coref`): `CorefModel`, the LongEncoder (under
  'encoder') and the coarse-to-fine span-ranking head (under 'head', sized by
  `model.coref`). No global attention: the paper names global tokens for its
  QA and classification tasks and none for coreference.
* Loss: the marginal log-likelihood of the gold antecedents, summed over a
  document's kept spans, averaged over documents.
* Evaluation: clusters from each span's best antecedent, scored with MUC,
  B-cubed and CEAF-phi4 and their mean, the CoNLL F1
  (`longjax.data.coref_eval`), in subtoken spans. Writes
  `predictions_<split>_<step>.json`: `{doc_key: [[[start, end], ...], ...]}`.

Config sections:

    data.dir             the directory of the JSON-lines files ('' = $LONGJAX_DATA_DIR/ontonotes)
    data.train_file, data.validation_file, data.test_file   file names in data.dir (test optional)
    data.max_mentions    gold mentions per document (the feature table's width)
    data.genres          genre prefixes of doc_keys, in the genre embedding's order
    data.truncate        cut documents longer than seq_len (counted and logged) instead of failing
    data.tokenizer       tokenizer directory ('' = init_from's), to look the subtokens up
    model.coref          the head: max_span_width, top_span_ratio, max_top_antecedents,
                         ffnn_size, ffnn_depth, feature_size, num_genres, dropout
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from longjax import models, sections
from longjax.data import coref as data_coref
from longjax.data import coref_eval, examples
from longjax.models import coref as model_coref
from longjax.tasks import encoder_base

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_INPUT_KEYS = ("input_ids", "padding_mask", "sentence_map", "speaker_ids", "genre")
_OUTPUT_KEYS = ("span_starts", "span_ends", "span_mask", "antecedents", "antecedent_scores")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """`config.data` of coreference (see the module docstring)."""

    dir: str = ""
    train_file: str = "train.english.4096.jsonlines"
    validation_file: str = "dev.english.4096.jsonlines"
    test_file: str = ""
    max_mentions: int = 512
    genres: tuple[str, ...] = data_coref.ONTONOTES_GENRES
    truncate: bool = False
    tokenizer: str = ""

    def __post_init__(self):
        sections.positive_int("data.max_mentions", self.max_mentions)
        sections.require(len(self.genres) > 0 and len(set(self.genres)) == len(self.genres), "data.genres",
                         self.genres, "distinct genre prefixes, at least one")


@dataclasses.dataclass
class CorefData:
    """Per split: the documents and their features."""

    documents: dict[str, list]
    built: dict[str, data_coref.Features]
    fingerprint: str

    def features(self, split: str) -> dict[str, np.ndarray]:
        if split not in self.built:
            raise FileNotFoundError(f"coref: no {split!r} split was given (data.{split}_file)")
        return self.built[split].arrays()


class CorefEvaluator:
    """CoNLL F1 (and its three metrics) of a split; keeps the last call's clusters for `write_predictions`."""

    def __init__(self, task, model, plan, data: CorefData, mesh):
        self._data = data
        self._last = None

        def outputs(params, batch):
            out = task.forward(model, params, batch, dropout_key=None)
            return {key: out[key] for key in _OUTPUT_KEYS}

        self._run = encoder_base.BatchedOutputs(outputs, mesh, plan.eval.batch_size)

    def __call__(self, params, split: str, *, trained_steps: int, limit: int | None = None) -> dict:
        table = encoder_base.limited(self._data.features(split), limit)
        n = examples.table_length(table)
        if n == 0:
            raise ValueError(f"the coref {split} split holds no document")
        out = self._run(params, table, _INPUT_KEYS)
        scorer = coref_eval.CorefScorer()
        predictions = {}
        gold = self._data.built[split].clusters
        for i, document in enumerate(self._data.documents[split][:n]):
            clusters = data_coref.predicted_clusters(*(out[key][i] for key in _OUTPUT_KEYS))
            scorer.update(gold[i], clusters)
            predictions[document.doc_key] = [[list(span) for span in cluster] for cluster in clusters]
        self._last = predictions
        result = scorer.result()
        result["predicted_mentions"] = sum(len(c) for clusters in predictions.values() for c in clusters)
        return result

    def write_predictions(self, stem: Path) -> Path:
        """`<stem>.json`: `{doc_key: clusters of [start, end] subtoken spans}` of the last call."""
        return encoder_base.write_json_predictions(stem, self._last)


class CorefTask(encoder_base.EncoderTask):
    """Coreference resolution; see the module docstring."""

    head = None  # read the checkpoint's encoder alone; the coreference head always starts fresh
    uses_global_attention = False
    data_section = DataSection
    splits = SPLITS
    curve_metric = "conll_f1"

    def model_config(self, section) -> model_coref.CorefModelConfig:
        fields = dict(sections.plain(section))
        head = sections.parse_section(model_coref.CorefHeadConfig, fields.pop("coref", {}), "model.coref")
        encoder = models.transformer_config(fields)
        return model_coref.CorefModelConfig(**{f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)},
                                            coref=head)

    def check(self, plan) -> None:
        super().check(plan)
        if plan.model.coref.num_genres < len(plan.data.genres):
            raise sections.ConfigError(f"model.coref.num_genres ({plan.model.coref.num_genres}) is below the "
                                       f"{len(plan.data.genres)} data.genres")

    def build_model(self, model_config) -> model_coref.CorefModel:
        return model_coref.CorefModel(model_config)

    def init_params(self, model, key):
        # At least as many tokens as a configured global-token bound, which the ops check against the length.
        length = max([8] + [getattr(a, "max_global_tokens", None) or 0 for a in model.config.attention])
        tokens = jnp.full((1, length), 5, jnp.int32)
        return model.init(key, tokens, padding_mask=jnp.ones((1, length), bool),
                          sentence_map=jnp.zeros((1, length), jnp.int32),
                          speaker_ids=jnp.ones((1, length), jnp.int32), genre=jnp.zeros((1,), jnp.int32))

    def forward(self, model, params, batch, *, dropout_key, step=None):
        deterministic = dropout_key is None
        return model.apply(
            params, batch["input_ids"], padding_mask=batch["padding_mask"], sentence_map=batch["sentence_map"],
            speaker_ids=batch["speaker_ids"], genre=batch["genre"], deterministic=deterministic,
            rngs=None if deterministic else {"dropout": dropout_key},
        )

    def load_data(self, plan) -> CorefData:
        tokenizer = encoder_base.load_tokenizer(plan)
        root = encoder_base.data_directory(plan.data.dir, "ontonotes")
        documents, built = {}, {}
        for split in SPLITS:
            name = getattr(plan.data, f"{split}_file")
            if not name:
                continue
            documents[split] = data_coref.read_jsonlines(root / name)
            built[split] = data_coref.build_features(
                documents[split], tokenizer, seq_len=plan.phases[0].seq_len, max_mentions=plan.data.max_mentions,
                max_span_width=plan.model.coref.max_span_width, genres=plan.data.genres, truncate=plan.data.truncate,
            )
            log.info("coref %s: %d documents", split, len(documents[split]))
        for split in ("train", "validation"):
            if split not in documents:
                raise FileNotFoundError(f"coref: data.{split}_file is needed")
        data = CorefData(documents, built, "")
        data.fingerprint = "-".join(examples.fingerprint(data.features(s)) for s in sorted(built))
        return data

    def loss(self, model, params, batch, *, step, dropout_key):
        out = self.forward(model, params, batch, dropout_key=dropout_key)
        gold = model_coref.gold_antecedents(out, batch["gold_starts"], batch["gold_ends"], batch["gold_clusters"])
        per_document = model_coref.marginal_log_likelihood(out, gold)
        # How many kept spans are gold mentions: pruning recall, the first thing to watch in training.
        found = _is_gold_mention(out, batch) & out["span_mask"]
        mentions = (batch["gold_clusters"] > 0).sum().astype(jnp.float32)
        return per_document.mean(), {"mention_recall": found.sum() / jnp.maximum(mentions, 1.0)}

    def evaluator(self, plan, data, phase, mesh) -> CorefEvaluator:
        return CorefEvaluator(self, self.build_model(phase.model), plan, data, mesh)

    def summary(self, split: str, metrics) -> str:
        return encoder_base.summary_line(split, metrics, ("conll_f1", "muc_f1", "b_cubed_f1", "ceaf_phi4_f1",
                                                          "documents"))


def _is_gold_mention(out, batch):
    """bool `[batch, K]`: the kept span is a gold mention."""
    return ((out["span_starts"][:, :, None] == batch["gold_starts"][:, None, :])
            & (out["span_ends"][:, :, None] == batch["gold_ends"][:, None, :])
            & (batch["gold_clusters"][:, None, :] > 0)).any(-1)


TASK = CorefTask()
