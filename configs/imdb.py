"""IMDB sentiment classification with longformer-base (the Longformer paper's Table 7, classification).

    python -m longjax.train --config=configs/imdb.py --workdir=RUN \
        --config.init_from=LONGFORMER_BASE_DIR --config.data.dir=ACLIMDB_DIR

Global attention on `<s>`; a classification head on it; cross entropy.
"""

import ml_collections
from ml_collections import config_dict

from configs import mlm_longformer_base

TRAIN_DOCUMENTS = 22_500  # the 25,000 training reviews less the 10% held out for validation
BATCH = 32  # paper, appendix D: batch 32
EPOCHS = 15  # paper, appendix D: grid lr {3e-5, 5e-5} x epochs {10, 15, 20}; 3e-5 and 15 best


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "classification"  # longjax/tasks/classification.py
    config.seed = 0
    config.init_from = config_dict.placeholder(str)  # longformer-base-4096 (Hugging Face directory)
    config.model = mlm_longformer_base.longformer_base_model(max_global_tokens=1)  # <s> only
    config.model.num_labels = 2

    config.data = ml_collections.ConfigDict()
    config.data.name = "imdb"
    config.data.dir = ""  # the aclImdb directory ('' = $LONGJAX_DATA_DIR/aclImdb)
    config.data.format = "aclimdb"  # 'aclimdb' (raw directory) | 'tfds' (imdb_reviews prepared in data.dir)
    config.data.validation_fraction = 0.1  # training reviews held out (by id) for validation
    config.data.skip_malformed = False
    config.data.tokenizer = ""  # '' = init_from's

    config.phases = ml_collections.ConfigDict()
    config.phases.seq_len = (4096,)  # documents truncated at 4,096 tokens (few IMDB reviews are longer than 512)
    config.phases.batch_size = (BATCH,)
    config.phases.steps = (EPOCHS * TRAIN_DOCUMENTS // BATCH,)
    config.phases.learning_rate = (3e-5,)  # paper, appendix D
    config.phases.window_scale = (1,)

    config.optimizer = ml_collections.ConfigDict()
    # Adam; the paper gives no betas, eps or weight decay for classification: PyTorch's Adam defaults, no decay.
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.warmup_fraction = 0.1  # paper, appendix D: linear warmup over 10% of the steps ...
    config.optimizer.max_warmup_steps = 1_000_000
    config.optimizer.decay = "polynomial"  # ... then linear decay to 0
    config.optimizer.decay_power = 1.0
    config.optimizer.grad_accumulation = 8  # 4 documents of 4,096 tokens per micro-batch

    mlm_longformer_base.common_sections(config)
    config.eval.every_steps = 1000
    return config
