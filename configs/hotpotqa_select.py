"""HotpotQA (distractor), stage 1: the paragraph selector, with longformer-base (the Longformer paper's Table 7).

    python -m longjax.train --config=configs/hotpotqa_select.py --workdir=STAGE1 \
        --config.init_from=LONGFORMER_BASE_DIR --config.data.dir=HOTPOTQA_DIR
    python -m longjax.evaluate --workdir=STAGE1 --split=train       # and validation, test:
    # each writes STAGE1/predictions_<split>_<step>.json, the ranking stage 2 reads

All ten paragraphs in one input with `[q] [/q] <t> </t> [s]` markers, global
attention on the question and the markers, a score on each `<t>`. The
paper's HotpotQA code and its exact settings were not released; the
optimisation here follows the paper's TriviaQA settings (configs/triviaqa.py).
"""

import ml_collections
from ml_collections import config_dict

from configs import mlm_longformer_base

TRAIN_QUESTIONS = 90_447  # hotpot_train_v1.1.json
BATCH = 32  # as configs/triviaqa.py (paper, Table 14)
EPOCHS = 5  # as configs/triviaqa.py


def hotpotqa_config(stage: str):
    """The config of either stage (`data.stage`); the two differ in their data and evaluation fields."""
    config = ml_collections.ConfigDict()
    config.task = "hotpotqa"  # longjax/tasks/hotpotqa.py
    config.seed = 0
    config.init_from = config_dict.placeholder(str)  # longformer-base-4096 (Hugging Face directory)
    # <s>, [q], up to 64 question tokens, [/q], and per paragraph <t> </t> plus one [s] per sentence:
    # 10 paragraphs of HotpotQA hold up to ~150 sentences.
    config.model = mlm_longformer_base.longformer_base_model(max_global_tokens=320)
    config.model.vocab_size = mlm_longformer_base.LONGFORMER_BASE["vocab_size"] + 5  # [q] [/q] <t> </t> [s]

    config.data = ml_collections.ConfigDict()
    config.data.stage = stage
    config.data.dir = ""  # '' = $LONGJAX_DATA_DIR/hotpotqa
    config.data.train_file = "hotpot_train_v1.1.json"
    config.data.validation_file = "hotpot_dev_distractor_v1.json"
    config.data.test_file = ""
    # Stage 2 keeps the 3 best paragraphs: two are gold in every question, and a third costs few tokens
    # but spares a question whose second gold paragraph stage 1 ranked third.
    config.data.keep_paragraphs = 3
    config.data.train_selection = ""
    config.data.validation_selection = ""
    config.data.test_selection = ""
    config.data.oracle_paragraphs = False
    config.data.max_paragraphs = 10  # the distractor setting's paragraphs per question
    config.data.max_sentences = 96  # sentences of the kept paragraphs (more is an error naming this field)
    config.data.max_answer_spans = 64
    config.data.max_question_tokens = 64
    config.data.tokenizer = ""

    config.phases = ml_collections.ConfigDict()
    config.phases.seq_len = (4096,)
    config.phases.batch_size = (BATCH,)
    config.phases.steps = (EPOCHS * TRAIN_QUESTIONS // BATCH,)
    config.phases.learning_rate = (3e-5,)
    config.phases.window_scale = (1,)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.warmup_fraction = 1.0
    config.optimizer.max_warmup_steps = 1000  # linear warmup and decay, as configs/triviaqa.py
    config.optimizer.decay = "polynomial"
    config.optimizer.decay_power = 1.0
    config.optimizer.grad_accumulation = 8

    mlm_longformer_base.common_sections(config)
    config.eval = ml_collections.ConfigDict(dict(config.eval))
    config.eval.n_best = 20
    config.eval.max_answer_len = 30
    config.eval.sp_threshold = 0.5
    config.eval.every_steps = 2000
    config.eval.max_examples = 1000
    return config


def get_config():
    return hotpotqa_config("select")
