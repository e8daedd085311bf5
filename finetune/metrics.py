"""Text and classification metrics: pure functions over lists of strings or token ids, and which way each should move.

Units: exact match, BLEU and ROUGE are in points (0-100), as papers report them; accuracy, precision, recall and F1
(scikit-learn, weighted) and the generation rates are fractions (0-1).
"""

from __future__ import annotations

import re
import string

import numpy as np

# Every metric the pipeline writes, and which way it should move for a run to count as better. The review and the
# compare table read this and nothing else; a test checks that every metric in every written file is declared here.
#   higher / lower: a quality metric; moving the wrong way is a regression in the review.
#   cost:           lower is better, but measured on a shared machine (time, memory, throughput), so it varies from
#                   run to run: the review shows its direction and flags it only when given a --threshold of its own.
#   neutral:        a description of the run (counts, settings, sizes): no better way, never a regression.
HIGHER, LOWER, COST, NEUTRAL = "higher", "lower", "cost", "neutral"
DIRECTIONS: dict[str, str] = {
    # evaluate (metrics/eval_*.json), compare's deltas, the headline
    "eval_loss": LOWER, "perplexity": LOWER, "token_accuracy": HIGHER, "token_precision": HIGHER,
    "token_recall": HIGHER, "token_f1": HIGHER, "exact_match": HIGHER, "bleu": HIGHER, "sentence_bleu": HIGHER,
    "rouge1": HIGHER, "rouge2": HIGHER, "rougeL": HIGHER, "distinct_1": HIGHER, "distinct_2": HIGHER,
    "repetition_rate": LOWER, "mean_length": NEUTRAL, "examples": NEUTRAL,
    "label_accuracy": HIGHER, "label_precision": HIGHER, "label_recall": HIGHER, "label_f1": HIGHER,
    "label_unparseable": LOWER,
    # classification (task.type): the head's predictions and probabilities; per_class.<label>.<metric>
    "accuracy": HIGHER, "precision_weighted": HIGHER, "recall_weighted": HIGHER, "f1_weighted": HIGHER,
    "precision_macro": HIGHER, "recall_macro": HIGHER, "f1_macro": HIGHER, "ece": LOWER, "classes": NEUTRAL,
    "precision": HIGHER, "recall": HIGHER, "f1": HIGHER, "support": NEUTRAL, "class_weights": NEUTRAL,
    # prepare (metrics/prepare.json): sizes describe the data; bad records, truncation and drops lose some of it
    "train_examples": NEUTRAL, "validation_examples": NEUTRAL, "test_examples": NEUTRAL,
    "truncated": LOWER, "dropped_overlong": LOWER, "bad_records": LOWER,
    "bad_invalid_utf8": LOWER, "bad_invalid_json": LOWER, "bad_not_an_object": LOWER, "bad_duplicate_key": LOWER,
    "bad_field_count": LOWER, "bad_missing_field": LOWER, "bad_empty_field": LOWER, "bad_wrong_type": LOWER,
    "bad_invalid_conversation": LOWER, "bad_prompt_too_long": LOWER,
    "tokens_p50": NEUTRAL, "tokens_p90": NEUTRAL, "tokens_p95": NEUTRAL, "tokens_p99": NEUTRAL, "tokens_max": NEUTRAL,
    "tokens_mean": NEUTRAL, "supervised_tokens_train": NEUTRAL,
    # train (metrics/train.json)
    "final_train_loss": LOWER, "best_eval_loss": LOWER, "final_eval_loss": LOWER, "train_loss": LOWER,
    "steps": NEUTRAL, "processes": NEUTRAL, "parameter_share_per_process": NEUTRAL,
    "epochs": NEUTRAL, "epoch": NEUTRAL, "tokens_trained": NEUTRAL, "packing": NEUTRAL,
    "padding_fraction": LOWER, "base_weight_memory_mb": LOWER, "effective_batch_size": NEUTRAL,
    "trainable_params": NEUTRAL, "total_params": NEUTRAL, "pruned_at_step": NEUTRAL, "learning_rate": NEUTRAL,
    "grad_norm": NEUTRAL,
    "tokens_per_second": COST, "train_time_s": COST, "wall_time_s": COST, "elapsed_s": COST, "peak_memory_mb": COST,
    "peak_memory_above_start_mb": COST, "peak_over_plan": NEUTRAL,
    # the memory plan (train.json's memory_plan): estimated before the run, beside the measured peak
    "weights_mb": COST, "autocast_weight_copies_mb": COST, "trainable_params_mb": COST, "gradients_mb": COST,
    "optimizer_states_mb": COST,
    "activations_mb": COST, "logits_mb": COST, "evaluation_logits_mb": COST, "total_mb": COST,
    "fsdp_gathered_mb": COST, "weights_while_loading_mb": COST,
    "tokens_per_micro_batch": NEUTRAL, "gradient_checkpointing": NEUTRAL,
    # merge (metrics/merge.json): the export must behave as the adapter did
    "greedy_agreement": HIGHER, "max_abs_logit_diff": LOWER,
    "greedy_agreement_vs_4bit": HIGHER, "max_abs_logit_diff_vs_4bit": LOWER,
    "prediction_agreement": HIGHER, "prediction_agreement_vs_4bit": HIGHER,
}
# `cost` metrics where more is better (everything else declared `cost` is better lower).
MORE_IS_BETTER_COSTS = {"tokens_per_second"}

