"""compare: base vs fine-tuned, metric by metric, as JSON for DVC and as a Markdown table for reviewers.

    dvc repro compare
    python -m stages.compare

Reads metrics/eval_base.json and metrics/eval_finetuned.json (no params). Writes
- metrics/headline.json: the fine-tuned model's headline scores (exact match, BLEU, ROUGE-L, eval loss; label
  accuracy and F1 when the answers are labels), the columns `dvc exp show` leads with;
- metrics/compare.json: fine-tuned minus base per metric (the values themselves are in the eval files);
- metrics/compare.md: base vs fine-tuned, one row per metric, with the way each should move;
- metrics/compare_scores.json: the quality scores on one 0-100 scale, drawn by `dvc plots show` as grouped bars
  (template stages/compare_bars.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.common import StageError, markdown_table, run_main, write_json, write_text
from stages.metrics import HEADLINE, HEADLINE_FILE, better_when, nest, unnest
from stages.params import load_params

BASE_FILE, FINETUNED_FILE = Path("metrics/eval_base.json"), Path("metrics/eval_finetuned.json")
SCORES_FILE = Path("metrics/compare_scores.json")
# The bar chart's metrics, on one scale: points as they are, fractions (0-1) times 100.
POINTS = ("exact_match", "bleu", "sentence_bleu", "rouge1", "rouge2", "rougeL")
FRACTIONS = ("token_accuracy", "token_f1", "label_accuracy", "label_f1")
ARROWS = {"higher": "↑", "lower": "↓", "neutral": "·"}
COMPARE_FILE = Path("metrics/compare.json")


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


def load(path: Path) -> dict:
    if not path.exists():
        raise StageError(f"{path} not found: run the evaluate stages first (dvc repro evaluate evaluate_base)")
    return unnest(path, json.loads(path.read_text(encoding="utf-8")))


def main() -> None:
    load_params()  # reads no params, but refuses to run on an invalid params.yaml like every stage
    table = compare(load(BASE_FILE), load(FINETUNED_FILE))
    write_json(HEADLINE_FILE, headline(table))
    write_json(COMPARE_FILE, nest(COMPARE_FILE, {k: row["delta"] for k, row in table.items()}))
    write_json(SCORES_FILE, bar_rows(table))
    write_text(Path("metrics/compare.md"), markdown(table))
    print("fine-tuned on the test split: " + ", ".join(f"{k} {v:g}" for k, v in headline(table).items())
          + " (metrics/compare.md: every metric against the base model)")


if __name__ == "__main__":
    run_main(main)
