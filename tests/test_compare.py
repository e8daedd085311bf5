from finetune.comparison import bar_rows, compare, markdown, verdict


def test_compare_gives_base_finetuned_delta_for_shared_numeric_metrics():
    table = compare({"exact_match": 10.0, "eval_loss": 2.0, "device": "cpu", "only_base": 1},
                    {"exact_match": 55.5, "eval_loss": 1.5, "device": "cpu"})
    assert table == {"exact_match": {"base": 10.0, "finetuned": 55.5, "delta": 45.5},
                     "eval_loss": {"base": 2.0, "finetuned": 1.5, "delta": -0.5}}


def test_verdict_follows_the_metric_direction():
    assert verdict("exact_match", 1.0) == "better" and verdict("exact_match", -1.0) == "worse"
    assert verdict("eval_loss", -0.1) == "better" and verdict("perplexity", 3.0) == "worse"
    assert verdict("mean_length", 2.0) == ""


def test_markdown_marks_direction_and_verdict():
    text = markdown({"eval_loss": {"base": 2.0, "finetuned": 1.5, "delta": -0.5}})
    assert "| eval_loss | ↓ lower | 2 | 1.5 | -0.5 | better |" in text


def test_bar_rows_put_every_score_on_one_points_scale():
    table = compare({"exact_match": 10.0, "token_accuracy": 0.25, "eval_loss": 2.0},
                    {"exact_match": 80.0, "token_accuracy": 0.9, "eval_loss": 0.5})
    assert bar_rows(table) == [
        {"metric": "exact_match", "model": "base", "score": 10.0},
        {"metric": "exact_match", "model": "fine-tuned", "score": 80.0},
        {"metric": "token_accuracy (%)", "model": "base", "score": 25.0},
        {"metric": "token_accuracy (%)", "model": "fine-tuned", "score": 90.0},
    ]  # a loss is not a 0-100 score: it stays in compare.md
