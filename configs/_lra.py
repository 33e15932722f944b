"""What the Long Range Arena configs share (`lra_*.py`); not a config itself (files starting with '_' are not).

`lra_config(task, attention, ...)` builds one experiment: LRA's model and
schedule for the task, with `attention` one of `ATTENTIONS`:

* 'full': dense softmax attention (LRA's Transformer);
* 'sliding_window': Longformer, 256 keys each side (LRA's 512-wide window),
  global attention on the pooled CLS token when pooling is 'cls';
* 'block_sparse': BigBird, blocks of 64 (LRA's), 3 window, 2 global and 3 random blocks;
* 'performer': LRA's Performer (`performer_section`): its default, the
  generalized attention with deterministic ReLU features, and for ListOps
  the softmax FAVOR with the 2 random features LRA's ListOps config sets.

Where LRA's code and longjax differ, on purpose or by necessity:

* LRA's models compute q, k and v at `qkv_dim`, which some of its image
  configs set below the embedding width; longjax's heads split `d_model`, so
  those run at `qkv_dim = d_model` (noted in each config).
* Positions: LRA's fixed sinusoids (`position='sinusoidal'`), learned for
  Image as its CIFAR-10 config sets (`learn_pos_emb`).
* Padding: LRA masks every input id 0, which on Image and Pathfinder is a
  black pixel (most of a Pathfinder image); the readers here shift pixels by
  one, so only padding is masked.
* Weight decay: LRA's `flax.optim.Adam(weight_decay=...)` decays every
  parameter; longjax's AdamW skips biases and LayerNorm scales.
* LRA's deterministic Performer features are `relu(x) + 0.001`; longjax's
  are `relu(x / d^(1/4)) + 0.001` (the score scale split between q and k),
  the same kernel up to the epsilon's relative size (0.001 * d^(1/4)).

LRA's schedule `constant * linear_warmup * rsqrt_decay` (rate `c / sqrt(max(step,
warmup))` after a linear warmup) is `optimizer.decay='rsqrt'` with peak rate
`c / sqrt(warmup)`; its image tasks' `linear_warmup * cosine_decay` is 'cosine'.
The warmup is given in steps (`max_warmup_steps`, fraction 1), so a run
shortened with `--config.phases.steps` trains the first steps of LRA's
schedule where the schedule does not depend on the end (rsqrt), and a
compressed cosine otherwise.
"""

import math

import ml_collections
from ml_collections import config_dict

from configs import mlm_longformer_base

ATTENTIONS = ("full", "sliding_window", "block_sparse", "performer")


def performer_section(*, head_dim: int, listops: bool = False) -> dict:
    """LRA's Performer: `make_fast_generalized_attention` with deterministic ReLU features (its default),
    or for ListOps `make_fast_softmax_attention` with `nb_features=2` and chi-scaled orthogonal rows."""
    if listops:
        return dict(num_features=2, feature_map="softmax", orthogonal=True, random_features=True)
    return dict(num_features=head_dim, feature_map="relu", orthogonal=True, random_features=False)


