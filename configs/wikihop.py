"""WikiHop with longformer-base (the Longformer paper's Table 7).

    python -m longjax.train --config=configs/wikihop.py --workdir=RUN \
        --config.init_from=LONGFORMER_BASE_DIR --config.data.dir=QANGAROO_WIKIHOP_DIR

`<s> [q] question [/q] [ent] candidate [/ent] ... </s> support </s> ...`, in
chunks of 4,096 tokens each prefixed by the question and candidates; global
attention on the question and candidates; a score on each `[ent]` averaged
over the chunks.
"""

import ml_collections
from ml_collections import config_dict

from configs import mlm_longformer_base

TRAIN_EXAMPLES = 43_738  # qangaroo WikiHop train.json
BATCH = 32  # paper, appendix D: gradient accumulation to 32 instances
EPOCHS = 15  # paper, Table 14 and appendix D (base: grid lr {2,3,5}e-5 x epochs {5,10,15})


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "wikihop"  # longjax/tasks/wikihop.py
    config.seed = 0
    config.init_from = config_dict.placeholder(str)  # longformer-base-4096 (Hugging Face directory)
    # Question and up to 79 candidates with their markers are global.
    config.model = mlm_longformer_base.longformer_base_model(max_global_tokens=512)
    config.model.vocab_size = mlm_longformer_base.LONGFORMER_BASE["vocab_size"] + 4  # [q] [/q] [ent] [/ent]

    config.data = ml_collections.ConfigDict()
    config.data.dir = ""  # '' = $LONGJAX_DATA_DIR/qangaroo_v1.1/wikihop
    config.data.train_file = "train.json"
    config.data.validation_file = "dev.json"
    config.data.test_file = ""
    config.data.max_chunks = 8  # chunks of 4,096 per example (a longer one is an error unless truncate)
    config.data.max_candidates = 79  # the most candidates a WikiHop question has
    config.data.truncate = False
    config.data.skip_malformed = False
    config.data.tokenizer = ""

    config.phases = ml_collections.ConfigDict()
    config.phases.seq_len = (4096,)
    config.phases.batch_size = (BATCH,)
    config.phases.steps = (EPOCHS * TRAIN_EXAMPLES // BATCH,)
    config.phases.learning_rate = (3e-5,)  # paper, Table 14
    config.phases.window_scale = (1,)

    config.optimizer = ml_collections.ConfigDict()
    # Appendix D: dropout and weight decay as in RoBERTa's pretraining; allenai's wikihop.py (branch
    # mp/wikihop): AdamW, betas (0.9, 0.98), weight decay 0.01, eps transformers' default.
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-6
    config.optimizer.weight_decay = 0.01
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.warmup_fraction = 1.0
    config.optimizer.max_warmup_steps = 200  # paper, Table 14: 200 warmup steps ...
    config.optimizer.decay = "polynomial"  # ... then linear decay (allenai's wikihop.py schedule)
    config.optimizer.decay_power = 1.0
    config.optimizer.grad_accumulation = 32  # one example (up to max_chunks chunks) per micro-batch

    mlm_longformer_base.common_sections(config, eval_batch_size=1)
    config.eval.every_steps = 250  # paper, appendix D: dev accuracy every 250 updates
    config.eval.max_examples = 500
    return config
