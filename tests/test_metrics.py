"""Each metric against values computed by hand."""

import pytest

from finetune import metrics as M


def test_exact_match_collapses_whitespace_but_keeps_case():
    assert M.exact_match(["a  b ", "x", "April"], ["a b", "y", "april"]) == pytest.approx(100 / 3)


def test_bleu_corpus_and_sentence():
    # 1..4-gram precisions 6/7, 5/6, 4/5, 3/4; no brevity penalty: BLEU = (3/7) ** (1/4)
    out = M.bleu(["the cat sat on the mat today"], ["the cat sat on the mat"])
    assert out["bleu"] == pytest.approx(100 * (3 / 7) ** 0.25, abs=0.01)
    assert M.bleu(["same words here too", "x y z w"], ["same words here too", "x y z w"]) == \
        pytest.approx({"bleu": 100.0, "sentence_bleu": 100.0})


def test_rouge_f_measures():
    out = M.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert out["rouge1"] == pytest.approx(100 * 2 / 3)  # P = 3/3, R = 3/6
    assert out["rouge2"] == pytest.approx(100 * 4 / 7)  # P = 2/2, R = 2/5
    assert out["rougeL"] == pytest.approx(100 * 2 / 3)  # LCS = 3


def test_generation_stats():
    out = M.generation_stats(["a b a b", "c"])
    assert out["mean_length"] == 2.5
    assert out["distinct_1"] == pytest.approx(3 / 5)
    assert out["distinct_2"] == pytest.approx(2 / 3)
    assert out["repetition_rate"] == pytest.approx((1 / 3 + 0) / 2)


def test_weighted_classification():
    out = M.classification(["x", "x", "y", "y"], ["x", "y", "y", "y"], "token")
    assert out == pytest.approx({"token_accuracy": 0.75, "token_precision": (1 + 2 / 3) / 2,
                                 "token_recall": 0.75, "token_f1": (2 / 3 + 0.8) / 2})


def test_labels_are_parsed_and_unparseable_counted():
    labels = ["negative", "positive"]
    assert M.parse_label("Positive.", labels) == "positive"
    assert M.parse_label("negative\nbecause it is", labels) == "negative"
    assert M.parse_label("I think positive", labels) == M.UNPARSEABLE
    out = M.label_metrics(["Positive.", "I think positive", "negative"], ["positive", "positive", "negative"],
                          labels)
    assert out["label_accuracy"] == pytest.approx(2 / 3)
    assert out["label_unparseable"] == 1


def test_label_set_detection():
    assert M.detect_labels(["Yes", "no", "yes", "No."], max_labels=20) == ["no", "yes"]
    assert M.detect_labels(["one", "two", "three"], max_labels=20) is None  # each label seen once: free text
    assert M.detect_labels(["a", "b", "c", "a", "b", "c"], max_labels=2) is None


def test_directions():
    assert M.direction("eval_loss") == "lower" and M.direction("perplexity") == "lower"
    assert M.direction("exact_match") == "higher" and M.direction("mean_length") == "neutral"
    # the training series' summaries take the direction of their series
    assert M.direction("summary.eval_loss.min") == "lower" and M.direction("summary.train_loss.last") == "lower"
    assert M.direction("summary.learning_rate.max") == "neutral" and M.direction("summary.grad_norm.mean") == "neutral"
    assert M.direction("summary.tokens_per_second.mean") == "cost"  # measured: varies from run to run
    assert M.better_when("summary.tokens_per_second.mean") == "higher"
