"""Sequence classification (params task.type: classification): labels mapped once in prepare, a head trained with
the adapter, the seed's scores recomputed here with scikit-learn from the saved predictions, the head saved and
reloaded with the adapter, the merged export loaded by plain transformers, and the bundled data through `dvc exp run`
(finetune/tasks/classification.py)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, argument, copy_dvc_config, run_evaluate, run_merge, run_prepare
from test_pipeline_dvc import dvc, sh

from finetune.config.params import load_params
from finetune.errors import StageError


def classification_params(workdir: Path, **train):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["task"]["type"] = "classification"
    params["train"].update({"max_steps": 40, "eval_steps": 20, "save_steps": 20, "learning_rate": 1e-2, **train})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return load_params()


def test_prepare_maps_the_labels_once_and_refuses_a_label_training_never_saw(workdir):
    params = classification_params(workdir)
    stats = run_prepare(params)
    prepared = argument("prepare", "--out")
    meta = json.loads((prepared / "prepared.json").read_text())
    raw = {f"data/raw/toy.jsonl:{n}": json.loads(line)
           for n, line in enumerate((workdir / "data/raw/toy.jsonl").read_text().splitlines(), 1)}
    from conftest import prepared_rows

    train = prepared_rows(prepared, "train")
    assert meta["task"] == "classification" and meta["labels"] == sorted({raw[r["source"]]["label"] for r in train})
    assert stats["classes"] == len(meta["labels"]) and meta["label_counts"] == {
        label: sum(raw[r["source"]]["label"] == label for r in train) for label in meta["labels"]}
    for name in ("train", "validation", "test"):  # each record's class id names its own label; the text as it is
        for row in prepared_rows(prepared, name):
            assert meta["labels"][row["labels"][0]] == raw[row["source"]]["label"]
    test = prepared_rows(prepared, "test")
    assert all(r["prompt"] == raw[r["source"]]["prompt"] for r in test)
    assert stats["supervised_tokens_train"] == len(train)  # one class id trained on per example

    given = workdir / "data/raw/given_test.jsonl"  # a label the training split has none of, on line 3
    given.write_text("".join(json.dumps({"prompt": f"Spell out the number {n}.", "label": label}) + "\n"
                             for n, label in ((1, "number_to_words"), (2, "number_to_words"), (3, "translate"))))
    settings = yaml.safe_load((workdir / "params.yaml").read_text())
    settings["data"]["test_path"] = "data/raw/given_test.jsonl"
    (workdir / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    before = (prepared / "train.arrow").read_bytes()
    with pytest.raises(StageError, match=r"given_test\.jsonl:3: label 'translate' \(test split\) is not among "
                                         r"the training split's"):
        run_prepare(load_params())
    assert (prepared / "train.arrow").read_bytes() == before  # the refused run left the prepared data as it was


def test_integer_labels_a_text_field_and_bad_records_by_line(workdir):
    rows = [{"text": f"review {i}: {'great' if i % 2 else 'awful'} product", "label": i % 2} for i in range(60)]
    rows[7] = {"text": "no label here", "label": [1]}
    path = workdir / "data/raw/toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = classification_params(workdir)
    with pytest.raises(StageError, match=r"toy\.jsonl:8: field 'label' is list, expected a string, an integer"):
        run_prepare(params)
    rows[7] = {"text": "fine", "label": 1}
    rows[9] = {"sentence": "the text under another name", "label": 1}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(StageError, match=r"toy\.jsonl:10: field 'text' is missing"):
        run_prepare(params)
    del rows[9]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_prepare(params)
    meta = json.loads((argument("prepare", "--out") / "prepared.json").read_text())
    assert meta["labels"] == ["0", "1"]  # integers, by their names

    from finetune.tasks.classification import example_of

    assert example_of({"t": "x", "y": True}, "t", "y") == (("x", "true"), None)
    assert example_of({"t": "x", "y": " spam "}, "t", "y") == (("x", "spam"), None)
    assert example_of({"t": 3, "y": "a"}, "t", "y")[1] == ("wrong_type", "field 't' is int, expected a string")


def test_a_rare_class_keeps_a_training_example_and_one_class_is_refused(workdir, capsys):
    path = workdir / "data/raw/toy.jsonl"
    rows = [{"text": f"text number {i}", "label": "ab"[i % 2]} for i in range(80)]
    for seed in range(10):  # a plain shuffle: some of these seeds put the one 'rare' example out of training
        settings = yaml.safe_load((workdir / "params.yaml").read_text())
        settings["data"].update(seed=seed, stratify=False)
        (workdir / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"text": "odd one", "label": "rare"}]))
        run_prepare(classification_params(workdir))
        meta = json.loads((argument("prepare", "--out") / "prepared.json").read_text())
        assert meta["labels"] == ["a", "b", "rare"] and meta["label_counts"]["rare"] == 1
    assert "one example of each moved from validation/test to training" in capsys.readouterr().err
    path.write_text("".join(json.dumps({"text": r["text"], "label": "a"}) + "\n" for r in rows))
    with pytest.raises(StageError, match="the training split has 1 label\\(s\\) \\(a\\): classification needs "
                                         "at least 2 classes"):
        run_prepare(load_params())


def test_no_label_field_is_one_clear_error(workdir):
    params = classification_params(workdir)
    settings = yaml.safe_load((workdir / "params.yaml").read_text())
    settings["task"]["label_field"] = "intent"
    (workdir / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    with pytest.raises(StageError, match=r"toy\.jsonl: no field 'intent' \(task\.label_field\)"):
        run_prepare(load_params())
    assert params.task.type == "classification"


def test_class_weights_are_balanced_and_weight_the_training_loss_only():
    from finetune.tasks.classification import class_weights, classifier_loss

    counts = {"a": 60, "b": 30, "c": 10}
    weights = class_weights(counts, ["a", "b", "c"], "balanced")
    assert weights == [round(100 / (3 * 60), 6), round(100 / (3 * 30), 6), round(100 / (3 * 10), 6)]
    assert class_weights(counts, ["a", "b", "c"], "none") is None
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    labels = torch.tensor([0, 1, 2])
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = sum(w * c for w, c in zip(weights, ce.tolist(), strict=True)) / 6  # over a batch accumulated of 6
    outputs = type("Out", (), {"logits": logits})
    assert classifier_loss(weights)(outputs, labels, num_items_in_batch=6).item() == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():  # validation: the plain mean, comparable between runs weighted differently
        assert classifier_loss(weights)(outputs, labels).item() == pytest.approx(ce.mean().item(), rel=1e-6)


@pytest.mark.parametrize("weights", ["none", "balanced"])
def test_gradient_accumulation_gives_the_step_of_the_whole_batch(workdir, weights):
    """A step of 8 examples at once equals 2 x 4 accumulated: the loss is summed and divided by the examples of the
    whole batch (the model's own loss, a micro-batch's mean, would count each micro-batch in full)."""
    from conftest import setup_trainer

    settings = yaml.safe_load((workdir / "params.yaml").read_text())
    settings["task"]["class_weights"] = weights
    (workdir / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    run_prepare(classification_params(workdir))

    def one_sgd_step(batch_size: int, accumulation: int):
        params = load_params()
        params.train.max_steps, params.train.logging_steps, params.train.warmup_steps = 1, 1, 0
        params.train.per_device_train_batch_size, params.train.gradient_accumulation_steps = batch_size, accumulation
        params.train.weight_decay, params.train.output_dir = 0.0, str(workdir / f"ckpt-{batch_size}x{accumulation}")
        trainer, _, _ = setup_trainer(params)
        trainer.args.optim, trainer.args.max_grad_norm = "sgd", 1e9
        trainer.train()
        loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
        return loss, {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    loss_1, weights_1 = one_sgd_step(8, 1)
    loss_2, weights_2 = one_sgd_step(4, 2)
    assert loss_2 == pytest.approx(loss_1, rel=1e-5)
    assert any("score" in name for name in weights_1)  # the head trains, beside the adapter
    for name, weight in weights_1.items():
        assert torch.allclose(weights_2[name], weight, atol=1e-7, rtol=1e-5), name


def test_the_memory_plan_of_a_classifier_has_no_vocabulary_logits(workdir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from finetune.memory import plan_run

    params = load_params()
    causal = plan_run(params, "fp32", AutoModelForCausalLM).summary_mb()
    head = plan_run(params, "fp32", AutoModelForSequenceClassification).summary_mb()
    assert causal["logits_mb"] > 0 and causal["evaluation_logits_mb"] > 0
    assert head["logits_mb"] == head["evaluation_logits_mb"] == 0  # a few logits a text, not one per token


def test_the_comparison_table_has_a_row_per_class():
    from finetune.comparison import per_class_markdown

    base = {"a": {"precision": 0.5, "recall": 1.0, "f1": 0.667, "support": 3}}
    tuned = {"a": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3},
             "b": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2}}
    lines = per_class_markdown(base, tuned).splitlines()
    assert "| a | 3 | 0.667 | 1.000 | +0.333 | 1.000 | 1.000 |" in lines
    assert "| b | 2 | 0.000 | 0.667 | +0.667 | 1.000 | 0.500 |" in lines  # a class the base never predicted
    assert per_class_markdown(None, None) == ""  # a generator's table has no such section


def predictions_with(model, tokenizer, texts: list[str]) -> tuple[list[str], np.ndarray]:
    """A plain transformers classifier's predicted labels and probabilities, batched the user's way."""
    tokenizer.padding_side = "right"
    with torch.no_grad():
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        probs = torch.softmax(model(**enc).logits.float(), -1).numpy()
    return [model.config.id2label[int(i)] for i in probs.argmax(-1)], probs


def recomputed(metrics: dict, records: list[dict]) -> tuple[list[str], list[str]]:
    """Check a classifier's scores against scikit-learn's (and the calibration error against its definition) from
    its saved predictions; returns the references and the predictions."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    y_true, y_pred = [r["reference"] for r in records], [r["prediction"] for r in records]
    assert metrics["examples"] == len(records)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-6)
    for average in ("weighted", "macro"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        assert (metrics[f"precision_{average}"], metrics[f"recall_{average}"], metrics[f"f1_{average}"]) == \
            pytest.approx((p, r, f), abs=1e-6)
    labels = sorted(set(y_true))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert list(metrics["per_class"]) == labels
    for label, *expected in zip(labels, p, r, f, s, strict=True):
        got = metrics["per_class"][label]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(expected, abs=1e-6)
    confidence = np.array([max(r["probabilities"].values()) for r in records])
    correct = np.array(y_true) == np.array(y_pred)
    bins = np.minimum((confidence * 10).astype(int), 9)
    ece = sum((bins == b).mean() * abs(correct[bins == b].mean() - confidence[bins == b].mean())
              for b in range(10) if (bins == b).any())
    assert metrics["ece"] == pytest.approx(ece, abs=1e-5)
    return y_true, y_pred


def test_a_classifier_trains_evaluates_reloads_and_merges(workdir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.tasks.classification import probabilities
    from finetune.training.run import TrainingRun

    settings = yaml.safe_load((workdir / "params.yaml").read_text())
    settings["task"]["class_weights"] = "balanced"
    (workdir / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    params = classification_params(workdir)
    run_prepare(params)
    run = TrainingRun(params, argument("train", "--prepared"), argument("train", "--metrics"),
                      argument("train", "--history"))
    trained = run.run()
    meta = json.loads((argument("train", "--prepared") / "prepared.json").read_text())
    assert trained["task"] == "classification" and not trained["packing"]  # one text per row
    assert list(trained["class_weights"]) == meta["labels"]
    assert all(w > 0 for w in trained["class_weights"].values())
    config = json.loads((Path(params.train.finetuned_dir) / "train_config.json").read_text())
    assert config["task"] == "classification" and config["labels"] == meta["labels"]

    from finetune.data.prepared import open_split

    test = open_split(argument("evaluate", "--test"))
    before = probabilities(run.trainer.model.eval(), test, run.trainer.processing_class.pad_token_id, 8)
    metrics, records = run_evaluate(params, "finetuned")  # the head and adapter loaded back from the folder
    after = np.array([[r["probabilities"][label] for label in meta["labels"]] for r in records])
    assert [meta["labels"][i] for i in before.argmax(-1)] == [r["prediction"] for r in records]
    assert np.abs(before - after).max() < 1e-5

    y_true, y_pred = recomputed(metrics, records)  # the seed's scores, with scikit-learn
    truth = np.array([meta["labels"].index(label) for label in y_true])
    assert metrics["eval_loss"] == pytest.approx(-np.log(after[np.arange(len(truth)), truth]).mean(), rel=1e-3)

    base, _ = run_evaluate(params, "base")  # the same base with its head untrained
    assert base["classes"] == metrics["classes"] and base["accuracy"] < metrics["accuracy"]

    from tools import predict

    texts = [r["text"] for r in records[:8]]
    assert predict.run(params, texts) == y_pred[:8]  # predict classifies as evaluate scored
    for answer, record in zip(predict.predictions(params, texts), records, strict=False):
        assert answer["probabilities"] == pytest.approx(record["probabilities"], abs=2e-6)
    with pytest.raises(StageError, match="--max-new-tokens: .* is a classifier, which generates nothing"):
        predict.run(params, texts, options={"max_new_tokens": 5})

    merged = run_merge(params)
    assert merged["prediction_agreement"] == 1.0 and merged["max_abs_logit_diff"] < 1e-4
    folder = Path(params.export.merged_dir)
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()  # no peft, no code of ours
    assert [plain.config.id2label[i] for i in range(plain.config.num_labels)] == meta["labels"]
    predicted, probs = predictions_with(plain, AutoTokenizer.from_pretrained(folder), [r["text"] for r in records])
    assert predicted == y_pred and np.abs(probs - after).max() < 1e-4


def test_qlora_and_full_fine_tuning_train_a_classifier(workdir):
    from conftest import run_train
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.data.prepared import open_split
    from finetune.tasks.classification import probabilities
    from finetune.training.run import TrainingRun

    settings = yaml.safe_load((workdir / "params.yaml").read_text())
    settings["quantization"]["bnb_4bit_compute_dtype"] = "float32"  # bf16's rounding would blur the comparison
    (workdir / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    params = classification_params(workdir, method="qlora", max_steps=6)
    run_prepare(params)
    run = TrainingRun(params, argument("train", "--prepared"), argument("train", "--metrics"),
                      argument("train", "--history"))
    trained = run.run()
    assert trained["method"] == "qlora" and trained["task"] == "classification"
    assert trained["quantization"].startswith("4-bit")
    head = {n: p for n, p in run.trainer.model.named_parameters() if ".modules_to_save." in n and "score" in n}
    assert head and all(p.requires_grad and p.dtype == torch.float32 for p in head.values())  # trained, in fp32
    test = open_split(argument("evaluate", "--test"))
    before = probabilities(run.trainer.model.eval(), test, run.trainer.processing_class.pad_token_id, 8)
    metrics, records = run_evaluate(params, "finetuned")  # the 4-bit base again, the head and adapter on top
    labels = json.loads((argument("train", "--prepared") / "prepared.json").read_text())["labels"]
    after = np.array([[r["probabilities"][label] for label in labels] for r in records])
    assert [labels[i] for i in before.argmax(-1)] == [r["prediction"] for r in records]
    # the head and adapter reloaded predict as trained; the probabilities agree to bitsandbytes' precision: for
    # inference on a CPU with AVX512-BF16 it repacks the 4-bit layers it can, their scales then in bf16
    assert np.abs(before - after).max() < 2e-2
    base, _ = run_evaluate(params, "base")
    assert metrics["eval_loss"] < base["eval_loss"]  # the head learnt something in six steps
    recomputed(metrics, records)

    params = classification_params(workdir, method="full", max_steps=6)
    run_train(params)
    folder = Path(params.train.finetuned_dir)
    metrics, records = run_evaluate(params, "finetuned")
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    predicted, _ = predictions_with(plain, AutoTokenizer.from_pretrained(folder), [r["text"] for r in records])
    assert predicted == [r["prediction"] for r in records]


def experiment_metrics(repo: Path, name: str) -> dict:
    """The metrics experiment `name` committed, as `dvc exp show` reads them, every file's merged."""
    metrics = {}
    for baseline in json.loads(dvc(repo, "exp", "show", "--json", "--no-fetch")):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                if (rev.get("name") or exp.get("name")) == name:
                    for file in rev["data"]["metrics"].values():
                        metrics |= file["data"]
    return metrics


@pytest.mark.e2e
def test_bundled_classification_through_dvc_exp_run(tmp_path):
    """The bundled model and data, `dvc exp run -S task.type=classification`, offline: the fine-tuned classifier
    far above its untrained head, in `dvc exp show`; its per-class bars, confusion matrix and reliability diagram
    drawn by `dvc plots show` in a browser."""
    import browser

    repo = tmp_path / "repo"
    repo.mkdir()
    for folder in ("stages", "finetune", "tools", "models/base"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore", "data/raw/transforms.jsonl"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    sh(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    copy_dvc_config(repo)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    dvc(repo, "exp", "run", "--name", "classify", "-S", "task.type=classification")
    metrics = experiment_metrics(repo, "classify")
    base, tuned = metrics["base"], metrics["finetuned"]
    print(f"bundled classification: accuracy {base['accuracy']} base (untrained head), {tuned['accuracy']} "
          f"fine-tuned; macro F1 {base['f1_macro']} -> {tuned['f1_macro']}")
    assert base["classes"] == tuned["classes"] == 7
    assert base["accuracy"] < 0.35 and tuned["accuracy"] >= 0.9
    assert metrics["accuracy"] == tuned["accuracy"]  # the headline leads `dvc exp show` with it
    assert metrics["merge_check"]["prediction_agreement"] == 1.0

    # a search over the classification metrics, as over any: class weighting, judged by accuracy
    (repo / "search.yaml").write_text(yaml.safe_dump({
        "strategy": "grid", "trials": 2, "seed": 0, "study_name": "cls", "storage": "search/cls.db",
        "objective": {"metric": "metrics/headline.json:accuracy", "direction": "maximize",
                      "secondary": {"metric": "metrics/headline.json:eval_loss", "direction": "minimize"}},
        "overrides": {"task.type": "classification", "train.max_steps": 30, "train.eval_steps": 15},
        "space": {"task.class_weights": {"type": "categorical", "choices": ["none", "balanced"]}}}))
    sh(repo, sys.executable, "-m", "tools.search", "--config", "search.yaml")
    board = json.loads((repo / "search/leaderboard.json").read_text())
    assert sorted(t["params"]["task.class_weights"] for t in board["trials"]) == ["balanced", "none"]
    for trial in board["trials"]:
        assert trial["state"] == "complete" and 0.5 < trial["value"] <= 1.0, trial  # its experiment's accuracy
    weighted = next(t for t in board["trials"] if t["params"]["task.class_weights"] == "balanced")["experiment"]
    assert sorted(experiment_metrics(repo, weighted)["training"]["class_weights"]) == sorted(json.loads(
        (repo / "data/prepared/prepared.json").read_text())["labels"])  # the weights the trial trained with

    dvc(repo, "exp", "apply", "classify")
    for model in ("base", "finetuned"):  # the scores, recomputed with scikit-learn from the saved predictions
        lines = (repo / f"outputs/predictions_{model}.jsonl").read_text().splitlines()
        recomputed(metrics[model], [json.loads(line) for line in lines])
    table = (repo / "metrics/compare.md").read_text()
    assert "## Per class" in table and "| date_to_words | " in table  # the per-class table a review reads
    answer = sh(repo, sys.executable, "-m", "tools.predict", "--model", "merged", "--jsonl",
                "Write the date 2024-02-29 in words.")
    line = json.loads(next(line for line in answer.splitlines() if line.startswith("{")))
    assert line["prediction"] == "date_to_words" and sum(line["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    page = Path(dvc(repo, "plots", "show").strip().splitlines()[-1]
                .removeprefix("file://"))
    if not browser.chromium():
        assert os.environ.get("REQUIRE_BROWSER") != "1", "no Chromium: install Debian's chromium (see README)"
        pytest.skip("Chromium not found: the plots page was written but not opened")
    plots, errors = browser.render(page, tmp_path / "plots.png")
    assert errors == []
    drawn = set(browser.plots_with_data(page))
    for plot_id in ("metrics_per_class_finetuned_json", "metrics_confusion_finetuned_json",
                    "metrics_calibration_finetuned_json", "metrics_per_class_base_json",
                    "metrics_confusion_base_json", "metrics_calibration_base_json"):
        assert plot_id in drawn, (plot_id, sorted(drawn))
        ink, coloured = plots[plot_id]
        # bars and cells in colour; a reliability diagram's points (one, at (1, 1), for a classifier always right
        # and sure of it) and the diagonal
        least = 50 if "calibration" in plot_id else 300
        assert ink > 3000 and coloured > least, (plot_id, plots[plot_id])
