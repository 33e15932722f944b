"""Continued masked-LM pretraining of longformer-base from RoBERTa (the Longformer paper, section 5 and Table 5).

Start from roberta-base made long (`python -m longjax.convert roberta-to-longformer
--src=ROBERTA_DIR --out=DIR`: the 514 position rows copied to 4,098, the
global projections copied from the local ones), then train the masked LM on
long documents with a window of 512 on every layer:

    python -m longjax.train --config=configs/mlm_longformer_base.py --workdir=RUN \
        --config.init_from=DIR --config.data.dir=DOCUMENTS

`longformer_base_model()` is longformer-base-4096's architecture; the
fine-tuning configs import it.
"""

import ml_collections
from ml_collections import config_dict

# allenai/longformer-base-4096's config.json: roberta-base with 4,096 positions (+ RoBERTa's 2 offset rows).
LONGFORMER_BASE = dict(
    vocab_size=50265, num_layers=12, num_heads=12, d_model=768, d_ff=3072, max_positions=4098, position_offset=1,
    type_vocab_size=1, layer_norm_epsilon=1e-5, dropout=0.1, attention_dropout=0.1,
)
# Hugging Face's attention_window 512 is 256 keys each side.
WINDOW = 256


def longformer_base_model(max_global_tokens=None):
    """The `model` section of longformer-base-4096 (post-LayerNorm RoBERTa with sliding windows).

    Args:
      max_global_tokens: bound on global tokens per sequence (None for the masked LM, which has none).
    """
    model = ml_collections.ConfigDict()
    for key, value in LONGFORMER_BASE.items():
        setattr(model, key, value)
    model.position = "learned"  # RoBERTa's absolute positions, offset by the padding id
    model.layer_norm = "post"  # BERT/RoBERTa blocks
    model.activation = "gelu"  # exact GELU, as RoBERTa
    model.dtype = "float32"  # 'bfloat16' on accelerators
    model.param_dtype = "float32"
    model.remat = False  # rematerialise blocks to fit 4,096 tokens in less memory
    model.attention = ml_collections.ConfigDict()
    model.attention.type = "sliding_window"
    model.attention.window = WINDOW  # keys each side (Hugging Face attention_window = 2 * window)
    model.attention.global_projections = True  # Longformer's separate global q/k/v
    model.attention.max_global_tokens = config_dict.placeholder(int) if max_global_tokens is None else max_global_tokens
    model.attention.impl = config_dict.placeholder(str)  # None (best for the backend) | 'xla' | 'pallas' | 'reference'
    return model


def common_sections(config, *, eval_batch_size=8):
    """The run's sections every encoder config shares (checkpoints, mesh, logging, evaluation)."""
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 3
    config.checkpoint.async_save = True
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # devices on the data axis (-1: all that fsdp and sequence leave)
    config.mesh.fsdp = 1  # devices sharding parameters and optimizer state (and the batch)
    config.mesh.sequence = 1  # devices sharding each sequence (sparse and Performer layers, not full)
    config.mesh.distributed = False  # True on multi-host pods
    # With distributed: the coordinator's host:port, the process count and this process's index,
    # or None (all three) where JAX finds them itself (Cloud TPU, SLURM, Open MPI, Kubernetes).
    config.mesh.coordinator_address = config_dict.placeholder(str)
    config.mesh.num_processes = config_dict.placeholder(int)
    config.mesh.process_id = config_dict.placeholder(int)
    config.log_every_steps = 50
    config.allow_config_change = False
    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = config_dict.placeholder(int)  # None: at the end only
    config.eval.batch_size = eval_batch_size
    config.eval.max_examples = config_dict.placeholder(int)  # None: the whole validation split
    return config


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "mlm"  # longjax/tasks/mlm.py
    config.seed = 0
    config.init_from = config_dict.placeholder(str)  # the converted roberta-base directory (Hugging Face layout)
    config.model = longformer_base_model()

    config.data = ml_collections.ConfigDict()
    config.data.dir = ""  # train/ and validation/ of .txt or .jsonl documents ('' = $LONGJAX_DATA_DIR/mlm)
    config.data.tokenizer = ""  # '' = init_from's tokenizer files
    config.data.mask_prob = 0.15  # RoBERTa's masking rate

    config.phases = ml_collections.ConfigDict()
    config.phases.seq_len = (4096,)  # paper, section 5: sequences of 4,096 tokens
    config.phases.batch_size = (64,)  # paper, section 5: batch 64 (2^18 tokens)
    config.phases.steps = (65_000,)  # paper, section 5: 65K gradient updates
    config.phases.learning_rate = (3e-5,)  # paper, section 5: maximum learning rate 3e-5
    config.phases.window_scale = (1,)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.b1 = 0.9
    # Paper, section 5: 'the rest of the hyperparameters are the same as RoBERTa': its betas, eps and decay.
    config.optimizer.b2 = 0.98  # RoBERTa's pretraining beta2
    config.optimizer.eps = 1e-6  # RoBERTa's pretraining epsilon
    config.optimizer.weight_decay = 0.01  # RoBERTa's
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.warmup_fraction = 1.0
    config.optimizer.max_warmup_steps = 500  # paper, section 5: linear warmup of 500 steps
    config.optimizer.decay = "polynomial"  # paper, section 5: then polynomial decay of power 3
    config.optimizer.decay_power = 3.0
    config.optimizer.grad_accumulation = 16  # 4 sequences of 4,096 per micro-batch; 16 of them make the 64

    common_sections(config, eval_batch_size=4)
    config.checkpoint.every_steps = 500
    config.eval.every_steps = 5000
    config.eval.max_examples = 256  # validation blocks scored during training
    return config
