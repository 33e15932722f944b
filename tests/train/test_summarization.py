"""The summarization task end to end from the tiny LED fixture checkpoint: train, resume bitwise, evaluate, summarize."""

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from longjax import run, tracking
from longjax.run.errors import InitFromError
from longjax.sections import ConfigError
from tests.train.repeated_batch import losses_on_a_repeated_batch

REPO = pathlib.Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "tests" / "fixtures" / "hf" / "led_generation"
WORDS = ("the model attends to a window of local context and a few global tokens while the decoder writes "
         "a summary of the paper sentence by sentence").split()


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, size=n)) + " ."


def write_release(root: pathlib.Path) -> pathlib.Path:
    """train.txt, val.txt and test.txt in the arXiv release's JSON-lines format."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for stem, count in (("train", 8), ("val", 3), ("test", 2)):
        with (root / f"{stem}.txt").open("w") as f:
            for i in range(count):
                record = {
                    "article_id": f"{stem}.{i:04d}",
                    "article_text": [_sentence(rng, 8) for _ in range(6)],
                    "abstract_text": [f"<S> {_sentence(rng, 5)} </S>" for _ in range(2)],
                    "labels": None, "section_names": ["introduction"], "sections": [["..."]],
                }
                f.write(json.dumps(record) + "\n")
    return root


def tiny_config(data_dir):
    spec = importlib.util.spec_from_file_location("arxiv_led", REPO / "configs" / "arxiv_led.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.init_from = str(CHECKPOINT)
    config.data.dir = str(data_dir)
    config.data.max_target_tokens = 16
    config.model.update(dict(vocab_size=320, d_model=32, dtype="float32", remat=False, label_smoothing=0.1))
    for part, positions in (("encoder", 64), ("decoder", 32)):
        config.model[part].update(dict(num_layers=2, num_heads=4, d_ff=64, max_positions=positions))
    # The fixture's attention_window [4, 6]: 2 and 3 keys each side.
    del config.model.encoder.attention["window"]
    config.model.encoder.attention_per_layer = dict(window=(2, 3))
    config.phases.update(dict(seq_len=(64,), batch_size=(4,), steps=(4,), learning_rate=(1e-3,)))
    config.optimizer.update(dict(max_warmup_steps=1, grad_accumulation=2))
    config.checkpoint.update(dict(every_steps=2, async_save=False))
    config.eval.update(dict(batch_size=2, every_steps=None, max_examples=None))
    config.decode.update(dict(num_beams=2, max_length=10, min_length=0, no_repeat_ngram_size=2))
    config.log_every_steps = 1
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = tiny_config(write_release(tmp_path_factory.mktemp("arxiv") / "arxiv-dataset"))
    workdir = tmp_path_factory.mktemp("summarization_run")
    result = run.train(run.parse(config), workdir)
    return config, workdir, result


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in tracking.read_metrics(workdir) if r["kind"] == "train"]


def test_trains_from_the_led_checkpoint_and_resumes_bitwise(trained, tmp_path):
    config, workdir, result = trained
    assert result.status == "finished" and result.step == 4
    assert [s for s, _ in _losses(workdir)] == [1, 2, 3, 4]
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    assert run.train(run.parse(config), resumed).step == 4
    assert _losses(resumed) == _losses(workdir)  # floats compared exactly


def test_loss_falls_on_a_repeated_batch(trained, tmp_path):
    config, _, _ = trained
    config = config.copy_and_resolve_references()
    config.model.update(dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))
    plan = run.parse(config)
    with run.setup(plan, tmp_path / "fresh") as prepared:
        assert prepared.origin == "init_from"
        assert f"the Hugging Face checkpoint {CHECKPOINT}" in prepared.notes[0]
        losses = losses_on_a_repeated_batch(prepared, plan)
    assert losses[-1] < 0.85 * losses[0], losses


def test_evaluate_writes_rouge_and_one_summary_per_line(trained):
    _, workdir, _ = trained
    result = run.evaluate_checkpoint(workdir)
    assert result["split"] == "validation" and result["documents"] == 3
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert 0 <= result[name] <= 100
    assert 1 <= result["summary_tokens"] <= 9 and np.isfinite(result["loss"])
    lines = pathlib.Path(result["predictions"]).read_text().splitlines()
    assert len(lines) == 3


def test_summarize_command_takes_decoding_flags(trained):
    _, workdir, _ = trained
    done = subprocess.run(
        [sys.executable, "-m", "longjax.summarize", f"--workdir={workdir}", "--split=test",
         "--config.decode.num_beams=3", "--config.decode.early_stopping=never", "--config.decode.length_penalty=2.0"],
        capture_output=True, text=True, cwd=REPO, check=False, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rougeLsum" in done.stdout
    (summary_file,) = workdir.glob("summaries_test_4.json")
    written = json.loads(summary_file.read_text())
    assert written["overrides"] == {"decode": {"num_beams": 3, "early_stopping": "never", "length_penalty": 2.0}}
    assert len(pathlib.Path(written["predictions"]).read_text().splitlines()) == 2
    bad = subprocess.run([sys.executable, "-m", "longjax.summarize", f"--workdir={workdir}",
                          "--config.decode.num_beams=0"], capture_output=True, text=True, cwd=REPO, check=False,
                         timeout=600)
    assert bad.returncode == 1 and "decode.num_beams must be an int >= 1" in bad.stdout + bad.stderr


def test_decoding_ids_must_be_the_tokenizers(tmp_path):
    config = tiny_config(write_release(tmp_path / "arxiv-dataset"))
    config.decode.decoder_start_token_id = 0
    with pytest.raises(ConfigError, match=r"decode.decoder_start_token_id \(0\) must be the tokenizer's </s> id \(2\)"):
        with run.setup(run.parse(config), tmp_path / "run"):
            pass


def test_a_bart_checkpoint_is_refused_with_the_conversion_hint(tmp_path):
    config = tiny_config(write_release(tmp_path / "arxiv-dataset"))
    config.init_from = str(REPO / "tests" / "fixtures" / "hf" / "bart_generation")
    with pytest.raises(InitFromError, match="bart-to-led"):
        with run.setup(run.parse(config), tmp_path / "run"):
            pass
