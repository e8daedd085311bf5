"""Small and labelled datasets: a stratified split keeps each label's share, and what makes the metrics noisy or the
training schedule pointless is said, once, as a warning."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import prepared_rows, run_prepare, setup_trainer

from finetune.config.data import DataParams
from finetune.config.evaluate import EvaluateParams
from finetune.config.params import load_params
from finetune.config.train import TrainParams, optimizer_steps, schedule_warnings
from finetune.data.splits import rare_labels_warning, small_test_warning, split_examples, split_labels
from finetune.errors import StageError


def labelled(counts: dict[str, int]) -> list[str]:
    """Labels in a scrambled but fixed order, as a file would hold them."""
    labels = [label for label, n in counts.items() for _ in range(n)]
    return [labels[(i * 7919) % len(labels)] for i in range(len(labels))]  # 7919 is prime to every size here


@pytest.mark.parametrize("counts", [
    {"positive": 150, "negative": 150},  # the reported case: 300 examples, 50/50
    {"a": 60, "b": 30, "c": 10},
    {"spam": 270, "ham": 30},
    {"x": 41, "y": 33, "z": 17, "w": 9, "v": 3, "u": 2},  # some too rare for every split to hold one
])
@pytest.mark.parametrize("validation_ratio, test_ratio", [(0.05, 0.1), (0.1, 0.2), (0.15, 0.3)])
@pytest.mark.parametrize("seed", [0, 42])
def test_stratified_split_keeps_each_label_share_within_one_example(counts, validation_ratio, test_ratio, seed):
    labels = labelled(counts)
    items = list(range(len(labels)))
    split = split_examples(items, validation_ratio, test_ratio, seed, labels)
    plain = split_examples(items, validation_ratio, test_ratio, seed)
    assert {name: len(rows) for name, rows in split.items()} == {name: len(rows) for name, rows in plain.items()}
    assert sorted(split["train"] + split["validation"] + split["test"]) == items
    assert split == split_examples(items, validation_ratio, test_ratio, seed, labels)
    for rows in split.values():
        held = Counter(labels[i] for i in rows)
        for label, n in counts.items():
            assert abs(held[label] - len(rows) * n / len(labels)) < 1, (label, held, len(rows))


def test_the_reported_case_tests_on_15_of_each_label():
    labels = labelled({"positive": 150, "negative": 150})
    split = split_examples(list(range(300)), 0.05, 0.1, 42, labels)
    assert Counter(labels[i] for i in split["test"]) == {"positive": 15, "negative": 15}


def test_free_text_keeps_the_plain_split():
    """The seeded shuffle-then-cut, pinned: free-text data (the bundled data, say) splits as it always has."""
    assert split_examples(list(range(20)), 0.1, 0.2, seed=42) == {
        "train": [15, 18, 6, 12, 17, 10, 1, 11, 2, 16, 7, 8, 0, 3], "validation": [9, 13], "test": [19, 5, 14, 4]}
    free_text = [f"{n} plus {n} is {2 * n}" for n in range(300)]
    assert split_labels(free_text, DataParams(), EvaluateParams()) is None


def test_when_the_split_is_stratified():
    answers = ["Positive", "negative."] * 20
    normalized = ["positive", "negative"] * 20
    assert split_labels(answers, DataParams(), EvaluateParams()) == normalized
    assert split_labels(answers, DataParams(stratify=True), EvaluateParams(labels="off")) == normalized
    assert split_labels(answers, DataParams(), EvaluateParams(labels="off")) is None
    assert split_labels(answers, DataParams(stratify=False), EvaluateParams()) is None
    assert split_labels(answers, DataParams(), EvaluateParams(max_labels=2)) == normalized  # just enough
    many = [f"label {i % 30}" for i in range(90)]  # 30 labels: more than evaluate.max_labels
    assert split_labels(many, DataParams(), EvaluateParams()) is None
    assert split_labels(many, DataParams(), EvaluateParams(labels=["label 1"])) == many
    with pytest.raises(StageError, match=r"data.stratify: true, but the responses are not a label set: 30 distinct "
                                         r"answers in 90 examples .*evaluate.max_labels=20"):
        split_labels(many, DataParams(stratify=True), EvaluateParams())


def test_rare_labels_are_named_with_the_splits_that_miss_them():
    def examples(*labels):
        return list(labels)

    splits = {"train": examples("a", "a", "b", "c"), "validation": examples("a", "b"), "test": examples("a", "b")}
    assert rare_labels_warning(splits) == ("1 of 3 labels are too rare for every split to hold one: 'c' (1, none in "
                                           "validation or test); each split gets its share of a label rounded, "
                                           "here to 0")
    splits["validation"] = []  # a split given as a file (data.validation_path) is not the ratio split's to fill
    assert "none in test)" in rare_labels_warning(splits)
    splits["test"] += examples("c")
    assert rare_labels_warning(splits) is None


def test_small_test_split_warning_says_how_noisy():
    assert small_test_warning(30) == ("the test split has 30 examples: each is 3.3 points of exact match, and a 50% "
                                      "exact match is +/-18 points (95% interval); 100+ examples bring that to +/-10 "
                                      "(raise data.test_ratio or give data.test_path)")
    assert "each is 1.0 points" in small_test_warning(99)
    assert small_test_warning(100) is None


def test_prepare_stratifies_labelled_data_and_warns(workdir, capsys):
    reviews = [{"prompt": f"Review {i}: {'great' if i % 2 else 'dull'} film, {i} stars.",
                "response": "positive" if i % 2 else "negative"} for i in range(300)]
    (workdir / "data/raw/toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    params = load_params()
    params.data.validation_ratio, params.data.test_ratio = 0.05, 0.1
    stats = run_prepare(params)
    test = prepared_rows(workdir / "data/prepared", "test")
    assert Counter(row["response"] for row in test) == {"positive": 15, "negative": 15}
    assert stats["train_examples"] == 255
    out, err = capsys.readouterr()
    assert "split: stratified by 2 labels (data.stratify: auto)" in out
    assert err.splitlines().count("warning: " + small_test_warning(30)) == 1
    assert [line for line in err.splitlines() if line.startswith("warning:")] == ["warning: " + small_test_warning(30)]


DEFAULTS = TrainParams(num_train_epochs=4, per_device_train_batch_size=32, learning_rate=8e-3, warmup_steps=20,
                       logging_steps=20, save_steps=160, eval_steps=80)  # params.yaml's train section, as committed


def test_the_reported_schedule_warns_of_warmup_validation_and_checkpoints():
    """300 examples, 255 of them to train on: 32 optimizer steps, 20 of them warmup, eval and save never mid-run."""
    how = "this run's optimizer steps (at most 32: 255 examples / batch 32 x 1 accumulated = 8 per epoch, x 4 epochs)"
    assert schedule_warnings(DEFAULTS, 255) == [
        (f"train.warmup_steps: 20 is 62% or more of {how}: the learning rate peaks at step 20 and decays to 0 over "
         "the last 12; about 10% (3) is typical"),
        (f"train.eval_steps: 80 leaves no validation before the last of {how}, so the validation loss is measured "
         "once, after training: no curve shows overfitting; e.g. 8"),
        (f"train.save_steps: 160 leaves no checkpoint before the last of {how}, so a run stopped before the end "
         "starts over; e.g. 8"),
    ]
    assert schedule_warnings(DEFAULTS, 2550) == []  # the bundled data: 320 steps


@pytest.mark.parametrize("change, steps, fires", [
    ({"warmup_steps": 8}, 32, []),  # 25% exactly: fine
    ({"warmup_steps": 9}, 32, ["warmup_steps"]),
    ({"warmup_steps": 32}, 32, ["warmup_steps"]),  # never reaches the learning rate
    ({"eval_steps": 31, "save_steps": 31}, 32, []),
    ({"eval_steps": 32}, 32, ["eval_steps"]),  # the interval's only step is the last, which validates anyway
    ({"save_steps": 32}, 32, ["save_steps"]),
    ({"logging_steps": 32}, 32, []),
    ({"logging_steps": 33}, 32, ["logging_steps"]),
    ({"max_steps": 40, "logging_steps": 41}, 40, ["logging_steps"]),  # max_steps overrides the epochs
    ({"gradient_accumulation_steps": 3, "eval_steps": 11}, 12, []),  # 8 batches -> 3 steps an epoch
    ({"gradient_accumulation_steps": 3, "eval_steps": 12}, 12, ["eval_steps"]),
    ({"num_train_epochs": 2.5, "eval_steps": 20}, 20, ["eval_steps"]),
])
def test_each_schedule_warning_fires_exactly_when_it_should(change, steps, fires):
    params = TrainParams(**{**vars(DEFAULTS), "eval_steps": 4, "save_steps": 4, "logging_steps": 1,
                            "warmup_steps": 1, **change})
    assert optimizer_steps(params, 255)[0] == steps
    warnings = schedule_warnings(params, 255)
    assert [w.split(":")[0] for w in warnings] == [f"train.{name}" for name in fires]
    assert all(f"(at most {steps}: " in w for w in warnings)


def test_the_step_count_is_the_trainers_with_packing_and_accumulation(workdir):
    """Packing lays a batch into fewer rows but keeps its examples, so the Trainer takes the steps counted here."""
    params = load_params()
    params.train.max_steps, params.train.num_train_epochs = -1, 2.5
    params.train.per_device_train_batch_size, params.train.gradient_accumulation_steps = 4, 3
    params.train.eval_steps = params.train.save_steps = 1000
    assert params.train.packing
    run_prepare(params)
    trainer, _, _ = setup_trainer(params)
    trainer.train()
    examples = len(prepared_rows(workdir / "data/prepared", "train"))
    assert trainer.state.global_step == optimizer_steps(params.train, examples)[0] == 20  # ceil(23 / 3) x 2.5
