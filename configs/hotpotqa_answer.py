"""HotpotQA (distractor), stage 2: answer span, yes/no and supporting facts over stage 1's paragraphs.

    python -m longjax.train --config=configs/hotpotqa_answer.py --workdir=STAGE2 \
        --config.init_from=LONGFORMER_BASE_DIR --config.data.dir=HOTPOTQA_DIR \
        --config.data.train_selection=STAGE1/predictions_train_<step>.json \
        --config.data.validation_selection=STAGE1/predictions_validation_<step>.json
    python -m longjax.evaluate --workdir=STAGE2   # writes the official submission file

`[CLS] [q] question [/q] <t> title </t> sentence [s] ...` over the best
`data.keep_paragraphs` paragraphs (plus, in training, the gold ones stage 1
missed); span, answer-type and supporting-fact heads, losses summed.
`init_from` may also be the stage-1 workdir (the same model), with
`--config.data.tokenizer=LONGFORMER_BASE_DIR` (a workdir holds no tokenizer).
"""

from configs import hotpotqa_select


def get_config():
    config = hotpotqa_select.hotpotqa_config("answer")
    config.data.validation_selection = ""  # stage 1's validation ranking (required; or data.oracle_paragraphs)
    return config
