"""merge: fold the adapter into the base weights and export a standalone Hugging Face model (safetensors).

    dvc repro merge
    python -m stages.merge --test data/prepared/test.arrow --metrics metrics/merge.json
    python -m stages.evaluate --model merged ...   # score the export like any other model

Reads params `export`, `train.finetuned_dir` and evaluate's generation settings (`max_new_tokens`, `do_sample`,
`temperature`, `top_p`, saved as the export's generation_config.json). The result loads with
`AutoModelForCausalLM.from_pretrained` alone, no peft, and its tokenizer's chat template is the training prompt
template. Then it checks the export on export.check_examples test prompts against the adapter and writes --metrics
(finetune/export.py says how).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune.config.params import load_params
from finetune.entrypoint import run_main
from finetune.export import merge
from finetune.io import write_json
from finetune.metrics import nest
from finetune.resources import share_machine

SECTIONS = ["train", "export", "evaluate"]  # of params.yaml, checked here


def main() -> None:
    parser = argparse.ArgumentParser(description="Export the merged model and check it.")
    parser.add_argument("--test", type=Path, required=True, help="the prepared test split")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    share_machine()  # this run's share of the cores and GPUs of its own, before CUDA starts
    metrics = merge(load_params(sections=SECTIONS, writes=("export.merged_dir",)), args.test)
    write_json(args.metrics, nest("merge_check", metrics))
    agreeing = "greedy_agreement" if "greedy_agreement" in metrics else "prediction_agreement"  # a classifier's
    print(f"the merged model agrees with the adapter on {metrics[agreeing]:.0%} of "
          f"{metrics['examples']} test prompts (largest logit difference {metrics['max_abs_logit_diff']:.2g}); "
          f"{args.metrics}")


if __name__ == "__main__":
    run_main(main)
