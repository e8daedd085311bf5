"""compare: base vs fine-tuned, metric by metric, as JSON for DVC and as a Markdown table for reviewers.

    dvc repro compare

Reads the two evaluate stages' metric files (no params). Writes
- --headline: the fine-tuned model's headline scores (exact match, BLEU, ROUGE-L, eval loss; label accuracy and F1
  when the answers are labels), the columns `dvc exp show` leads with;
- --deltas: fine-tuned minus base per metric (the values themselves are in the eval files);
- --table: base vs fine-tuned, one row per metric, with the way each should move (Markdown);
- --scores: the quality scores on one 0-100 scale, drawn by `dvc plots show` as grouped bars
  (template stages/compare_bars.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from finetune.comparison import bar_rows, compare, headline, markdown, per_class_markdown
from finetune.entrypoint import run_main
from finetune.errors import StageError
from finetune.io import write_json, write_text
from finetune.metrics import nest, unnest

SECTIONS: list[str] = []  # of params.yaml: none


def load(path: Path) -> dict:
    if not path.exists():
        raise StageError(f"{path} not found: run the evaluate stages first (dvc repro evaluate evaluate_base)")
    try:
        return unnest(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as err:
        raise StageError(f"{path}: not valid JSON ({err}); rerun the evaluate stages (dvc repro -f evaluate "
                         "evaluate_base)") from None


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare the fine-tuned model with the base.")
    for name in ("base", "finetuned", "headline", "deltas", "table", "scores"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    base, finetuned = load(args.base), load(args.finetuned)
    table = compare(base, finetuned)
    write_json(args.headline, headline(table))
    write_json(args.deltas, nest("delta", {k: row["delta"] for k, row in table.items()}))
    write_json(args.scores, bar_rows(table))
    write_text(args.table, markdown(table) + per_class_markdown(base.get("per_class"), finetuned.get("per_class")))
    print("fine-tuned on the test split: " + ", ".join(f"{k} {v:g}" for k, v in headline(table).items())
          + f" ({args.table}: every metric against the base model)")


if __name__ == "__main__":
    run_main(main)
