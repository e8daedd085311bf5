"""evaluate: score a model on the test split -- loss, perplexity, token metrics, batched generation, text metrics.

    dvc repro evaluate                        # the fine-tuned model (base + adapter, or the full model)
    dvc repro evaluate_base                   # the base model alone; cached, reruns only when its inputs change
    dvc exp run -S evaluate.max_new_tokens=64
    python -m stages.evaluate --model merged --test data/prepared/test.arrow \
        --predictions outputs/predictions_merged.jsonl --metrics metrics/eval_merged.json \
        --confusion metrics/confusion_merged.json --per-class metrics/per_class_merged.json \
        --calibration metrics/calibration_merged.json

Reads params `evaluate`, and `task` and `model` for the base or `train.finetuned_dir` / `export.merged_dir` for the
others (not the training ones: a generation setting never retrains; the fine-tuned model describes itself, task
included, in its train_config.json). Writes --metrics, --predictions (every prompt, reference and prediction; for
a classifier also each class's probability) and the plots' rows: --confusion (actual and predicted label per
example when the answers are labels, for DVC's confusion-matrix plot), --per-class (a classifier's precision,
recall and F1 per class) and --calibration (a classifier's reliability diagram); empty where the task has none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune import metrics as M
from finetune.config.params import load_params
from finetune.entrypoint import run_main
from finetune.evaluation import MODELS, evaluate
from finetune.io import write_json, write_jsonl
from finetune.resources import share_machine

PLOTS = ("confusion", "per_class", "calibration")  # the plot files: rows, or [] where the task draws none
# of params.yaml, checked here, by model
SECTIONS = {"base": ["task", "model", "evaluate", "quantization"], "finetuned": ["train", "evaluate"],
            "merged": ["train", "export", "evaluate"]}


def main() -> None:
    parser = argparse.ArgumentParser(description="Evaluate a model on the test split.")
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--test", type=Path, required=True, help="the prepared test split")
    for name in ("predictions", "metrics", *PLOTS):
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, required=True)
    args = parser.parse_args()
    share_machine()  # this run's share of the cores and GPUs of its own, before CUDA starts
    params = load_params(sections=SECTIONS[args.model])
    metrics, records, task = evaluate(params, args.model, args.test)
    write_jsonl(args.predictions, records)
    for name, rows in task.plots(records, params.evaluate).items():
        write_json(getattr(args, name), rows)
    write_json(args.metrics, M.nest(args.model, metrics))
    print(f"{args.model} on the test split: "
          + ", ".join(f"{k} {metrics[k]:g}" for k in M.HEADLINE if k in metrics) + f"; every metric in {args.metrics}")


if __name__ == "__main__":
    run_main(main)
