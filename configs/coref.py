"""OntoNotes coreference with longformer-base over whole documents (the Longformer paper's Table 7).

    python -m longjax.train --config=configs/coref.py --workdir=RUN \
        --config.init_from=LONGFORMER_BASE_DIR --config.data.dir=ONTONOTES_JSONLINES_DIR

The data are Joshi et al.'s `minimize.py` JSON lines made with the RoBERTa
tokenizer and a segment length of 4,096, so a document is one segment; the
head is Lee et al.'s coarse-to-fine span ranking. Head sizes and the
optimisation follow Joshi et al.'s bert_base settings (mandarjoshi90/coref
experiments.conf), which the Longformer paper's coreference model builds on.
"""

import ml_collections
from ml_collections import config_dict

from configs import mlm_longformer_base

TRAIN_DOCUMENTS = 2_802  # OntoNotes (CoNLL-2012) English train documents
EPOCHS = 20  # Joshi et al. bert_base: num_epochs = 20


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "coref"  # longjax/tasks/coref.py
    config.seed = 0
    config.init_from = config_dict.placeholder(str)  # longformer-base-4096 (Hugging Face directory)
    config.model = mlm_longformer_base.longformer_base_model()
    config.model.coref = ml_collections.ConfigDict()
    config.model.coref.max_span_width = 30  # Joshi et al.: max_span_width
    config.model.coref.top_span_ratio = 0.4  # ... top_span_ratio
    config.model.coref.max_top_antecedents = 50  # ... max_top_antecedents
    config.model.coref.ffnn_size = 1000  # ... ffnn_size (bert_base)
    config.model.coref.ffnn_depth = 1  # ... ffnn_depth
    config.model.coref.feature_size = 20  # ... feature_size
    config.model.coref.num_genres = 7  # OntoNotes' genres
    config.model.coref.dropout = 0.3  # ... dropout_rate

    config.data = ml_collections.ConfigDict()
    config.data.dir = ""  # '' = $LONGJAX_DATA_DIR/ontonotes
    config.data.train_file = "train.english.4096.jsonlines"  # minimize.py's naming, segment length 4,096
    config.data.validation_file = "dev.english.4096.jsonlines"
    config.data.test_file = ""  # e.g. test.english.4096.jsonlines
    config.data.max_mentions = 512  # gold mentions per document (OntoNotes' longest documents hold ~450)
    config.data.genres = ("bc", "bn", "mz", "nw", "pt", "tc", "wb")  # Joshi et al.'s genre order
    # A few OntoNotes documents exceed 4,096 subtokens: they are cut (counted and logged).
    config.data.truncate = True
    config.data.tokenizer = ""

    config.phases = ml_collections.ConfigDict()
    config.phases.seq_len = (4096,)
    config.phases.batch_size = (1,)  # one document per step, as Joshi et al.
    config.phases.steps = (EPOCHS * TRAIN_DOCUMENTS,)
    config.phases.learning_rate = (1e-5,)  # Joshi et al.: bert_learning_rate
    config.phases.window_scale = (1,)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-6  # Joshi et al.: BERT's AdamWeightDecay epsilon
    config.optimizer.weight_decay = 0.01  # ... and its weight decay
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.warmup_fraction = 0.1  # a linear warmup over 10% of the steps ...
    config.optimizer.max_warmup_steps = EPOCHS * TRAIN_DOCUMENTS
    config.optimizer.decay = "polynomial"  # ... then linear decay to 0
    config.optimizer.decay_power = 1.0
    config.optimizer.grad_accumulation = 1
    config.optimizer.head_learning_rate_scale = 20.0  # Joshi et al.: task_learning_rate 2e-4 = 20 x 1e-5

    mlm_longformer_base.common_sections(config, eval_batch_size=1)
    config.eval.every_steps = TRAIN_DOCUMENTS  # once an epoch
    return config
