"""Text and classification metrics: pure functions over lists of strings or token ids, and which way each should move.

Units: exact match, BLEU and ROUGE are in points (0-100), as papers report them; accuracy, precision, recall and F1
(scikit-learn, weighted) and the generation rates are fractions (0-1).
"""

from __future__ import annotations

import re
import string

import numpy as np

# Which way a metric should move for a run to count as better (the compare stage and the review use this).
LOWER_IS_BETTER = {"eval_loss", "perplexity", "repetition_rate", "label_unparseable", "max_abs_logit_diff",
                   "padding_fraction", "truncated", "dropped_overlong", "peak_memory_mb", "base_weight_memory_mb"}
NEUTRAL = {"mean_length", "examples", "steps", "epochs", "tokens_trained", "trainable_params", "total_params",
           "effective_batch_size", "pruned_at_step", "learning_rate", "grad_norm"}  # informative, no better way
# Measured on a shared machine: they vary from run to run, so a review flags them only when given a threshold.
PERFORMANCE = {"tokens_per_second", "train_time_s", "wall_time_s", "peak_memory_mb"}


SUMMARY_STATS = ("mean", "min", "max", "last")  # of each training series, in metrics/train.json's `summary`


def base_name(key: str) -> str:
    """The metric a key measures: 'summary.eval_loss.min' -> 'eval_loss'; a nested 'a.b' -> 'b'."""
    parts = key.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-1] in SUMMARY_STATS else parts[-1]


def direction(metric: str) -> str:
    """'lower', 'higher' or 'neutral' (of a metric name, or a nested key such as 'summary.eval_loss.min')."""
    metric = base_name(metric)
    if metric in LOWER_IS_BETTER or metric.endswith(("_loss", "_time_s")) or metric.startswith("bad_"):
        return "lower"
    if metric in NEUTRAL or metric.endswith("_examples") or metric.startswith(("tokens_", "supervised_tokens")) \
            and metric != "tokens_per_second":
        return "neutral"
    return "higher"


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
