"""What the Long Range Arena configs share (`lra_*.py`); not a config itself (files starting with '_' are not).

`lra_config(task, attention, ...)` builds one experiment: LRA's model and
schedule for the task, with `attention` one of `ATTENTIONS`:

* 'full': dense softmax attention (LRA's Transformer);
* 'sliding_window': Longformer, 256 keys each side (LRA's 512-wide window),
  global attention on the pooled first token when pooling is 'cls';
* 'block_sparse': BigBird, blocks of 64 (LRA's), 3 window, 2 global and 3 random blocks;
* 'performer': FAVOR+ with 256 orthogonal softmax features.

LRA's models compute q, k and v at `qkv_dim`, which some of its image configs
set below the embedding width; longjax's heads split `d_model`, so those run
at `qkv_dim = d_model` (noted in each config).

LRA's schedule `constant * linear_warmup * rsqrt_decay` (rate `c / sqrt(max(step,
warmup))` after a linear warmup) is `optimizer.decay='rsqrt'` with peak rate
`c / sqrt(warmup)`; its image tasks' `linear_warmup * cosine_decay` is 'cosine'.
"""

import math

import ml_collections
from ml_collections import config_dict

from configs import mlm_longformer_base

ATTENTIONS = ("full", "sliding_window", "block_sparse", "performer")


def attention_section(attention: str, *, pooling: str) -> ml_collections.ConfigDict:
    """The `model.attention` section of one of `ATTENTIONS` (ValueError naming `attention` otherwise)."""
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
        section.num_features = 256
        section.feature_map = "softmax"  # FAVOR+
        section.orthogonal = True
    return section


def lra_config(task: str, attention: str, *, vocab_size: int, num_labels: int, seq_len: int, num_layers: int,
               num_heads: int, d_model: int, d_ff: int, classifier_dim: int, pooling: str, dropout: float,
               attention_dropout: float, batch_size: int, steps: int, learning_rate: float, warmup_steps: int,
               decay: str, weight_decay: float, eval_batch_size: int = 32) -> ml_collections.ConfigDict:
    """One LRA experiment's config; the arguments are LRA's published settings for the task (see callers)."""
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
    config.model.pooling = pooling  # 'cls' (first token) | 'mean'
    config.model.global_first_token = attention == "sliding_window" and pooling == "cls"
    config.model.position = "learned"  # LRA's learned absolute positions
    config.model.max_positions = seq_len + 1  # real tokens take rows 1..seq_len, padding row 0
    config.model.position_offset = 0
    config.model.layer_norm = "pre"  # LRA's blocks: LayerNorm first, a final LayerNorm
    config.model.activation = "gelu"
    config.model.dropout = dropout
    config.model.attention_dropout = attention_dropout
    config.model.dtype = "float32"  # 'bfloat16' on accelerators
    config.model.param_dtype = "float32"
    config.model.remat = False
    config.model.attention = attention_section(attention, pooling=pooling)

    config.data = ml_collections.ConfigDict()
    config.data.dir = ""  # the task's files ('' = $LONGJAX_DATA_DIR/<the task's directory>)
    config.data.validation_fraction = 0.1  # lra_text only: training reviews held out (by id) for validation

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
    config.optimizer.warmup_fraction = min(1.0, warmup_steps / steps)
    config.optimizer.max_warmup_steps = warmup_steps
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