# What `dvc exp show` should lead with: the fine-tuned model's scores on the test split (metrics/headline.json).
HEADLINE = ("exact_match", "bleu", "rougeL", "eval_loss", "label_accuracy", "label_f1", "accuracy", "f1_macro")

# The one key each metric file (but the headline's) nests its numbers under: prepare's, train's, evaluate's of each
# model, merge's check and compare's deltas. Every column `dvc exp show` draws from them is then unique
# (`training.steps`, `finetuned.bleu`): DVC prefixes a name found in two files with the file's path, and one `--drop`
# pattern (DIAGNOSTICS_DROP, in the README) hides all of them, leaving the headline and the params.
GROUPS = ("prepared", "training", "base", "finetuned", "merged", "merge_check", "delta")
DIAGNOSTICS_DROP = "(prepared|training|base|finetuned|merge_check|delta)\\.|.*/"

KEYED_BY_CLASS = ("class_weights",)  # a value per class, named by its label
SUMMARY_STATS = ("mean", "min", "max", "last")  # of each training series, in metrics/train.json's `summary`


def base_name(key: str) -> str:
    """The metric a key measures: 'training.summary.eval_loss.min' -> 'eval_loss'; 'finetuned.bleu' -> 'bleu';
    'training.class_weights.<label>' -> 'class_weights'."""
    parts = key.split(".")
    keyed = [part for part in parts[:-1] if part in KEYED_BY_CLASS]
    if keyed:  # the class's name may hold dots itself
        return keyed[0]
    return parts[-2] if len(parts) >= 2 and parts[-1] in SUMMARY_STATS else parts[-1]


def direction(metric: str) -> str:
    """'higher', 'lower', 'cost' or 'neutral' for a metric name or a nested key; KeyError for an undeclared one."""
    name = base_name(metric)
    if name not in DIRECTIONS:
        raise KeyError(f"metric {metric!r} has no declared direction (finetune/metrics.py DIRECTIONS)")
    return DIRECTIONS[name]


def better_when(metric: str) -> str:
    """'higher', 'lower' or 'neutral': the way a metric is better, costs included."""
    way = direction(metric)
    if way == COST:
        return HIGHER if base_name(metric) in MORE_IS_BETTER_COSTS else LOWER
    return way


def gates(metric: str) -> bool:
    """Whether a worse value may fail the review by default: quality metrics do; costs (timings, memory,
    throughput) only with a threshold of their own; descriptions and the training series' summary statistics
    (`summary.*`, which restate the curves) never do."""
    return direction(metric) in (HIGHER, LOWER) and ".summary." not in f".{metric}"


def nest(group: str, metrics: dict) -> dict:
    """A metric file's content: its numbers under its group key (one of GROUPS)."""
    if group not in GROUPS:
        raise KeyError(f"no metric group {group!r}; the groups are {', '.join(GROUPS)}")
    return {group: metrics}


def unnest(data: dict) -> dict:
    """The numbers of a metric file read back: those under its group key, or the file as it is when it has none (the
    headline, or a file written before the grouping)."""
    if len(data) == 1 and next(iter(data)) in GROUPS and isinstance(next(iter(data.values())), dict):
        return next(iter(data.values()))
    return data


def normalize(text: str) -> str:
    """Whitespace-collapsed and stripped; case and punctuation are kept (they matter for '2023-04-05')."""
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(references)


def bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (one score over all segments) and the mean of sentence BLEU, both from sacrebleu."""
    import sacrebleu

    corpus = sacrebleu.corpus_bleu(predictions, [references]).score
    sentence = np.mean([sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references, strict=True)])
    return {"bleu": float(corpus), "sentence_bleu": float(sentence)}


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure from rouge-score, in points."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    return {k: 100.0 * float(np.mean([s[k].fmeasure for s in scores])) for k in ("rouge1", "rouge2", "rougeL")}


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def generation_stats(predictions: list[str]) -> dict[str, float]:
    """Mean length in words; distinct-1/2 (unique n-grams over all n-grams, whole corpus); repetition rate
    (mean over predictions of the share of word bigrams that repeat an earlier one in the same prediction)."""
    tokenized = [p.split() for p in predictions]
    out: dict[str, float] = {"mean_length": float(np.mean([len(w) for w in tokenized]))}
    for n in (1, 2):
        grams = [g for words in tokenized for g in _ngrams(words, n)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    repeats = []
    for words in tokenized:
        bigrams = _ngrams(words, 2)
        repeats.append(1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0)
    out["repetition_rate"] = float(np.mean(repeats))
    return out


def classification(y_true: list, y_pred: list, prefix: str) -> dict[str, float]:
    """Accuracy and weighted precision/recall/F1 (scikit-learn), over the classes present in y_true."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    labels = sorted(set(y_true))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="weighted", zero_division=0)
    return {f"{prefix}_accuracy": float(accuracy_score(y_true, y_pred)), f"{prefix}_precision": float(precision),
            f"{prefix}_recall": float(recall), f"{prefix}_f1": float(f1)}


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_label(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def detect_labels(references: list[str], max_labels: int) -> list[str] | None:
    """The label set, when references come from a small fixed set (each label seen at least twice on average)."""
    labels = sorted({normalize_label(r) for r in references})
    if 2 <= len(labels) <= max_labels and len(references) >= 2 * len(labels):
        return labels
    return None


UNPARSEABLE = "<unparseable>"


def parse_label(prediction: str, labels: list[str]) -> str:
    """The label a generation names: the whole normalized text, else its first line, else its first word."""
    text = normalize_label(prediction)
    first_line = normalize_label(prediction.strip().split("\n")[0]) if prediction.strip() else ""
    candidates = [text, first_line, text.split(" ")[0] if text else ""]
    return next((c for c in candidates if c in labels), UNPARSEABLE)


def label_metrics(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, float]:
    y_true = [normalize_label(r) for r in references]
    y_pred = [parse_label(p, labels) for p in predictions]
    out = classification(y_true, y_pred, "label")
    out["label_unparseable"] = sum(p == UNPARSEABLE for p in y_pred)
    return out


CALIBRATION_BINS = 10  # equal-width confidence bins of the expected calibration error and the reliability diagram


def classifier_scores(y_true, y_pred, confidence, classes: list[str]) -> dict:
    """A classifier's scores: accuracy, precision, recall and F1 weighted by support and macro-averaged
    (scikit-learn, over the classes in y_true or y_pred), each class's (`per_class`, by name), and the expected
    calibration error of its confidence (the top class's probability)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("weighted", "macro"):
        precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        out |= {f"precision_{average}": float(precision), f"recall_{average}": float(recall),
                f"f1_{average}": float(f1)}
    out["ece"] = expected_calibration_error(np.asarray(confidence), np.asarray(y_true) == np.asarray(y_pred))
    out["per_class"] = per_class([classes[i] for i in y_true], [classes[i] for i in y_pred])
    return out


def per_class(y_true: list[str], y_pred: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class (scikit-learn), by name, over the classes of y_true or
    y_pred (those the averages cover)."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = sorted(set(y_true) | set(y_pred))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {label: {"precision": round(float(p), 6), "recall": round(float(r), 6), "f1": round(float(f), 6),
                    "support": int(n)}
            for label, p, r, f, n in zip(labels, precision, recall, f1, support, strict=True)}


def _bins(confidence: np.ndarray) -> np.ndarray:
    """Each prediction's confidence bin: [0, 0.1), ..., [0.9, 1.0]."""
    return np.minimum((confidence * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Sum over confidence bins of |accuracy - mean confidence|, weighted by the bin's share of predictions
    (Guo et al., 2017): 0 for a classifier that is right as often as it is confident."""
    bins = _bins(confidence)
    return float(sum(abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
                     for b in np.unique(bins)))


def reliability(confidence: np.ndarray, correct: np.ndarray) -> list[dict]:
    """The reliability diagram's points: per non-empty confidence bin, its mean confidence, its accuracy and its
    number of predictions."""
    bins = _bins(confidence)
    return [{"confidence": round(float(confidence[bins == b].mean()), 6),
             "accuracy": round(float(correct[bins == b].mean()), 6), "predictions": int((bins == b).sum())}
            for b in np.unique(bins)]
