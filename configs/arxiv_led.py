"""arXiv summarization with LED-large 16K (the Longformer paper's section 7, Table 11).

    python -m longjax.train --config=configs/arxiv_led.py --workdir=RUN \
        --config.init_from=LED_LARGE_16384_DIR --config.data.dir=ARXIV_DATASET_DIR
    python -m longjax.summarize --workdir=RUN --split=test --config.decode.num_beams=4

`init_from` is allenai/led-large-16384 (downloaded), or bart-large converted
with `python -m longjax.convert bart-to-led --max-encoder-positions=16384
--attention-window=1024`. `data.dir` holds the arXiv release's train.txt,
val.txt and test.txt (or `data.format='tfds'` and a tfds data_dir).
"""

import ml_collections
from ml_collections import config_dict

from configs import mlm_longformer_base

TRAIN_PAPERS = 203_037  # the release's train.txt
BATCH = 16  # our choice (the paper gives none for LED): 16 papers of 16K tokens per step, micro-batches of 2
EPOCHS = 5  # our choice


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "summarization"  # longjax/tasks/summarization.py
    config.seed = 0
    config.init_from = config_dict.placeholder(str)  # allenai/led-large-16384 (Hugging Face directory)

    # allenai/led-large-16384's config.json (bart-large's shape; 16K encoder positions).
    config.model = ml_collections.ConfigDict()
    config.model.vocab_size = 50265
    config.model.d_model = 1024
    config.model.activation = "gelu"
    config.model.dropout = 0.1
    config.model.attention_dropout = 0.0
    config.model.activation_dropout = 0.0
    config.model.layer_norm_epsilon = 1e-5
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = True  # 16K-token inputs: rematerialise every block
    config.model.position_offset = 0  # LED's positions start at row 0 (BART's at 2)
    config.model.scale_embedding = False
    config.model.label_smoothing = 0.1  # our choice (fairseq's BART summarization recipe uses 0.1)
    config.model.encoder = ml_collections.ConfigDict()
    config.model.encoder.num_layers = 12
    config.model.encoder.num_heads = 16
    config.model.encoder.d_ff = 4096
    config.model.encoder.max_positions = 16384
    # attention_window 1024 (Hugging Face's full window): 512 keys each side; global attention on <s>.
    config.model.encoder.attention = dict(type="sliding_window", window=512, global_projections=True,
                                          max_global_tokens=1)
    config.model.decoder = ml_collections.ConfigDict()
    config.model.decoder.num_layers = 12
    config.model.decoder.num_heads = 16
    config.model.decoder.d_ff = 4096
    config.model.decoder.max_positions = 1024

    config.data = ml_collections.ConfigDict()
    config.data.format = "release"  # 'release' (train.txt / val.txt / test.txt JSON lines) | 'tfds'
    config.data.dir = ""  # '' = $LONGJAX_DATA_DIR/arxiv-dataset
    config.data.max_target_tokens = 512  # abstracts cut at 512 tokens (few arXiv abstracts are longer)
    config.data.tokenizer = ""  # '' = init_from's

    config.phases = ml_collections.ConfigDict()
    config.phases.seq_len = (16384,)  # paper, section 7: inputs up to 16K tokens
    config.phases.batch_size = (BATCH,)
    config.phases.steps = (EPOCHS * TRAIN_PAPERS // BATCH,)
    config.phases.learning_rate = (3e-5,)  # allenai's LED summarization tutorial script
    config.phases.window_scale = (1,)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.warmup_fraction = 1.0
    config.optimizer.max_warmup_steps = 1000  # allenai's LED summarization tutorial script: 1,000 warmup steps
    config.optimizer.decay = "polynomial"  # linear decay to 0 after warmup
    config.optimizer.decay_power = 1.0
    config.optimizer.grad_accumulation = 8

    mlm_longformer_base.common_sections(config, eval_batch_size=4)
    config.eval.every_steps = 5000
    config.eval.max_examples = 256  # validation papers summarised at training-time evaluations (all at the end)

    # Beam search for the summaries (longjax.models.GenerationSettings). Our choice, the settings commonly used
    # with LED on arXiv (Hugging Face's led-large-16384-arxiv card): 4 beams, length penalty 2, no repeated
    # trigram, 100-512 tokens; the BART/LED token ids.
    config.decode = ml_collections.ConfigDict()
    config.decode.num_beams = 4
    config.decode.max_length = 512
    config.decode.min_length = 100
    config.decode.length_penalty = 2.0
    config.decode.early_stopping = True
    config.decode.no_repeat_ngram_size = 3
    config.decode.decoder_start_token_id = 2  # </s>
    config.decode.eos_token_id = 2
    config.decode.pad_token_id = 1
    return config
