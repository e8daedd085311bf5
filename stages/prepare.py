"""prepare: raw examples or conversations -> templated, tokenized, loss-masked train/validation/test splits.

    dvc repro prepare
    dvc exp run -S prepare.max_length=256 -S prepare.overlong=drop
    python -m stages.prepare --raw data/raw --out data/prepared --metrics metrics/prepare.json

Reads params `data`, `prepare`, `model` (for the tokenizer) and `evaluate.labels`, `evaluate.max_labels` (whether the
answers are labels, whose shares a stratified split keeps: data.stratify); the data files must lie in --raw, the
stage's declared input. Writes {train,validation,test}.arrow to --out (input_ids, labels with all but the trained
tokens masked to -100, and for test the text fields evaluate needs), prepared.json (how they were made) and
--metrics (examples per split, token-length percentiles, dropped, truncated and bad-record counts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune.config.params import load_params
from finetune.data.prepare import prepare
from finetune.entrypoint import run_main
from finetune.io import write_json
from finetune.metrics import nest
from finetune.resources import share_machine

SECTIONS = ["task", "data", "prepare", "model", "evaluate"]  # of params.yaml, checked here


def main() -> None:
    parser = argparse.ArgumentParser(description="Split and tokenize the raw data.")
    parser.add_argument("--raw", type=Path, required=True, help="the folder the data files must lie in")
    parser.add_argument("--out", type=Path, required=True, help="the prepared splits' folder")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    share_machine(gpus=False)  # this run's share of the cores (no GPU: it tokenizes)
    params = load_params(sections=SECTIONS, raw_dir=args.raw)
    stats = prepare(params, args.out)
    write_json(args.metrics, nest("prepared", stats))
    print(f"prepared {stats['train_examples']} training, {stats['validation_examples']} validation and "
          f"{stats['test_examples']} test examples ({stats['truncated']} truncated, {stats['dropped_overlong']} "
          f"dropped, {stats['bad_records']} bad records skipped); every count in {args.metrics}")


if __name__ == "__main__":
    run_main(main)
