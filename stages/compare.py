"""compare: base vs fine-tuned, metric by metric, as JSON for DVC and as a Markdown table for reviewers.

    dvc repro compare
    python -m stages.compare

Reads metrics/eval_base.json and metrics/eval_finetuned.json (no params). Writes metrics/compare.json, with
{"base": x, "finetuned": y, "delta": y - x} per metric, and metrics/compare.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.common import StageError, write_text, run_main, write_json
from stages.metrics import direction
from stages.params import load_params

BASE_FILE, FINETUNED_FILE = Path("metrics/eval_base.json"), Path("metrics/eval_finetuned.json")
ARROWS = {"higher": "↑", "lower": "↓", "neutral": "·"}


def compare(base: dict, finetuned: dict) -> dict[str, dict[str, float]]:
    """Every numeric metric present in both files."""
    shared = [k for k in finetuned if k in base and isinstance(base[k], (int, float))
              and isinstance(finetuned[k], (int, float))]
    return {k: {"base": base[k], "finetuned": finetuned[k], "delta": round(finetuned[k] - base[k], 6)}
            for k in shared}


def verdict(metric: str, delta: float) -> str:
    way = direction(metric)
    if way == "neutral" or delta == 0:
        return ""
    return "better" if (delta > 0) == (way == "higher") else "worse"


def markdown(table: dict[str, dict[str, float]]) -> str:
    lines = ["| metric | better when | base | fine-tuned | delta | |", "|---|:-:|--:|--:|--:|---|"]
    for metric, row in table.items():
        way = direction(metric)
        lines.append(f"| {metric} | {ARROWS[way]} {way} | {row['base']:.4g} | {row['finetuned']:.4g} "
                     f"| {row['delta']:+.4g} | {verdict(metric, row['delta'])} |")
    return "# Base vs fine-tuned on the test split\n\n" + "\n".join(lines) + "\n"


def load(path: Path) -> dict:
    if not path.exists():
        raise StageError(f"{path} not found: run the evaluate stages first (dvc repro evaluate evaluate_base)")
    return json.loads(path.read_text(encoding="utf-8"))


def main() -> None:
    load_params()  # reads no params, but refuses to run on an invalid params.yaml like every stage
    table = compare(load(BASE_FILE), load(FINETUNED_FILE))
    write_json("metrics/compare.json", table)
    write_text(Path("metrics/compare.md"), markdown(table))
    print(markdown(table))


if __name__ == "__main__":
    run_main(main)
