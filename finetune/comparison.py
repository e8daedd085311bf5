"""Base vs fine-tuned, metric by metric: the deltas, the headline, the Markdown table and the bar chart's rows."""

from __future__ import annotations

from finetune.io import markdown_table
from finetune.metrics import HEADLINE, better_when

# The bar chart's metrics, on one scale: points as they are, fractions (0-1) times 100.
POINTS = ("exact_match", "bleu", "sentence_bleu", "rouge1", "rouge2", "rougeL")

FRACTIONS = ("token_accuracy", "token_f1", "label_accuracy", "label_f1", "accuracy", "f1_weighted", "f1_macro")

ARROWS = {"higher": "↑", "lower": "↓", "neutral": "·"}


def compare(base: dict, finetuned: dict) -> dict[str, dict[str, float]]:
    """Every numeric metric present in both files."""
    shared = [k for k in finetuned if k in base and isinstance(base[k], (int, float))
              and isinstance(finetuned[k], (int, float))]
    return {k: {"base": base[k], "finetuned": finetuned[k], "delta": round(finetuned[k] - base[k], 6)}
            for k in shared}


def bar_rows(table: dict[str, dict[str, float]]) -> list[dict]:
    """One row per (metric, model) for the grouped bar chart, every score in points (0-100)."""
    rows = []
    for metric in [m for m in POINTS + FRACTIONS if m in table]:
        scale, name = (100, f"{metric} (%)") if metric in FRACTIONS else (1, metric)
        for model, key in (("base", "base"), ("fine-tuned", "finetuned")):
            rows.append({"metric": name, "model": model, "score": round(table[metric][key] * scale, 4)})
    return rows


def headline(table: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: table[k]["finetuned"] for k in HEADLINE if k in table}


def verdict(metric: str, delta: float) -> str:
    way = better_when(metric)
    if way == "neutral" or delta == 0:
        return ""
    return "better" if (delta > 0) == (way == "higher") else "worse"


def markdown(table: dict[str, dict[str, float]]) -> str:
    rows = [[metric, f"{ARROWS[better_when(metric)]} {better_when(metric)}", f"{row['base']:.4g}",
             f"{row['finetuned']:.4g}", f"{row['delta']:+.4g}", verdict(metric, row["delta"])]
            for metric, row in table.items()]
    lines = markdown_table(["metric", "better when", "base model", "fine-tuned", "change", ""], rows, "lcrrrl")
    return "# Base vs fine-tuned on the test split\n\n" + "\n".join(lines) + "\n"


def per_class_markdown(base: dict | None, finetuned: dict | None) -> str:
    """A classifier's per-class table (each class's support, F1 of both models and the change, and the fine-tuned
    model's precision and recall), for the review of a change; empty for a model without classes."""
    if not base or not finetuned:
        return ""
    rows = []
    for label, tuned in finetuned.items():
        before = base.get(label, {}).get("f1", 0.0)
        rows.append([label, tuned["support"], f"{before:.3f}", f"{tuned['f1']:.3f}", f"{tuned['f1'] - before:+.3f}",
                     f"{tuned['precision']:.3f}", f"{tuned['recall']:.3f}"])
    lines = markdown_table(["class", "test examples", "F1 base", "F1 fine-tuned", "change", "precision", "recall"],
                           rows, "lrrrrrr")
    return "\n## Per class (fine-tuned precision and recall)\n\n" + "\n".join(lines) + "\n"
