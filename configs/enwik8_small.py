"""Longformer character LM, small model (12 layers, 41M parameters), on enwik8: the paper's recipe.

Longformer (Beltagy et al., 2020), section 4 and appendix A: Transformer-XL
relative sinusoidal positions, pre-LayerNorm blocks, GeLU, AdamW with
gradient clipping 0.25 and weight decay 0.01, dropout 0.2, and five phases
that each double every layer's window and the sequence length and halve the
learning rate (the last phase's length is capped at 23,040 by memory).
Windows grow from 32 (bottom layer) to 8,192 (top); two heads of the top six
layers are dilated. Evaluation: Transformer-XL's protocol, windows of 32,256
characters advancing 512.

Variants import this file and override it (`enwik8_large.py`, `text8_small.py`, ...).
"""

import ml_collections
from ml_collections import config_dict

from longjax.models import layer_schedule

NUM_LAYERS = 12
NUM_HEADS = 8


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "char_lm"  # longjax/tasks/char_lm.py: next-character LM, BPC evaluation
    config.seed = 0  # parameters, dropout, data windows, BigBird layouts and Performer projections derive from it
    config.init_from = config_dict.placeholder(str)  # a run's workdir to take parameters from (None: scratch)

    config.model = ml_collections.ConfigDict()
    config.model.vocab_size = 256  # bytes
    config.model.num_layers = NUM_LAYERS
    config.model.num_heads = NUM_HEADS
    config.model.d_model = 512
    config.model.d_ff = 2048
    config.model.position = "txl_relative"  # Transformer-XL relative sinusoids with learned biases u, v
    config.model.relative_positions = "auto"  # native (the op computes (q + v).r_{i-j}) where the layer's op can, else d_model head features
    config.model.max_positions = 0  # rows of a learned position table (position='learned' only)
    config.model.layer_norm = "pre"  # pre-LayerNorm blocks and a final LayerNorm
    config.model.layer_norm_epsilon = 1e-5
    config.model.activation = "gelu"
    config.model.dropout = 0.2  # residual, embedding and MLP dropout
    config.model.attention_dropout = 0.0
    config.model.dtype = "float32"  # computation dtype; 'bfloat16' on accelerators
    config.model.param_dtype = "float32"
    config.model.remat = False  # rematerialise blocks to fit longer phases
    # Fields every layer shares; the sliding window is causal here: windows look left.
    config.model.attention = ml_collections.ConfigDict()
    config.model.attention.type = "sliding_window"  # 'full' | 'sliding_window' | 'block_sparse' | 'performer'
    config.model.attention.impl = config_dict.placeholder(str)  # None (best for the backend) | 'xla' | 'pallas' | 'reference'
    config.model.attention.block_size = config_dict.placeholder(int)  # impl='xla' query block (None: automatic)
    # Fields given per layer: phase-1 windows from 32 up to 8,192, and the paper's
    # dilation d = 1, 2, 3 (ours d + 1) on the last 2 heads of layers 6-7, 8-9, 10-11.
    config.model.attention_per_layer = ml_collections.ConfigDict()
    config.model.attention_per_layer.window = layer_schedule.geometric_windows(NUM_LAYERS, bottom=32, top=8192)
    config.model.attention_per_layer.dilation = layer_schedule.dilate_last_heads(
        NUM_LAYERS, NUM_HEADS, heads=2, dilations={6: 2, 7: 2, 8: 3, 9: 3, 10: 4, 11: 4}
    )

    config.data = ml_collections.ConfigDict()
    config.data.name = "enwik8"  # 'enwik8' | 'text8' | 'pydoc_topics' (embedded, no download)
    config.data.dir = ""  # '' = $LONGJAX_DATA_DIR, else ~/.cache/longjax/data
    config.data.download = True  # fetch the archive when missing (checksum-verified)

    # One value per phase.
    config.phases = ml_collections.ConfigDict()
    config.phases.seq_len = (2048, 4096, 8192, 16384, 23040)
    config.phases.batch_size = (32, 32, 16, 16, 16)  # global, over all devices and hosts
    config.phases.steps = (430_000, 50_000, 50_000, 35_000, 5_000)
    config.phases.learning_rate = (2.5e-4, 1.25e-4, 6.25e-5, 3.125e-5, 1.5625e-5)  # constant after warmup
    config.phases.window_scale = (1, 2, 4, 8, 16)  # windows = phase-1 windows * scale, clipped to seq_len

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.01  # decoupled (AdamW), on weight matrices and embeddings only
    config.optimizer.grad_clip_norm = 0.25
    config.optimizer.warmup_fraction = 0.1  # of each phase's steps ...
    config.optimizer.max_warmup_steps = 10_000  # ... at most

    config.eval = ml_collections.ConfigDict()
    config.eval.seq_len = 32_256  # Transformer-XL protocol: windows of 32,256 characters ...
    config.eval.step = 512  # ... advancing 512, each scoring its last 512
    config.eval.batch_size = 1  # windows per evaluation call
    config.eval.every_steps = 10_000  # validation BPC during training (None: at phase ends only)
    config.eval.max_chars = 1_000_000  # validation characters scored then (None: all)

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 2_000  # and at each phase's end, and on SIGTERM
    config.checkpoint.keep = 3  # newest checkpoints kept
    config.checkpoint.async_save = True  # write in the background

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # devices on the data axis (-1: all that fsdp and sequence leave)
    config.mesh.fsdp = 1  # devices sharding parameters and optimizer state (and the batch)
    config.mesh.sequence = 1  # devices sharding each sequence (sparse and Performer layers, not full)
    config.mesh.distributed = False  # jax.distributed.initialize() first, for multi-host runs
    # With distributed: the coordinator's host:port, the process count and this process's index,
    # or None (all three) where JAX finds them itself (Cloud TPU, SLURM, Open MPI, Kubernetes).
    config.mesh.coordinator_address = config_dict.placeholder(str)
    config.mesh.num_processes = config_dict.placeholder(int)
    config.mesh.process_id = config_dict.placeholder(int)

    config.log_every_steps = 100  # console, TensorBoard and metrics.jsonl
    config.allow_config_change = False  # resume even if the saved config differs
    return config
