"""Bits per character of a trained CharLM with the Transformer-XL protocol (see `longjax.bpc`)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from longjax import bpc, experiment, models, train_steps


class Evaluator:
    """Scores a split of the corpus with the model of one phase, in windows of the eval length.

    The jitted log-probability function is built once per phase and reused by
    every evaluation of that phase. Every process plans the same windows; a
    batch of them is split over the mesh's devices when `eval.batch_size` is a
    multiple of the device count (else each device scores the whole batch), and
    the scores come back replicated, so every process computes the same BPC.
    """

    def __init__(self, config, phase: experiment.Phase, mesh):
        self.config = config
        # The phase's own model: windows as trained (scaled and clipped to the
        # training length). Widening them to the evaluation length would score
        # attention spans the model never saw.
        self.model_config = phase.model
        model = models.CharLM(phase.model)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        split = config.eval.batch_size % mesh.devices.size == 0
        self._windows = NamedSharding(mesh, PartitionSpec("data")) if split else self._replicated
        self._log_probs = jax.jit(train_steps.make_log_prob_fn(model), out_shardings=self._replicated)

    def bpc(self, params, data: np.ndarray, *, trained_steps: int, max_chars: int | None = None) -> dict[str, float]:
        """`{'bpc', 'loss', 'chars'}` of `data[:max_chars]` (token ids `[chars]`).

        `trained_steps` is the number of optimizer steps behind `params`; layers
        that redraw their projection (Performer) use that of the last of them,
        the projection the parameters were last trained with.
        """
        data = data if max_chars is None else data[:max_chars]
        ev = self.config.eval
        step_array = jax.device_put(np.int32(max(trained_steps - 1, 0)), self._replicated)

        def log_prob_fn(tokens):
            # Every process holds the whole batch, so each device reads its rows from it.
            tokens = jax.make_array_from_callback(tokens.shape, self._windows, lambda index: tokens[index])
            return self._log_probs(params, tokens, step_array)

        result = bpc.evaluate_bpc(
            log_prob_fn, data, eval_len=ev.seq_len, step=ev.step, batch_size=ev.batch_size
        )
        return {"bpc": result.bpc, "loss": result.bpc * math.log(2.0), "chars": int(result.num_scored)}
