"""Train-step time, throughput and planned memory of the 12-layer char LM; the longest sequence it trains
within a memory budget; Hugging Face's PyTorch Longformer of the same shape timed beside it.

    python experiments/bench_model.py                 # the full benchmark (over an hour on 2 CPU cores)
    python experiments/bench_model.py --repeats 1 --peer-repeats 2    # one timed step per matrix row
    python experiments/bench_model.py --quick         # a 2-layer, 64-wide model at 256 tokens: checks the script

The model is the Longformer paper's small char LM (`configs/enwik8_small.py`) with one attention
configuration in every layer: 12 layers, d_model 512, 8 heads (head_dim 64), d_ff 2048, pre-LayerNorm,
exact GeLU, vocab 256, float32, batch 1, dropout 0, no remat. The layers' attention:

* sliding_window w=256: causal, each query attends itself and the 256 keys to its left;
* block_sparse b=64: BigBird's blocks of 64 (3 window, 2 global, 3 random blocks), causal;
* performer m=256: causal FAVOR+ with 256 orthogonal random features;

and the position schemes: 'txl_relative (native)' (Transformer-XL relative positions computed by the
attention op itself, `TransformerConfig(relative_positions='native')`), 'txl_relative (features)' (the
same scores as d_model extra query/key features per head, `relative_positions='features'`), 'rope' and
'none'. Block-sparse and Performer layers are timed with 'none' and both txl schemes; a scheme the
attention op cannot serve (FAVOR+ computes no native position term) gets a row saying so. On a GPU
every row runs with impl='xla' and again with impl='pallas'; on a CPU with impl='xla' only (Pallas runs
there in interpret mode, which times nothing).

What is timed. The train step is `jax.jit(jax.value_and_grad(loss))(params, tokens)`: the forward and
backward pass of the char LM's training loss (mean next-token cross entropy of `seq` positions, as
`longjax.tasks.char_lm` computes it). The optimizer update is NOT included (in either framework): it is
the same element-wise AdamW over 38M parameters everywhere, a few percent of a step. Each row reports the
median wall time over --repeats steps, after the program is compiled and run once to warm up; tokens/s is
seq / that median. The position schemes of one attention type and length are timed taking turns (each
round times one step of each), so the machine's noise falls on all of them alike and their ratios hold.
Memory: XLA's plan for the compiled program, `memory_analysis()`'s arguments + outputs + temporaries
(as bench_attention.py reports it); on a CPU XLA allocates buffers as it plans them, so the plan is the
step's peak (see speed_memory_figures.py); on a GPU it is the plan, not a measured peak.

The longest sequence (--max-seq-search, on by default; --no-max-seq leaves it out): for sliding-window
layers and each position scheme, the longest multiple of 1024 tokens (of 256 with --quick) at which
the model with `remat=True` plans at most --memory-budget-gb (default 24) for its train step, batch 1.
Found from compiled plans alone, nothing is run: lengths double from 16,384 (halve, if that does not
fit) until the budget is crossed, then the bracket narrows to one step by linear interpolation of the
plans (a bisection step whenever a round does not halve it). The table also gives the plan at that
length without remat: on XLA:CPU remat saves nothing in the plan (its scheduler does not hold the
recomputation back until the backward pass needs it), so there the search measures the plain model.

The comparison (--no-peer leaves it out). Hugging Face's `transformers.LongformerForMaskedLM` (LongformerModel
plus RoBERTa's tied masked-LM head), PyTorch, float32, the same shape: 12 layers, hidden 512, 8 heads,
intermediate 2048, vocab 256, learned absolute positions (max_position_embeddings = seq + 2, RoBERTa's
offset), `model.train()` with every dropout 0, torch.set_num_threads(this process's CPUs); its step is
`model(input_ids, labels=input_ids).loss.backward()` (mean cross entropy at every position). HF's
`attention_window` is the WHOLE window w, w/2 keys each side: attention_window=512 means 256 keys to
the left and 256 to the right of each query (plus itself), i.e. longjax's bidirectional window=256.
So the comparison has, at each --peer-seqs length, three rows timed taking turns (each round times one
step of each, so the machine's noise falls on all three alike):

* 'CharLM (causal)', sliding_window w=256, position 'none': the model of the target (longjax's 12-layer
  model without relative positions at 4,096 tokens, window 256, >= 3x HF's train-step throughput).
  It attends 257 keys per query, HF 513: not like for like in the attention;
* 'LongEncoder + MLM head (bidirectional)': like for like. `EncoderWithHead(head='masked_lm')`, RoBERTa's
  structure as HF has it (post-LayerNorm, learned absolute positions with offset 1, one token type,
  embedding LayerNorm, the tied masked-LM head), sliding_window w=256 each side (513 keys, as HF), the
  same loss;
* 'HF LongformerForMaskedLM (PyTorch)'. Its memory is the growth of this process's resident memory
  while its step runs (sampled every 10 ms), not an XLA plan: the columns are not comparable.

After the ratios it prints what the target asks of this machine: the step time 3x HF's allows at 4,096
tokens, against the time the char LM's matrix products alone (`char_lm_product_flops`, a lower bound on
its FLOPs) take at this machine's float32 rate on one 4096^3 matmul, measured in the same run.

The peer needs torch and transformers (`pip install -e '.[peer]'`); without them its rows say skipped
and how to install them. It runs on the CPU only: on a GPU or TPU backend its row is skipped.

Writes bench_model.csv, bench_model_max_seq.csv and bench_model.png (tokens/s and memory against seq,
one line per configuration) under --out and prints the tables and the longjax / HF ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from longjax import models
from longjax.models import BlockSparseAttention, PerformerAttention, SlidingWindowAttention, TransformerConfig

import bench_common
from bench_common import Column, Panel

INSTALL_PEER = ".venv/bin/pip install -e '.[peer]'  (torch==2.13.0, transformers>=4.46,<6)"


@dataclasses.dataclass(frozen=True)
class Shape:
    """The model's size and the attention patterns' sizes."""

    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    window: int  # sliding window: keys to the left (causal), each side (bidirectional)
    block_size: int  # BigBird block
    num_features: int  # Performer random features
    vocab_size: int = 256


PAPER = Shape(num_layers=12, d_model=512, num_heads=8, d_ff=2048, window=256, block_size=64, num_features=256)
TINY = Shape(num_layers=2, d_model=64, num_heads=4, d_ff=256, window=32, block_size=16, num_features=32)

TARGET_RATIO, TARGET_SEQ = 3.0, 4096


@dataclasses.dataclass(frozen=True)
class Position:
    """A position scheme: the label of its rows and the TransformerConfig fields it sets."""

    label: str
    position: str
    relative_positions: str | None = None  # passed to TransformerConfig only when set


TXL_NATIVE = Position("txl_relative (native)", "txl_relative", "native")
TXL_FEATURES = Position("txl_relative (features)", "txl_relative", "features")
ROPE, NONE = Position("rope", "rope"), Position("none", "none")
LEARNED = Position("learned absolute", "learned")

# Each attention type: its row label and its layer config.
ATTENTIONS: Mapping[str, Callable[[Shape, str], tuple[str, object]]] = {
    "sliding_window": lambda s, impl: (f"sliding_window w={s.window}",
                                       SlidingWindowAttention(window=s.window, impl=impl)),
    "block_sparse": lambda s, impl: (f"block_sparse b={s.block_size} 3w+2g+3r",
                                     BlockSparseAttention(block_size=s.block_size, impl=impl)),
    "performer": lambda s, impl: (f"performer m={s.num_features}",
                                  PerformerAttention(num_features=s.num_features, impl=impl)),
}
# The model matrix: the position schemes timed with each attention type.
MATRIX = (
    ("sliding_window", (TXL_NATIVE, TXL_FEATURES, ROPE, NONE)),
    ("block_sparse", (NONE, TXL_NATIVE, TXL_FEATURES)),
    ("performer", (NONE, TXL_NATIVE, TXL_FEATURES)),
)


@dataclasses.dataclass(frozen=True)
class Preset:
    """What a flag left out means, per mode."""

    shape: Shape
    seqs: str
    peer_seqs: str
    repeats: int
    budget_gb: float
    matrix: tuple = MATRIX
    search_positions: tuple = (NONE, TXL_NATIVE, TXL_FEATURES, ROPE)
    search_start: int = 16384
    search_step: int = 1024
    search_limit: int = 2**21


PRESETS = {
    "full": Preset(PAPER, seqs="2048,8192", peer_seqs="2048,4096", repeats=3, budget_gb=24.0),
    # Every kind of row once (each attention type, both txl paths, pairs the ops do not serve, the
    # comparison, the search) at 256 tokens, in well under a minute on 2 cores; its timings mean nothing.
    "quick": Preset(TINY, seqs="256", peer_seqs="256", repeats=1, budget_gb=0.01,
                    matrix=(("sliding_window", (TXL_NATIVE, TXL_FEATURES, NONE)), ("block_sparse", (NONE, TXL_NATIVE)),
                            ("performer", (TXL_NATIVE,))),
                    search_positions=(NONE,), search_start=256, search_step=256, search_limit=2**14),
}
CHAR_LM, ENCODER, HF = "CharLM (causal)", "LongEncoder + MLM head (bidirectional)", "HF LongformerForMaskedLM (PyTorch)"


def model_config(shape: Shape, attention, position: Position, **fields) -> TransformerConfig:
    """The char LM's config (pre-LN, exact GeLU, float32, dropout 0) with `attention` in every layer."""
    if position.relative_positions is not None:
        fields["relative_positions"] = position.relative_positions
    return TransformerConfig(
        vocab_size=shape.vocab_size, num_layers=shape.num_layers, num_heads=shape.num_heads,
        d_model=shape.d_model, d_ff=shape.d_ff, attention=(attention,) * shape.num_layers,
        position=position.position, layer_norm="pre", activation="gelu", **fields,
    )