def attention_section(attention: str, *, pooling: str, performer: dict | None = None) -> ml_collections.ConfigDict:
    """The `model.attention` section of one of `ATTENTIONS` (ValueError naming `attention` otherwise).

    `performer`: the Performer's options (`performer_section`); needed for 'performer'.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    section = ml_collections.ConfigDict()
    section.type = attention
    section.impl = config_dict.placeholder(str)  # None (best for the backend) | 'xla' | 'pallas' | 'reference'
    if attention == "sliding_window":
        section.window = 256  # keys each side: LRA's Longformer window of 512
        # The pooled first token is global with cls pooling; mean pooling needs none.
        section.max_global_tokens = 1 if pooling == "cls" else config_dict.placeholder(int)
    elif attention == "block_sparse":
        section.block_size = 64  # LRA's BigBird block
        section.num_window_blocks = 3
        section.global_blocks = (0, -1)  # the first block holds the pooled token
        section.num_random_blocks = 3
    elif attention == "performer":
        if performer is None:
            raise ValueError("attention='performer' needs performer=performer_section(...)")
        section.num_features = performer["num_features"]  # the head's width when random_features is False
        section.feature_map = performer["feature_map"]  # 'relu': generalized attention; 'softmax': FAVOR+
        section.orthogonal = performer["orthogonal"]
        section.random_features = performer["random_features"]  # False: relu(x) itself, LRA's default
    return section


def lra_config(task: str, attention: str, *, vocab_size: int, num_labels: int, seq_len: int, num_layers: int,
               num_heads: int, d_model: int, d_ff: int, classifier_dim: int, pooling: str, dropout: float,
               attention_dropout: float, batch_size: int, steps: int, learning_rate: float, warmup_steps: int,
               decay: str, weight_decay: float, position: str = "sinusoidal", listops: bool = False,
               eval_batch_size: int = 32) -> ml_collections.ConfigDict:
    """One LRA experiment's config; the arguments are LRA's published settings for the task (see callers).

    `listops` selects LRA's ListOps Performer (`performer_section`).
    """
    config = ml_collections.ConfigDict()
    config.task = task  # longjax/tasks/<task>.py
    config.seed = 0
    config.init_from = config_dict.placeholder(str)  # LRA trains from scratch

    config.model = ml_collections.ConfigDict()
    config.model.vocab_size = vocab_size  # the task's ids, 0 = padding
    config.model.num_labels = num_labels
    config.model.num_layers = num_layers
    config.model.num_heads = num_heads
    config.model.d_model = d_model  # LRA's emb_dim (= qkv_dim)
    config.model.d_ff = d_ff  # LRA's mlp_dim
    config.model.classifier_dim = classifier_dim  # LRA's classifier hidden layer (its mlp_dim)
    config.model.pooling = pooling  # 'cls' (a CLS token prepended; Retrieval: each document's first) | 'mean'
    config.model.global_first_token = attention == "sliding_window" and pooling == "cls"
    config.model.position = position  # 'sinusoidal' (LRA's default) | 'learned' (LRA's CIFAR-10)
    # Learned positions: rows 1..seq_len + 1 for the CLS token and the tokens, row 0 for padding.
    config.model.max_positions = seq_len + 2 if position == "learned" else 0
    config.model.position_offset = 0
    config.model.layer_norm = "pre"  # LRA's blocks: LayerNorm first, a final LayerNorm
    config.model.activation = "gelu"
    config.model.dropout = dropout
    config.model.attention_dropout = attention_dropout
    config.model.dtype = "float32"  # 'bfloat16' on accelerators
    config.model.param_dtype = "float32"
    config.model.remat = False
    config.model.attention = attention_section(
        attention, pooling=pooling, performer=performer_section(head_dim=d_model // num_heads, listops=listops)
    )

    config.data = ml_collections.ConfigDict()
    config.data.dir = ""  # the task's files ('' = $LONGJAX_DATA_DIR/<the task's directory>)

    config.phases = ml_collections.ConfigDict()
    config.phases.seq_len = (seq_len,)
    config.phases.batch_size = (batch_size,)
    config.phases.steps = (steps,)
    config.phases.learning_rate = (learning_rate,)  # peak, after the warmup
    config.phases.window_scale = (1,)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.98  # LRA's Adam
    config.optimizer.eps = 1e-9
    config.optimizer.weight_decay = weight_decay
    config.optimizer.grad_clip_norm = 1e9  # LRA does not clip gradients (a bound never reached)
    config.optimizer.warmup_fraction = 1.0  # the warmup is ...
    config.optimizer.max_warmup_steps = warmup_steps  # ... LRA's, in steps (at most the run's)
    config.optimizer.decay = decay  # 'rsqrt' | 'cosine'

    # Checkpoints, mesh, logging and evaluation as every encoder config has them.
    mlm_longformer_base.common_sections(config, eval_batch_size=eval_batch_size)
    config.checkpoint.keep = 2
    config.eval.every_steps = 1000  # validation accuracy during training
    return config


def rsqrt_peak(constant: float, warmup_steps: int, steps: int) -> float:
    """The largest rate of LRA's `constant * linear_warmup * rsqrt_decay` within `steps` steps.

    The warmup peaks at `constant / sqrt(warmup)`; a run shorter than its warmup
    (LRA's Retrieval: 5,000 steps, warmup 8,000) only reaches `steps / warmup` of it.
    """
    return constant / math.sqrt(warmup_steps) * min(1.0, steps / warmup_steps)
