"""TriviaQA (Wikipedia) with longformer-base (the Longformer paper's Table 7).

    python -m longjax.train --config=configs/triviaqa.py --workdir=RUN \
        --config.init_from=LONGFORMER_BASE_DIR --config.data.dir=TRIVIAQA_DIR

Input `<s> question </s></s> document </s>` truncated at 4,096 tokens;
global attention on the question; the loss over every answer occurrence.
"""

import ml_collections
from ml_collections import config_dict

from configs import mlm_longformer_base

TRAIN_PAIRS = 110_648  # question-document pairs of the Wikipedia training set (allenai scripts/triviaqa.py)
BATCH = 32  # paper, Table 14
EPOCHS = 5  # paper, Table 14 (allenai's cheatsheet command uses 4)


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "triviaqa"  # longjax/tasks/triviaqa.py
    config.seed = 0
    config.init_from = config_dict.placeholder(str)  # longformer-base-4096 (Hugging Face directory)
    # Global attention on <s> and the question (paper, appendix D), at most 55 question tokens
    # (allenai scripts/triviaqa.py max_question_len).
    config.model = mlm_longformer_base.longformer_base_model(max_global_tokens=56)

    config.data = ml_collections.ConfigDict()
    config.data.format = "raw"  # 'raw' (qa/ and evidence/) | 'squad' (allenai's conversion)
    config.data.dir = ""  # '' = $LONGJAX_DATA_DIR/triviaqa
    config.data.train_file = ""  # '' = qa/wikipedia-train.json (raw)
    config.data.validation_file = ""  # '' = qa/wikipedia-dev.json (raw)
    config.data.test_file = ""  # '' = qa/wikipedia-test-without-answers.json when present (raw)
    config.data.max_answer_spans = 64  # answer occurrences kept per pair (allenai max_num_answers)
    config.data.tokenizer = ""

    config.phases = ml_collections.ConfigDict()
    config.phases.seq_len = (4096,)  # paper, appendix D: documents truncated at 4,096 wordpieces
    config.phases.batch_size = (BATCH,)
    config.phases.steps = (EPOCHS * TRAIN_PAIRS // BATCH,)
    config.phases.learning_rate = (3e-5,)  # paper, Table 14
    config.phases.window_scale = (1,)

    config.optimizer = ml_collections.ConfigDict()
    # allenai scripts/triviaqa.py: torch.optim.Adam with its defaults, no weight decay.
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.warmup_fraction = 1.0
    config.optimizer.max_warmup_steps = 1000  # paper, Table 14: 1,000 warmup steps, linear warmup and decay
    config.optimizer.decay = "polynomial"  # ... then linear decay
    config.optimizer.decay_power = 1.0
    config.optimizer.grad_accumulation = 8

    mlm_longformer_base.common_sections(config)
    config.eval = ml_collections.ConfigDict(dict(config.eval))
    config.eval.n_best = 20  # allenai's span search: the 20 best starts and ends ...
    config.eval.max_answer_len = 30  # ... and answers of at most 30 tokens
    config.eval.every_steps = 2000
    config.eval.max_examples = 1000
    return config