@dataclasses.dataclass(frozen=True)
class Program:
    """A longjax train step, `step(params, tokens) -> (loss, grads)` (un-jitted), and how to make its inputs."""

    kind: str
    config: TransformerConfig
    seq: int
    step: Callable
    init: Callable  # key -> params
    tokens_length: int  # the tokens are int32 [1, tokens_length]


def char_lm_program(config: TransformerConfig, seq: int) -> Program:
    """The char LM's loss (`longjax.tasks.char_lm`): mean cross entropy of tokens[1:] given tokens[:-1]."""
    model = models.CharLM(config)

    def loss(params, tokens):
        logits = model.apply(params, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    init = lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))
    return Program("char_lm", config, seq, jax.value_and_grad(loss), init, seq + 1)


def encoder_program(config: TransformerConfig, seq: int) -> Program:
    """HF's LongformerForMaskedLM loss with labels = input_ids: mean cross entropy at every position."""
    model = models.EncoderWithHead(config, head="masked_lm")

    def loss(params, tokens):
        logits = model.apply(params, tokens)["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    init = lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))
    return Program("encoder", config, seq, jax.value_and_grad(loss), init, seq)


def encoder_config(shape: Shape, seq: int, impl: str) -> TransformerConfig:
    """RoBERTa's structure as HF's Longformer has it, bidirectional window `shape.window` each side."""
    return TransformerConfig(
        vocab_size=shape.vocab_size, num_layers=shape.num_layers, num_heads=shape.num_heads,
        d_model=shape.d_model, d_ff=shape.d_ff,
        attention=(SlidingWindowAttention(window=shape.window, impl=impl),) * shape.num_layers,
        position="learned", max_positions=seq + 2, position_offset=1, type_vocab_size=1,
        layer_norm="post", activation="gelu",
    )


def _tokens(length: int, vocab_size: int, seed: int) -> jax.Array:
    # From 2 up: HF's pad id is 1 and would turn a token into padding positions.
    return jnp.asarray(np.random.default_rng(seed).integers(2, vocab_size, (1, length)), jnp.int32)


def planned_bytes(compiled) -> int:
    """XLA's plan for a compiled program: arguments + outputs + temporaries."""
    mem = compiled.memory_analysis()
    return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes


def _message(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text[:240] + " ..." if len(text) > 240 else text


class TooBig(Exception):
    """A compiled step plans more memory than this machine has free: it is not run."""

    def __init__(self, planned: float, free: float):
        super().__init__(f"skipped: plans {planned / 1e9:.2f} GB, more than the {free / 1e9:.2f} GB free here")
        self.planned = planned


def _not_run(e: BaseException) -> dict:
    """The status (and, for TooBig, the plan) of a row whose step could not be made ready."""
    if isinstance(e, TooBig):
        return dict(status=str(e), peak_bytes=e.planned, memory_source="xla plan")
    kind = "unsupported: " if isinstance(e, (NotImplementedError, ValueError)) else "failed: "
    return dict(status=kind + _message(e))


def free_bytes() -> float:
    """Memory a step may use: the device's limit, or on a CPU what the OS has available (Linux; else inf)."""
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    _trim_heap()
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024 * 0.9  # a margin for what else runs
    except (OSError, KeyError):
        return math.inf


def _row(group, model, attention, position, impl, seq, status, *, seconds=math.nan, peak_bytes=math.nan,
         memory_source="", compile_seconds=math.nan) -> dict:
    return dict(group=group, model=model, attention=attention, position=position, impl=impl, seq=seq,
                seconds=seconds, tokens_per_s=seq / seconds, peak_gb=peak_bytes / 1e9, memory_source=memory_source,
                compile_seconds=compile_seconds, status=status)


@dataclasses.dataclass(frozen=True)
class Ready:
    """A train step ready to time: `run()` takes one step and waits for it."""

    run: Callable[[], object]
    peak_bytes: Callable[[], float]  # read after the timed steps
    memory_source: str
    setup_seconds: float  # building (and compiling) it


class Programs:
    """Compiles longjax steps, each program once; parameters are initialised once per parameter tree."""

    def __init__(self):
        self._params, self._ready = {}, {}

    def ready(self, program: Program) -> Ready:
        key = (program.kind, program.config, program.seq)
        if key not in self._ready:
            start = time.perf_counter()
            abstract = jax.eval_shape(program.init, jax.random.key(0))
            tree = (jax.tree.structure(abstract), tuple((x.shape, x.dtype.name) for x in jax.tree.leaves(abstract)))
            if tree not in self._params:
                self._params[tree] = jax.jit(program.init)(jax.random.key(0))
            params = self._params[tree]
            tokens = _tokens(program.tokens_length, program.config.vocab_size, seed=program.seq)
            compiled = jax.jit(program.step).lower(params, tokens).compile()
            planned = planned_bytes(compiled)
            if planned > (free := free_bytes()):
                raise TooBig(planned, free)
            self._ready[key] = Ready(lambda: jax.block_until_ready(compiled(params, tokens)), lambda: planned,
                                     "xla plan", time.perf_counter() - start)
        return self._ready[key]


def interleaved_medians(calls: Mapping[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict:
    """Each call's median wall time over `repeats` rounds, after one warm-up call each (unless not `warmup`).

    In every round each call runs once, in turn, so a noisy machine slows them alike.
    """
    if warmup:
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _print_row(row: dict) -> None:
    what = f"{row['model'][:24]:24s} {row['attention'][:30]:30s} {row['position']:24s} {row['impl']:6s} {row['seq']:6d}"
    if row["status"] == "ok":
        print(f"{what}: {row['seconds']:8.3f} s/step {row['tokens_per_s']:9.1f} tokens/s "
              f"{row['peak_gb']:7.3f} GB ({row['memory_source']})", flush=True)
    else:
        print(f"{what}: {row['status']}", flush=True)


# ----------------------------------------------------------------------------------------------- the matrix


def matrix_rows(preset: Preset, seqs, impls, repeats: int, programs: Programs, only: str = "",
                warmup: bool = True) -> list[dict]:
    """The char LM's train step for every attention type x position scheme of the preset x impl x seq.

    The position schemes of one attention type, impl and length are timed taking turns
    (`interleaved_medians`), so their ratios see the same machine.
    """
    shape, rows = preset.shape, []
    for kind, positions in preset.matrix:
        for impl in impls:
            label, attention = ATTENTIONS[kind](shape, impl)
            picked = lambda p: not only or any(o in f"{label} {p.label} {impl}" for o in only.split(","))
            chosen = [p for p in positions if picked(p)]
            for seq in seqs:
                if chosen:
                    rows += _matrix_group(label, attention, chosen, impl, seq, repeats, programs, warmup, shape)
    return rows


def _matrix_group(label, attention, positions, impl, seq, repeats, programs, warmup, shape) -> list[dict]:
    row = lambda position, status, **measured: _row(
        "model", CHAR_LM, label, position.label, impl, seq, status, **measured
    )
    done, ready = {}, {}
    for position in positions:
        try:
            ready[position] = programs.ready(char_lm_program(model_config(shape, attention, position), seq))
        except Exception as e:  # noqa: BLE001 - the row says what the op cannot serve; the others go on
            done[position] = row(position, **_not_run(e))
    try:
        medians = interleaved_medians({p: r.run for p, r in ready.items()}, repeats, warmup)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at run time: the group's rows say so
        medians = {}
        for p, r in ready.items():
            done[p] = row(p, "failed: " + _message(e), peak_bytes=r.peak_bytes())
    for p, seconds in medians.items():
        r = ready[p]
        done[p] = row(p, "ok", seconds=seconds, peak_bytes=r.peak_bytes(), memory_source=r.memory_source,
                      compile_seconds=r.setup_seconds)
    rows = [done[p] for p in positions]
    for r in rows:
        _print_row(r)
    return rows


# ------------------------------------------------------------------------------------------------- the peer


class PeakRssGrowth:
    """The largest growth of this process's resident memory over the calls wrapped by `measure`.

    Sampled from /proc/self/statm every 10 ms while a call runs (Linux; NaN elsewhere). Before each call
    glibc is asked to hand freed heap memory back to the OS (`malloc_trim`): otherwise memory freed by an
    earlier model would be reused without growing the RSS, and the growth would read near zero.
    """

    def __init__(self):
        self.peak = math.nan

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def measure(self, call: Callable[[], object]) -> Callable[[], object]:
        if not os.path.exists("/proc/self/statm"):
            return call

        def measured():
            _trim_heap()
            start, high, done = self._rss(), [0], threading.Event()

            def sample():
                while not done.wait(0.01):
                    high[0] = max(high[0], self._rss())

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                return call()
            finally:
                done.set()
                sampler.join()
                high[0] = max(high[0], self._rss())
                self.peak = max(0 if math.isnan(self.peak) else self.peak, high[0] - start)

        return measured


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def hf_step(shape: Shape, seq: int) -> Ready:
    """The train step (forward and backward, no optimizer) of HF's LongformerForMaskedLM of `shape`."""
    start = time.perf_counter()
    import torch
    import transformers

    torch.set_num_threads(_cpus())
    config = transformers.LongformerConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.d_model, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, intermediate_size=shape.d_ff, hidden_act="gelu",
        attention_window=2 * shape.window,  # HF's window is the whole window: w/2 keys each side
        max_position_embeddings=seq + 2, type_vocab_size=1, pad_token_id=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.LongformerForMaskedLM(config).to(torch.float32)
    model.train()
    tokens = torch.as_tensor(np.asarray(_tokens(seq, shape.vocab_size, seed=seq)), dtype=torch.long)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()

    rss = PeakRssGrowth()
    return Ready(rss.measure(step), lambda: rss.peak, "RSS growth (sampled)", time.perf_counter() - start)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def peer_unavailable() -> str | None:
    """Why the HF rows are not timed, or None."""
    if jax.default_backend() != "cpu":
        return f"skipped: the peer runs on the CPU; longjax runs on {jax.default_backend()} here"
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"skipped: {_message(e)}; install with {INSTALL_PEER}"
    return None


@dataclasses.dataclass(frozen=True)
class Contender:
    """One row of the comparison: what it is, and how to get it ready (or why it is not run)."""

    model: str
    attention: str
    position: str
    impl: str
    build: Callable[[], Ready] | str  # a str: why the row is skipped

    def row(self, seq: int, status: str, **measured) -> dict:
        return _row("vs HF", self.model, self.attention, self.position, self.impl, seq, status, **measured)


def contenders(shape: Shape, seq: int, programs: Programs, skip_hf: str | None) -> tuple[Contender, ...]:
    """The target's char LM, the like-for-like encoder and HF's Longformer at `seq`."""
    label, attention = ATTENTIONS["sliding_window"](shape, "xla")
    return (
        Contender(CHAR_LM, label, NONE.label, "xla",
                  lambda: programs.ready(char_lm_program(model_config(shape, attention, NONE), seq))),
        Contender(ENCODER, f"sliding_window w={shape.window} each side", LEARNED.label, "xla",
                  lambda: programs.ready(encoder_program(encoder_config(shape, seq, "xla"), seq))),
        Contender(HF, f"attention_window={2 * shape.window} ({shape.window} each side)", LEARNED.label, "torch",
                  skip_hf or (lambda: hf_step(shape, seq))),
    )


def peer_rows(shape: Shape, seqs, repeats: int, programs: Programs) -> list[dict]:
    """At each length: the target's char LM, the like-for-like encoder and HF's Longformer, timed taking turns."""
    skip_hf = peer_unavailable()
    if skip_hf:
        print(f"peer: {skip_hf}", flush=True)
    rows = []
    for seq in seqs:
        here, ready, cs = {}, {}, contenders(shape, seq, programs, skip_hf)
        for c in cs:
            if isinstance(c.build, str):
                here[c.model] = c.row(seq, c.build)
                continue
            try:
                ready[c.model] = c.build()
            except Exception as e:  # noqa: BLE001 - the row says why; the others are still timed
                here[c.model] = c.row(seq, **_not_run(e))
        medians = interleaved_medians({model: r.run for model, r in ready.items()}, repeats)
        for c in cs:
            if c.model in medians:
                r = ready[c.model]
                here[c.model] = c.row(seq, "ok", seconds=medians[c.model], peak_bytes=r.peak_bytes(),
                                      memory_source=r.memory_source, compile_seconds=r.setup_seconds)
            rows.append(here[c.model])
            _print_row(rows[-1])
    return rows


def ratios(rows) -> list[str]:
    """longjax tokens/s over HF's at each length where both were timed; the target judged at TARGET_SEQ."""
    lines = []
    ok = {(r["model"], r["seq"]): r for r in rows if r["group"] == "vs HF" and r["status"] == "ok"}
    for seq in sorted({r["seq"] for r in rows if r["group"] == "vs HF"}):
        hf = ok.get((HF, seq))
        if hf is None:
            lines.append(f"seq {seq}: no HF time, no ratio")
            continue
        for model, what in ((CHAR_LM, "causal char LM, position 'none' (the target's model)"),
                            (ENCODER, "bidirectional encoder + MLM head (like for like)")):
            mine = ok.get((model, seq))
            if mine is None:
                lines.append(f"seq {seq}: longjax {what}: not timed")
                continue
            ratio = mine["tokens_per_s"] / hf["tokens_per_s"]
            verdict = ""
            if model == CHAR_LM and seq == TARGET_SEQ:
                verdict = f" -> target >= {TARGET_RATIO:g}x {'MET' if ratio >= TARGET_RATIO else 'NOT MET'}"
            lines.append(f"seq {seq}: longjax {what}: {mine['tokens_per_s']:.1f} tokens/s / HF "
                         f"{hf['tokens_per_s']:.1f} tokens/s = {ratio:.2f}x{verdict}")
    return lines


def char_lm_product_flops(shape: Shape, seq: int) -> float:
    """A lower bound on the FLOPs of the target's train step (the causal sliding-window char LM, position
    'none', at `seq`): its matrix products only, none computed twice.

    Every parameter named `kernel` (the attention projections, the MLPs, the output layer) multiplies
    each of the `seq` tokens' vectors: 2 FLOPs a weight forward, 4 backward (the input's and the
    weight's gradients). Each layer's attention: query i attends min(i, window) + 1 keys, at
    4 x head_dim x heads FLOPs a key forward (scores, output), x3 with the backward (the output's and
    the scores' gradients, dq, dk, dv; the band recomputes the scores too, which is left out here).
    """
    _, attention = ATTENTIONS["sliding_window"](shape, "xla")
    program = char_lm_program(model_config(shape, attention, NONE), seq)
    params = jax.eval_shape(program.init, jax.random.key(0))
    weights = sum(
        math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if getattr(path[-1], "key", None) == "kernel"
    )
    keys = np.minimum(np.arange(seq), shape.window).sum() + seq
    attention_flops = shape.num_layers * 3 * 4 * shape.d_model * keys  # d_model = heads x head_dim
    return 6 * seq * weights + attention_flops


def _timed_at_target(rows) -> dict[str, dict]:
    """The comparison's timed rows at TARGET_SEQ, by model."""
    return {r["model"]: r for r in rows if r["group"] == "vs HF" and r["status"] == "ok" and r["seq"] == TARGET_SEQ}


def target_bound(rows, shape: Shape, matmul_rate: float) -> list[str]:
    """What the >= TARGET_RATIO x HF target asks of this machine: the step time it allows against the
    time the char LM's matrix products alone take at `matmul_rate` (FLOP/s of one large matmul)."""
    ok = _timed_at_target(rows)
    if HF not in ok:
        return []
    allowed = ok[HF]["seconds"] / TARGET_RATIO
    flops = char_lm_product_flops(shape, TARGET_SEQ)
    lines = [
        f"seq {TARGET_SEQ}: {TARGET_RATIO:g}x HF allows {allowed:.2f} s a step; the char LM's matrix products "
        f"alone are {flops / 1e9:.0f} GFLOP, {flops / matmul_rate:.2f} s at this run's {matmul_rate / 1e9:.1f} "
        f"GFLOP/s (one 4096^3 matmul): the whole step would have to run at {flops / allowed / matmul_rate:.0%} "
        f"of that rate"
    ]
    if CHAR_LM in ok:
        lines[0] += f" (it runs at {flops / ok[CHAR_LM]['seconds'] / matmul_rate:.0%})"
    return lines


# -------------------------------------------------------------------------------------- the longest sequence


@dataclasses.dataclass(frozen=True)
class Fit:
    """The longest fitting length found and the shortest that did not fit (None where none was seen)."""

    max_seq: int | None
    planned: float
    miss_seq: int | None
    miss_planned: float
    compiles: int
    note: str = ""


def largest_fitting(plan: Callable[[int], float], budget: float, *, start: int, step: int, limit: int) -> Fit:
    """The longest multiple of `step` (up to `limit`) whose `plan(seq)` is at most `budget`.

    Lengths double from `start` (halve, if `start` does not fit) until the budget is crossed; the
    bracket then narrows, to one step, by linear interpolation of the plans, each guess checked
    together with its neighbour on the other side, and by bisection when a round did not halve it.
    Assumes the plan grows with the length.
    """
    plans = {}

    def fits(seq):
        if seq not in plans:
            plans[seq] = plan(seq)
        return plans[seq] <= budget

    def result(lo, hi, note=""):
        return Fit(lo, plans.get(lo, math.nan), hi, plans.get(hi, math.nan), len(plans), note)

    lo = hi = None
    if fits(start):
        lo = start
        while hi is None:
            if lo * 2 > limit:
                return result(lo, None, f"the search's limit ({limit:,}) reached")
            if fits(lo * 2):
                lo *= 2
            else:
                hi = lo * 2
    else:
        hi = start
        while lo is None:
            if hi // 2 < step:
                return result(None, hi, f"even {step:,} tokens plan more than the budget" if hi == step else "")
            if fits(hi // 2):
                lo = hi // 2
            else:
                hi //= 2
    down = lambda seq: seq // step * step
    inside = lambda seq: min(max(seq, lo + step), hi - step)

    def check(seq):
        nonlocal lo, hi
        if fits(seq):
            lo = seq
        else:
            hi = seq

    while hi - lo > step:
        width = hi - lo
        guess = inside(down(int(lo + (budget - plans[lo]) / (plans[hi] - plans[lo]) * width)))
        check(guess)
        if hi - lo > step:  # the guess's neighbour: where the plans are linear in the length, this closes the bracket
            check(guess + step if lo == guess else guess - step)
        if hi - lo > step and hi - lo > width // 2:
            check(inside(down((lo + hi) // 2)))
    return result(lo, hi)


def max_seq_rows(preset: Preset, impls, budget: float, only: str = "") -> list[dict]:
    """The longest sequence the remat'd char LM trains at batch 1 within `budget`, per position scheme
    (those whose label contains one of the comma-separated `only`, if given)."""
    shape, rows = preset.shape, []
    for position in preset.search_positions:
        if only and not any(o in position.label for o in only.split(",")):
            continue
        for impl in impls:
            label, attention = ATTENTIONS["sliding_window"](shape, impl)
            row = dict(model=CHAR_LM + " remat", attention=label, position=position.label, impl=impl,
                       budget_gb=budget / 1e9)
            fit, without_remat = Fit(None, math.nan, None, math.nan, 0), math.nan
            try:
                config = model_config(shape, attention, position, remat=True)
                fit = largest_fitting(_plan_of(config), budget, start=preset.search_start,
                                      step=preset.search_step, limit=preset.search_limit)
                status = "ok" + (f" ({fit.note})" if fit.note else "")
                if fit.max_seq is not None:  # what remat saves there
                    without_remat = _plan_of(dataclasses.replace(config, remat=False))(fit.max_seq)
            except Exception as e:  # noqa: BLE001
                status = _not_run(e)["status"]
            nan_if_none = lambda seq: math.nan if seq is None else seq
            rows.append(dict(row, max_seq=nan_if_none(fit.max_seq), planned_gb=fit.planned / 1e9,
                             miss_seq=nan_if_none(fit.miss_seq), miss_planned_gb=fit.miss_planned / 1e9,
                             without_remat_gb=without_remat / 1e9, compiles=fit.compiles, status=status))
            print(f"max seq {position.label:24s} {impl}: {fit.max_seq} tokens plan {fit.planned / 1e9:.2f} GB; "
                  f"{fit.miss_seq} plan {fit.miss_planned / 1e9:.2f} GB ({fit.compiles} compiles) {status}",
                  flush=True)
    return rows


def _plan_of(config: TransformerConfig) -> Callable[[int], float]:
    """seq -> the planned bytes of the char LM's compiled train step (compiled only, never run)."""
    params = None

    def plan(seq: int) -> float:
        nonlocal params
        program = char_lm_program(config, seq)
        if params is None:
            params = jax.eval_shape(program.init, jax.random.key(0))
        tokens = jax.ShapeDtypeStruct((1, program.tokens_length), jnp.int32)
        start = time.perf_counter()
        planned = planned_bytes(jax.jit(program.step).lower(params, tokens).compile())
        print(f"  plan at {seq:8,d} tokens: {planned / 1e9:7.2f} GB ({time.perf_counter() - start:.0f} s to compile)",
              flush=True)
        return planned

    return plan


# ------------------------------------------------------------------------------------------ tables and plot

# What a row is: the first columns of both tables.
CONFIGURATION = tuple(Column(name, name, numeric=False) for name in ("model", "attention", "position", "impl"))
TABLE = CONFIGURATION + (
    Column("seq", "seq", "d"),
    Column("s/step", "seconds", ".3f"),
    Column("tokens/s", "tokens_per_s", ".1f"),
    Column("peak GB", "peak_gb", ".3f"),
    Column("memory", "memory_source", numeric=False),
    Column("status", "status", numeric=False),
)
MAX_SEQ_TABLE = CONFIGURATION + (
    Column("budget GB", "budget_gb", ".2f"),
    Column("longest seq", "max_seq", ".0f"),
    Column("its plan GB", "planned_gb", ".3f"),
    Column("first too long", "miss_seq", ".0f"),
    Column("its plan GB", "miss_planned_gb", ".3f"),
    Column("longest seq's plan without remat GB", "without_remat_gb", ".3f"),
    Column("compiles", "compiles", "d"),
    Column("status", "status", numeric=False),
)


def _plot(rows, path: str, shape: Shape) -> None:
    # The comparison's rows are their own lines: its char LM row repeats a matrix configuration.
    label = lambda r: (("vs HF | " if r["group"] == "vs HF" else "") + r["model"].split(" (")[0] + ": "
                       + f"{r['attention'].split(' ')[0]}, {r['position']} [{r['impl']}]")
    points = [dict(r, op=label(r)) for r in rows]
    bench_common.plot_against_seq(
        points, path,
        panels=(
            Panel("tokens_per_s", ylabel="tokens / s (train step, median)", title="throughput"),
            Panel("peak_gb", ylabel="GB", title="memory (longjax: XLA plan; HF: RSS growth)"),
        ),
        measured="seconds",
        title=f"{shape.num_layers}-layer, {shape.d_model}-wide model, forward+backward, batch 1, float32, "
              f"{jax.devices()[0].device_kind}",
        figsize=(14, 5.5), legend_fontsize=6,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a 2-layer, 64-wide model (window 32) at 256 tokens, one row of each kind, the "
                             "search for position 'none' within 0.01 GB: checks the script")
    parser.add_argument("--seqs", help="lengths of the model matrix (default 2048,8192; '' leaves it out)")
    parser.add_argument("--peer-seqs", help="lengths of the comparison with HF's Longformer (default 2048,4096)")
    parser.add_argument("--repeats", type=int, help="timed steps per row after the warm-up step (default 3)")
    parser.add_argument("--peer-repeats", type=int, help="rounds of the comparison (default: --repeats)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="time the matrix rows' first calls (the programs are compiled ahead of time, so no "
                             "compile is timed; only first-touch allocation is): shortens a slow run")
    parser.add_argument("--memory-budget-gb", type=float, help="budget of the longest-sequence search (default 24)")
    parser.add_argument("--no-peer", dest="peer", action="store_false",
                        help="leave the comparison with HF's Longformer out (its longjax rows too)")
    parser.add_argument("--max-seq-search", dest="max_seq", action="store_true", default=True,
                        help="search the longest sequence within the budget (the default)")
    parser.add_argument("--no-max-seq", dest="max_seq", action="store_false", help="leave the search out")
    parser.add_argument("--search-positions", default="",
                        help="comma-separated substrings of the position schemes searched, e.g. 'none,native' "
                             "(default: none, txl_relative native and features, rope)")
    parser.add_argument("--only", default="", help="comma-separated substrings of the matrix rows' "
                                                   "'<attention> <position> <impl>' (default: all)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "bench_model"))
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    shape = preset.shape
    lengths = lambda flag, default: [int(s) for s in (default if flag is None else flag).split(",") if s]
    seqs, peer_seqs = lengths(args.seqs, preset.seqs), lengths(args.peer_seqs, preset.peer_seqs)
    repeats = args.repeats or preset.repeats
    budget = (args.memory_budget_gb or preset.budget_gb) * 1e9
    impls = ("xla", "pallas") if jax.default_backend() == "gpu" else ("xla",)
    comparison = peer_seqs if args.peer else "none (--no-peer)"
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {_cpus()} CPUs): {shape}; matrix at {seqs}, "
          f"comparison at {comparison}, {repeats} repeats, impls {impls}", flush=True)
    start = time.perf_counter()
    programs = Programs()
    # The comparison first: it holds the headline ratio.
    peer = peer_rows(shape, peer_seqs, args.peer_repeats or repeats, programs) if args.peer else []
    # After the comparison, before the matrix: the yardstick of the target's bound, on the same machine,
    # measured only where HF's step was timed at the target's length.
    matmul_rate = bench_common.matmul_flops_per_second() if HF in _timed_at_target(peer) else None
    rows = matrix_rows(preset, seqs, impls, repeats, programs, args.only, args.warmup) + peer
    search = max_seq_rows(preset, impls, budget, args.search_positions) if args.max_seq else []
    wall = time.perf_counter() - start

    os.makedirs(args.out, exist_ok=True)
    extra = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), cpus=_cpus(),
                 num_layers=shape.num_layers, d_model=shape.d_model, num_heads=shape.num_heads, d_ff=shape.d_ff,
                 batch=1, dtype="float32", repeats=repeats, matrix_warmup=args.warmup, optimizer_update="excluded")
    if matmul_rate is not None:
        extra["matmul_gflops"] = matmul_rate / 1e9
    csv_path, png_path = (os.path.join(args.out, "bench_model" + ext) for ext in (".csv", ".png"))
    written = []
    if rows:
        bench_common.write_csv(csv_path, rows, extra=extra)
        _plot(rows, png_path, shape)
        written += [csv_path, png_path]
        print()
        print(bench_common.markdown_table(rows, TABLE))
    if search:
        search_path = os.path.join(args.out, "bench_model_max_seq.csv")
        bench_common.write_csv(search_path, search, extra=extra)
        written.append(search_path)
        print()
        print(f"Longest sequence with remat=True, batch 1, within {budget / 1e9:g} GB (XLA's plan; "
              f"multiples of {preset.search_step}):")
        print(bench_common.markdown_table(search, MAX_SEQ_TABLE))
    if peer:
        print()
        print("longjax / HF Longformer train-step throughput:")
        print("\n".join(ratios(rows) + (target_bound(rows, shape, matmul_rate) if matmul_rate else [])))
    print(f"wrote {', '.join(written)} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
