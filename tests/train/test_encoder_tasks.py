"""The long-encoder tasks end to end from the tiny Longformer fixture checkpoint: train, resume bitwise, evaluate.

Each task reads a few examples written here in its dataset's real on-disk
layout, starts from `tests/fixtures/hf/longformer_mlm` (a Hugging Face
directory) through `init_from`, trains a few steps, and `evaluate` writes its
metrics and predictions.
"""

import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest

from longjax import run, tracking
from longjax.run.errors import InitFromError
from tests.train.repeated_batch import losses_on_a_repeated_batch

REPO = pathlib.Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "tests" / "fixtures" / "hf" / "longformer_mlm"
SEQ_LEN = 64  # the fixture has 66 position rows (64 tokens after RoBERTa's offset)
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega river stone cloud lamp").split()


def _text(rng, words):
    return " ".join(rng.choice(WORDS, size=words))


def _config(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _tiny(config, data_dir, *, vocab_size=320, max_global_tokens=16):
    """The config shrunk to the fixture checkpoint's shape and a few seconds of training."""
    config.init_from = str(CHECKPOINT)
    config.data.dir = str(data_dir)
    model = config.model
    model.update(dict(vocab_size=vocab_size, num_layers=2, num_heads=4, d_model=32, d_ff=64, max_positions=66))
    # The fixture's attention_window [4, 6]: 2 and 3 keys each side.
    model.attention_per_layer = dict(window=(2, 3))
    del model.attention["window"]
    if model.attention.max_global_tokens is not None or max_global_tokens:
        model.attention.max_global_tokens = max_global_tokens
    config.phases.update(dict(seq_len=(SEQ_LEN,), batch_size=(4,), steps=(4,), learning_rate=(1e-3,)))
    config.optimizer.update(dict(max_warmup_steps=1, grad_accumulation=2))
    config.checkpoint.update(dict(every_steps=2, async_save=False))
    config.eval.update(dict(batch_size=4, every_steps=None, max_examples=None))
    config.log_every_steps = 1
    return config


# --- the datasets, in their real layouts ------------------------------------------------------------


def _mlm_data(root):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("validation", 3)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            (root / split / f"doc{i}.txt").write_text(_text(rng, 60))
        with (root / split / "more.jsonl").open("w") as f:
            f.write(json.dumps({"text": _text(rng, 50)}) + "\n")
    return root


def _imdb_data(root):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for label, word in (("pos", "river"), ("neg", "stone")):
            (root / split / label).mkdir(parents=True)
            for i in range(12):
                text = f"{word} {_text(rng, 20)} {word} {word}<br /><br />{_text(rng, 10)}"
                (root / split / label / f"{i}_{7 if label == 'pos' else 2}.txt").write_text(text)
    return root


def _triviaqa_data(root):
    rng = np.random.default_rng(2)
    (root / "qa").mkdir(parents=True)
    (root / "evidence" / "wikipedia").mkdir(parents=True)
    for split, count in (("train", 8), ("dev", 4)):
        data = []
        for i in range(count):
            answer = str(rng.choice(["c++", "Lamp (film)", "river stone"]))
            pages = []
            for j in range(2):
                filename = f"{split}_{i}_{j}.txt"
                text = f"{_text(rng, 2)} {answer} {_text(rng, 8)}." if j == 0 else f"{_text(rng, 20)}."
                (root / "evidence" / "wikipedia" / filename).write_text(text)
                pages.append({"DocSource": "TagMe", "Filename": filename, "Title": f"Page {i} {j}"})
            data.append({
                "Answer": {"Aliases": [answer, answer.upper()], "MatchedWikiEntityName": answer,
                           "NormalizedAliases": [answer.lower()], "NormalizedMatchedWikiEntityName": answer.lower(),
                           "NormalizedValue": answer.lower(), "Type": "WikipediaEntity", "Value": answer},
                "EntityPages": pages, "Question": f"which {_text(rng, 3)}?", "QuestionId": f"tq_{split}_{i}",
                "QuestionSource": "http://www.example.org/", "SearchResults": [],
            })
        (root / "qa" / f"wikipedia-{split}.json").write_text(json.dumps(
            {"Data": data, "Domain": "Wikipedia", "VerifiedEval": False, "Version": 1.0}
        ))
    return root


def _wikihop_data(root):
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    for name, count in (("train.json", 8), ("dev.json", 4)):
        records = []
        for i in range(count):
            candidates = [str(c) for c in rng.choice(WORDS, size=3, replace=False)]
            answer = candidates[int(rng.integers(3))]
            supports = [f"{_text(rng, 2)} {answer} {_text(rng, 3)}.", f"{_text(rng, 5)}."]
            records.append({"id": f"WH_{name[:-5]}_{i}", "query": f"located_in {_text(rng, 1)}",
                            "answer": answer, "candidates": candidates, "supports": supports})
        (root / name).write_text(json.dumps(records))
    return root


def _coref_data(root):
    """minimize.py JSON lines: subtokens of the checkpoint's tokenizer, clusters of the repeated nouns."""
    from longjax.hf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(CHECKPOINT)
    rng = np.random.default_rng(4)
    root.mkdir(parents=True)
    for name, count in (("train.english.4096.jsonlines", 6), ("dev.english.4096.jsonlines", 3)):
        with (root / name).open("w") as f:
            for d in range(count):
                sentences, clusters, position = [], {"river": [], "stone": []}, 1
                while position < 44:
                    sentence = []
                    for word in rng.choice(["the", "river", "stone", "ran", "by", "cold"], size=4):
                        pieces = tokenizer.encode(" " + str(word), add_special_tokens=False).tokens
                        if word in clusters:
                            clusters[word].append([position, position + len(pieces) - 1])
                        sentence += pieces
                        position += len(pieces)
                    sentences.append(sentence)
                sentences[0].insert(0, "<s>")
                sentences[-1].append("</s>")
                f.write(json.dumps({
                    "doc_key": f"{'nw' if d % 2 else 'bc'}/doc_{name[:3]}_{d}_0", "sentences": sentences,
                    "speakers": [["spk%d" % (k % 2)] * len(s) for k, s in enumerate(sentences)],
                    "clusters": [c for c in clusters.values() if len(c) > 1],
                    "sentence_map": [k for k, s in enumerate(sentences) for _ in s],
                    "subtoken_map": list(range(sum(len(s) for s in sentences))),
                }) + "\n")
    return root


def _hotpotqa_records(rng, split, count):
    """Distractor-setting records: three one-sentence paragraphs, two of them gold; span and yes/no answers."""
    records = []
    for i in range(count):
        titles = [str(t).title() for t in rng.choice(WORDS, size=3, replace=False)]
        answer = ["river", "yes", "stone"][i % 3]
        sentences = [[f"{_text(rng, 1)} {answer if answer != 'yes' else 'lamp'} {_text(rng, 1)}."],
                     [f"{_text(rng, 2)}."], [f"{_text(rng, 2)}."]]
        records.append({
            "_id": f"hp_{split}_{i}", "question": f"which {_text(rng, 1)}?", "answer": answer,
            "type": "comparison" if answer == "yes" else "bridge", "level": "easy",
            "supporting_facts": [[titles[0], 0], [titles[1], 0]],
            "context": [[title, paragraph] for title, paragraph in zip(titles, sentences)],
        })
    return records


def _hotpotqa_data(root):
    rng = np.random.default_rng(5)
    root.mkdir(parents=True)
    for name, split, count in (("hotpot_train_v1.1.json", "train", 8), ("hotpot_dev_distractor_v1.json", "dev", 4)):
        records = _hotpotqa_records(rng, split, count)
        (root / name).write_text(json.dumps(records))
        # A stage-1 ranking in its file format, for stage 2 (the last gold paragraph ranked third).
        (root / f"selection_{split}.json").write_text(json.dumps(
            {r["_id"]: [[r["context"][k][0], float(3 - rank)] for rank, k in enumerate((0, 2, 1))] for r in records}
        ))
    return root


TASKS = {
    # config file, data writer, overrides
    "mlm": ("mlm_longformer_base", _mlm_data, {}),
    "classification": ("imdb", _imdb_data, {}),
    "triviaqa": ("triviaqa", _triviaqa_data, {}),
    "wikihop": ("wikihop", _wikihop_data, {"vocab_size": 324, "max_global_tokens": 48}),
    "coref": ("coref", _coref_data, {}),
    "hotpotqa_select": ("hotpotqa_select", _hotpotqa_data, {"vocab_size": 325, "max_global_tokens": 32}),
    "hotpotqa_answer": ("hotpotqa_answer", _hotpotqa_data, {"vocab_size": 325, "max_global_tokens": 32}),
}


def _task_config(task, tmp_path_factory):
    name, write, overrides = TASKS[task]
    data_dir = write(tmp_path_factory.mktemp(f"{task}_data") / "data")
    config = _tiny(_config(name), data_dir, **overrides)
    if task == "wikihop":
        config.data.update(dict(max_chunks=4, max_candidates=4))
    if task == "classification":
        config.data.validation_fraction = 0.25
    if task.startswith("hotpotqa"):
        config.data.update(dict(max_paragraphs=3, max_sentences=4, max_question_tokens=8))
    if task == "hotpotqa_answer":
        # keep 1 ranked paragraph: training adds the missed gold ones, validation sees the first only.
        config.data.update(dict(keep_paragraphs=1, train_selection=str(data_dir / "selection_train.json"),
                                validation_selection=str(data_dir / "selection_dev.json")))
    if task == "coref":
        config.model.coref.update(dict(max_span_width=8, max_top_antecedents=8, ffnn_size=16, feature_size=4))
        # The tests' learning rate (1e-3) is 100x the paper's: the config's 20x head rate would saturate the head.
        config.optimizer.head_learning_rate_scale = 1.0
    return config


@pytest.fixture(scope="module", params=sorted(TASKS))
def trained(request, tmp_path_factory):
    """(task, config, workdir, result) of one uninterrupted run of each task."""
    task = request.param
    config = _task_config(task, tmp_path_factory)
    workdir = tmp_path_factory.mktemp(f"{task}_run")
    result = run.train(run.parse(config), workdir)
    return task, config, workdir, result


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in tracking.read_metrics(workdir) if r["kind"] == "train"]


