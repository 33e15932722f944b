"""`train_and_evaluate`: the staged character-LM training run behind `python -m longjax.train`.

Initialisation order (one place): resume this workdir's own newest checkpoint;
else start from scratch at step 0 with parameters from `config.seed`.

Phases run in sequence. At a phase change the step function is rebuilt for the
new length and windows; parameters and optimizer state carry over; the
learning rate restarts with the new phase's warmup; a new data iterator starts
with the phase's own seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longjax import (
    checkpointing,
    evaluation,
    experiment,
    metrics_log,
    models,
    train_steps,
)
from longjax.data import corpora, pipeline


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the last good checkpoint is left as it was."""


class ConfigChangedError(ValueError):
    """The workdir's checkpoint was written with another config."""


@dataclasses.dataclass
class RunResult:
    """How `train_and_evaluate` ended: `'finished'` or `'preempted'` (SIGTERM), the step, final metrics."""

    status: str
    step: int
    final_metrics: dict | None = None


class _Preemption:
    """Turns SIGTERM into a flag the loop polls after each step (then it checkpoints and exits 0)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if sys.platform != "win32" and _in_main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def data_seed(seed: int, phase: int) -> int:
    """The window seed of a phase: phases do not replay each other's windows."""
    return int(np.random.SeedSequence([seed, 7919, phase]).generate_state(1)[0])


def _load_corpus(config) -> corpora.Corpus:
    return corpora.load_corpus(config.data.name, config.data.dir or None, download=config.data.download)


