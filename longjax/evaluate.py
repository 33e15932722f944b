"""`python -m longjax.evaluate --workdir=DIR [--split=test]`: BPC of a run's newest checkpoint.

Rebuilds the model from the config saved in the checkpoint, restores its
parameters and scores the whole split with the Transformer-XL protocol
(`config.eval.seq_len` windows advancing `config.eval.step`), using the
windows of the phase the checkpoint was saved in. Writes
`<workdir>/eval_<split>_<step>.json` and prints the result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longjax import checkpointing, cli, evaluation, experiment, models, train_steps
from longjax.data import corpora

_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's directory")
_SPLIT = flags.DEFINE_enum("split", "validation", list(corpora.SPLITS), "which split to score")
_MAX_CHARS = flags.DEFINE_integer("max_chars", None, "score only the first N characters of the split")
flags.mark_flags_as_required(["workdir"])


def evaluate_checkpoint(workdir, split: str = "validation", max_chars: int | None = None) -> dict:
    """`{'step', 'phase', 'split', 'bpc', 'loss', 'chars'}` of the newest checkpoint in `workdir`."""
    checkpointer = checkpointing.Checkpointer(workdir, keep=1_000_000, async_save=False)
    try:
        steps = checkpointer.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
        meta = checkpointer.restore_meta(steps[-1])
        config = ml_collections.ConfigDict(json.loads(meta["config"]))
        experiment.validate(config)
        phase = experiment.plan(config)[meta["phase"]]
        mesh = Mesh(np.array(jax.devices()), ("data",))
        replicated = NamedSharding(mesh, PartitionSpec())
        tx = train_steps.optimizer(config.optimizer)
        abstract_state = jax.eval_shape(
            lambda: train_steps.init_state(models.CharLM(phase.model), tx, config.seed)
        )
        state = checkpointer.restore_state(steps[-1], checkpointing.abstract(abstract_state, replicated))
    finally:
        checkpointer.close()
    corpus = corpora.load_corpus(config.data.name, config.data.dir or None, download=config.data.download)
    if corpus.fingerprint != meta["corpus"]:
        raise corpora.CorpusError(
            f"the checkpoint was trained on a corpus with fingerprint {meta['corpus']}, "
            f"{config.data.name} here has {corpus.fingerprint}"
        )
    evaluator = evaluation.Evaluator(config, phase, mesh)
    result = evaluator.bpc(state.params, corpus.split(split), trained_steps=steps[-1], max_chars=max_chars)
    return {"step": steps[-1], "phase": phase.index + 1, "split": split, **result}


def main(argv):
    cli.start(argv)
    try:
        result = evaluate_checkpoint(_WORKDIR.value, _SPLIT.value, _MAX_CHARS.value)
    except (FileNotFoundError, corpora.CorpusError, experiment.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if jax.process_index() == 0:
        out = Path(_WORKDIR.value) / f"eval_{result['split']}_{result['step']}.json"
        out.write_text(json.dumps(result, indent=1))
    print(
        f"step {result['step']} (phase {result['phase']}) | {result['split']} | bpc {result['bpc']:.4f} | "
        f"{int(result['chars']):,} characters",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)