def test_each_task_trains_from_the_hugging_face_checkpoint(trained):
    task, _, workdir, result = trained
    assert result.status == "finished" and result.step == 4
    losses = _losses(workdir)
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert all(np.isfinite(loss) and loss > 0 for _, loss in losses)


def test_resume_is_bitwise(trained, tmp_path):
    task, config, workdir, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    result = run.train(run.parse(config), resumed)
    assert result.step == 4
    assert _losses(resumed) == _losses(workdir)  # floats compared exactly


def test_loss_falls_on_a_repeated_batch(trained, tmp_path):
    task, config, _, _ = trained
    config = config.copy_and_resolve_references()
    config.model.update(dict(dropout=0.0, attention_dropout=0.0))  # the same function at every step
    if task == "coref":
        config.model.coref.dropout = 0.0
    plan = run.parse(config)
    with run.setup(plan, tmp_path / "fresh") as prepared:
        assert prepared.origin == "init_from"
        (note,) = prepared.notes
        assert f"the Hugging Face checkpoint {CHECKPOINT}" in note
        # The masked LM keeps the checkpoint's head; the others start theirs fresh.
        assert ("initialised fresh: params/head" in note) == (task != "mlm"), note
        losses = losses_on_a_repeated_batch(prepared, plan)
    assert losses[-1] < 0.85 * losses[0], losses