def train_and_evaluate(config, workdir) -> RunResult:
    """Trains the CharLM of `config` through all its phases, checkpointing and evaluating.

    Args:
      config: an experiment config (see `longjax.experiment`); validated first.
      workdir: checkpoints, metrics.jsonl, TensorBoard events, config.json and curves.png go here.

    Returns:
      A `RunResult`.

    Raises:
      experiment.ConfigError: the config contradicts itself.
      corpora.CorpusNotFoundError: the data is missing (the message says what to put where).
      ConfigChangedError: the workdir holds a run with another config.
      checkpointing.CheckpointError: the workdir holds checkpoints but none restores.
      NonFiniteLossError: the loss became NaN or Inf.
    """
    experiment.validate(config)
    if config.distributed:
        jax.distributed.initialize()
    phases = experiment.plan(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = _load_corpus(config)

    devices = np.array(jax.devices())
    for phase in phases:
        if phase.batch_size % devices.size:
            raise experiment.ConfigError(
                f"phases.batch_size[{phase.index}] ({phase.batch_size}) must be a multiple of the "
                f"{devices.size} devices"
            )
    mesh = Mesh(devices, ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    tx = train_steps.optimizer(config.optimizer)
    first_model = models.CharLM(phases[0].model)
    abstract_state = jax.eval_shape(lambda: train_steps.init_state(first_model, tx, config.seed))
    checkpointer = checkpointing.Checkpointer(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )

    def check_meta(meta):
        differences = checkpointing.config_differences(meta["config"], config)
        if differences and not config.allow_config_change:
            raise ConfigChangedError(
                f"{workdir} holds a run with another config; differing fields (saved -> now): "
                + "; ".join(differences)
                + ". Use another --workdir, or pass --config.allow_config_change=True to resume anyway."
            )
        if meta["corpus"] != corpus.fingerprint and not config.allow_config_change:
            raise ConfigChangedError(
                f"{workdir} was trained on a corpus with fingerprint {meta['corpus']}, "
                f"this one has {corpus.fingerprint}"
            )

    try:
        restored = checkpointer.restore_latest(checkpointing.abstract(abstract_state, replicated), check_meta)
    except BaseException:
        checkpointer.close()
        raise
    if restored is not None:
        state, start_step = restored.state, restored.step
    else:
        state = jax.jit(lambda: train_steps.init_state(first_model, tx, config.seed), out_shardings=replicated)()
        start_step = 0
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(checkpointing.config_json(config))

    total_steps = phases[-1].end_step
    log = metrics_log.MetricsLog(
        workdir,
        total_steps=total_steps,
        phase_starts=[p.start_step for p in phases],
        resume_step=start_step,
        is_primary=jax.process_index() == 0,
    )
    if restored is not None:
        log.message(f"resumed from the checkpoint at step {start_step} in {checkpointer.directory}")
    try:
        with _Preemption() as preemption:
            result = _run_phases(
                config, phases, state, start_step, restored, corpus, mesh, batch_sharding,
                tx, checkpointer, log, preemption,
            )
        if result.status == "finished" and jax.process_index() == 0:
            metrics_log.plot_curves(workdir, phase_starts=[p.start_step for p in phases])
        return result
    finally:
        checkpointer.close()
        log.close()


def _run_phases(config, phases, state, start_step, restored, corpus, mesh, batch_sharding,
                tx, checkpointer, log, preemption) -> RunResult:
    replicated = NamedSharding(mesh, PartitionSpec())
    step = start_step
    final = None
    for phase in phases:
        if phase.end_step <= step:
            continue
        model = models.CharLM(phase.model)
        train_step = jax.jit(
            train_steps.make_train_step(
                model, tx, peak_learning_rate=phase.learning_rate, start_step=phase.start_step,
                warmup_steps=phase.warmup_steps, seed=config.seed,
            ),
            in_shardings=(replicated, batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
        batches = pipeline.make_train_iterator(
            corpus.train, seq_len=phase.seq_len, global_batch_size=phase.batch_size,
            seed=data_seed(config.seed, phase.index),
        )
        resuming_this_phase = (
            restored is not None and restored.meta["phase"] == phase.index and step > phase.start_step
        )
        if resuming_this_phase:
            batches.set_state(restored.data_state)
        evaluator = evaluation.Evaluator(config, phase, mesh)
        log.message(
            f"phase {phase.index + 1}/{len(phases)}: steps {phase.start_step}-{phase.end_step}, "
            f"seq_len {phase.seq_len}, batch {phase.batch_size}, lr {phase.learning_rate:g} "
            f"(warmup {phase.warmup_steps}), windows {_windows(phase.model)}"
        )

        def save(at_step):
            meta = {
                "step": at_step, "phase": phase.index, "config": checkpointing.config_json(config),
                "corpus": corpus.fingerprint,
                # The losses since the last log line, so a resumed run logs the same means.
                "interval_losses": list(interval_losses),
            }
            checkpointer.save(at_step, state, batches.get_state(), meta)

        interval_losses, interval_start = [], time.perf_counter()
        if resuming_this_phase:
            interval_losses = list(restored.meta["interval_losses"])
        interval_tokens = 0
        while step < phase.end_step:
            tokens = jax.make_array_from_process_local_data(batch_sharding, next(batches)["tokens"])
            state, metrics = train_step(state, tokens)
            loss = float(metrics["loss"])
            step += 1
            if not math.isfinite(loss):
                checkpointer.wait()
                last = checkpointer.steps()
                message = (
                    f"stopping: the training loss is {loss} at step {step} (phase {phase.index + 1}); "
                    f"nothing was saved after it. Last good checkpoint: "
                    f"{'step ' + str(last[-1]) if last else 'none'} in {checkpointer.directory}."
                )
                log.message(message)
                raise NonFiniteLossError(message)
            interval_losses.append(loss)
            interval_tokens += phase.batch_size * phase.seq_len
            if step % config.log_every_steps == 0 or step == phase.end_step:
                elapsed = time.perf_counter() - interval_start
                mean_loss = float(np.mean(interval_losses))
                log.train(step, phase.index + 1, {
                    "loss": mean_loss,
                    "bpc": mean_loss / math.log(2.0),
                    "learning_rate": float(metrics["learning_rate"]),
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_second": interval_tokens / max(elapsed, 1e-9),
                })
                interval_losses, interval_tokens = [], 0
                interval_start = time.perf_counter()
            every_eval = config.eval.every_steps
            if every_eval is not None and step % every_eval == 0 and step != phase.end_step:
                log.eval(step, phase.index + 1, "validation", evaluator.bpc(
                    state.params, corpus.validation, trained_steps=step, max_chars=config.eval.max_chars
                ))
            if step % config.checkpoint.every_steps == 0 or step == phase.end_step or preemption.requested:
                save(step)
            if preemption.requested:
                checkpointer.wait()
                log.message(f"SIGTERM: saved the checkpoint at step {step}; exiting")
                return RunResult("preempted", step)
        batches.close()
        final = evaluator.bpc(
            state.params, corpus.validation, trained_steps=step, max_chars=config.eval.max_chars
        )
        log.eval(step, phase.index + 1, "validation", final)
    checkpointer.wait()
    if final is None:
        log.message(f"nothing to do: the run in this workdir finished at step {step}")
    else:
        log.message(f"final validation BPC {final['bpc']:.4f} over {int(final['chars']):,} characters")
    return RunResult("finished", step, final)


def _windows(model_config: models.TransformerConfig) -> str:
    windows = [getattr(a, "window", None) for a in model_config.attention]
    if all(w is None for w in windows):
        return type(model_config.attention[0]).__name__
    return json.dumps(windows)
