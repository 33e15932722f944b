"""Hyperpartisan news detection with longformer-base (the Longformer paper's Table 7, classification).

    python -m longjax.train --config=configs/hyperpartisan.py --workdir=RUN \
        --config.init_from=LONGFORMER_BASE_DIR --config.data.dir=DIR_WITH_HP_JSONL

allenai's preprocessing writes the JSON lines; `data.split_file` takes its
hp-splits.json for comparability with published numbers (its test ids leak
into train, and loading it warns how many); by default a clean split by id.
"""

from configs import imdb

TRAIN_DOCUMENTS = 516  # paper, section 6.3: 80/10/10 split of the 645 articles
BATCH = 32
EPOCHS = 15  # paper, appendix D: 3e-5 and 15 epochs best for both classification datasets


def get_config():
    config = imdb.get_config()
    config.data.name = "hyperpartisan"
    config.data.dir = ""  # '' = $LONGJAX_DATA_DIR/hyperpartisan
    config.data.file = "hp.jsonl"  # the JSON lines in data.dir
    config.data.split_file = ""  # allenai's hp-splits.json, or '' for the clean split by id
    config.phases.batch_size = (BATCH,)
    config.phases.steps = (EPOCHS * TRAIN_DOCUMENTS // BATCH,)
    config.phases.learning_rate = (3e-5,)
    config.eval.every_steps = 20
    return config