def test_evaluate_writes_metrics_and_predictions(trained):
    task, _, workdir, _ = trained
    result = run.evaluate_checkpoint(workdir)
    assert result["step"] == 4
    expected = {"mlm": "bpc", "classification": "accuracy", "triviaqa": "f1", "wikihop": "accuracy",
                "coref": "conll_f1", "hotpotqa_select": "paragraph_recall", "hotpotqa_answer": "joint_f1"}[task]
    assert np.isfinite(result[expected])
    if task == "mlm":
        assert "predictions" not in result
        return
    path = pathlib.Path(result["predictions"])
    assert path.parent == workdir and path.exists()
    if task == "triviaqa":
        predictions = json.loads(path.read_text())
        assert sorted(predictions) == [f"tq_dev_{i}" for i in range(4)]  # official format: {QuestionId: answer}
        assert all(isinstance(answer, str) for answer in predictions.values())
    elif task == "wikihop":
        predictions = json.loads(path.read_text())
        assert sorted(predictions) == [f"WH_dev_{i}" for i in range(4)]
    elif task == "hotpotqa_select":
        ranking = json.loads(path.read_text())  # the stage-2 selection file: {_id: [[title, score], ...]}
        assert sorted(ranking) == [f"hp_dev_{i}" for i in range(4)] and all(len(r) == 3 for r in ranking.values())
    elif task == "hotpotqa_answer":
        submission = json.loads(path.read_text())  # the official format
        assert set(submission) == {"answer", "sp"}
        assert sorted(submission["answer"]) == sorted(submission["sp"]) == [f"hp_dev_{i}" for i in range(4)]
        assert all(isinstance(a, str) for a in submission["answer"].values())
    elif task == "coref":
        predictions = json.loads(path.read_text())  # {doc_key: clusters of [start, end] spans}
        assert sorted(predictions) == sorted(f"{'nw' if d % 2 else 'bc'}/doc_dev_{d}_0" for d in range(3))
        assert all(len(span) == 2 and span[0] <= span[1] for clusters in predictions.values()
                   for cluster in clusters for span in cluster)
        assert 0 <= result["conll_f1"] <= 100 and result["documents"] == 3
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == result["documents"]
        assert {"id", "label", "prediction", "probabilities"} <= set(rows[0])


