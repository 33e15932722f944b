"""Bits per character of a trained CharLM with the Transformer-XL protocol (see `longjax.bpc`)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from longjax import bpc, experiment, models, train_steps


class Evaluator:
    """Scores a split of the corpus with the model of one phase at the eval length.

    The jitted log-probability function is built once per phase and reused by
    every evaluation of that phase. Windows are replicated over the mesh: every
    process scores the same windows, so multi-host runs agree on the result.
    """

    def __init__(self, config, phase: experiment.Phase, mesh):
        self.config = config
        model = models.CharLM(experiment.eval_model(config, phase))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._log_probs = jax.jit(train_steps.make_log_prob_fn(model), out_shardings=self._replicated)

    def bpc(self, params, data: np.ndarray, *, step: int, max_chars: int | None = None) -> dict[str, float]:
        """`{'bpc', 'loss', 'chars'}` of `data[:max_chars]` (token ids `[chars]`)."""
        data = data if max_chars is None else data[:max_chars]
        ev = self.config.eval
        step_array = jax.device_put(np.int32(step), self._replicated)

        def log_prob_fn(tokens):
            tokens = jax.make_array_from_process_local_data(self._replicated, tokens)
            return self._log_probs(params, tokens, step_array)

        result = bpc.evaluate_bpc(
            log_prob_fn, data, eval_len=ev.seq_len, step=min(ev.step, ev.seq_len), batch_size=ev.batch_size
        )
        return {"bpc": result.bpc, "loss": result.bpc * math.log(2.0), "chars": int(result.num_scored)}