@pytest.mark.parametrize("trained", ["hotpotqa_select"], indirect=True)
def test_hotpotqa_stage_2_reads_the_ranking_stage_1_wrote(trained, tmp_path):
    _, config, workdir, _ = trained
    written = {}
    for split in ("train", "validation"):
        written[split] = run.evaluate_checkpoint(workdir, split)["predictions"]
    stage2 = _config("hotpotqa_answer")
    stage2 = _tiny(stage2, pathlib.Path(config.data.dir), vocab_size=325, max_global_tokens=32)
    stage2.data.update(dict(max_paragraphs=3, max_sentences=4, max_question_tokens=8, keep_paragraphs=2,
                            train_selection=written["train"], validation_selection=written["validation"]))
    stage2.init_from = str(workdir)  # the same model: stage 2 may start from stage 1 ...
    stage2.data.tokenizer = str(CHECKPOINT)  # ... whose workdir holds no tokenizer files
    stage2.phases.steps = (2,)
    result = run.train(run.parse(stage2), tmp_path / "stage2")
    assert result.status == "finished"
    ranking = json.loads(pathlib.Path(written["validation"]).read_text())
    plan = run.parse(stage2)
    with run.setup(plan, tmp_path / "stage2_again") as prepared:
        built = prepared.data.built["validation"]
        for i, example_id in enumerate(built.ids):
            # Validation sees exactly stage 1's two best paragraphs, in context order.
            titles = [prepared.data.examples["validation"][i].context[p][0] for p in built.paragraphs[i]]
            assert set(titles) == {title for title, _ in ranking[example_id][:2]}


def test_a_raw_roberta_checkpoint_is_refused_with_the_conversion_hint(tmp_path):
    config = _tiny(_config("imdb"), _imdb_data(tmp_path / "imdb"))
    config.init_from = str(REPO / "tests" / "fixtures" / "hf" / "roberta_mlm")
    with pytest.raises(InitFromError, match=r"model.max_positions: 40 there, 66 here.*roberta-to-longformer"):
        run.train(run.parse(config), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
