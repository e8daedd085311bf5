"""train: fine-tune the base model on the prepared train split with the Hugging Face Trainer: LoRA, QLoRA or full.

    dvc repro train
    dvc exp run -S train.learning_rate=1e-3 -S lora.r=16
    dvc exp run -S train.method=qlora        # 4-bit base (bitsandbytes), LoRA on top
    dvc exp run -S train.method=full -S train.learning_rate=5e-4
    python -m stages.train --prepared data/prepared --metrics metrics/train.json --history metrics/live

Reads params `model`, `train`, `lora`, `quantization`, `tracking` and `prepare` (max_length: the row length of packed
batches; template: saved as the tokenizer's chat template). Writes the adapter (or the full model) as safetensors,
the tokenizer, generation_config.json and train_config.json (the resolved config, device and precision) to
train.finetuned_dir; Trainer checkpoints to train.output_dir; --metrics (including non-padding tokens/s, the padding
fraction, and mean/min/max/last of every tracked series under `summary`); and the step series through DVCLive, to
train.output_dir/live while the run is in progress and to --history once it has finished (the DVC plots `loss`,
`learning_rate`, `grad_norm`, `throughput`), and to MLflow and W&B when params `tracking` enables them. Method,
quantization, device and precision are decided once, printed with the reason, and recorded in the metrics. Nothing
of the last finished run's outputs is replaced before this run has finished training (finetune/training/run.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune.config.hardware import Hardware
from finetune.config.params import load_params
from finetune.entrypoint import run_main
from finetune.errors import StageError
from finetune.training import ranks
from finetune.training.run import train

SECTIONS = ["model", "train", "lora", "quantization", "tracking", "prepare"]  # of params.yaml, checked here


def main() -> None:
    parser = argparse.ArgumentParser(description="Fine-tune the base model.")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepare stage's folder")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True, help="the finished run's step series (DVCLive)")
    args = parser.parse_args()
    params = load_params(sections=SECTIONS, hardware=Hardware.detect(),
                         writes=("train.output_dir", "train.finetuned_dir"))
    try:
        metrics = train(params, args.prepared, args.metrics, args.history)
    except KeyboardInterrupt:
        raise StageError(f"interrupted: nothing final was written; complete checkpoints in "
                         f"{params.train.output_dir} let the next run resume") from None
    if not ranks.is_main():
        return  # the main process reports for all
    print(f"trained {metrics['steps']} steps in {metrics['train_time_s']:.1f}s "
          f"({metrics['tokens_per_second'] or 0:,.0f} tokens/s): final training loss {metrics['final_train_loss']}, "
          f"best validation loss {metrics['best_eval_loss']}; saved to {params.train.finetuned_dir}, "
          f"every metric in {args.metrics}")


if __name__ == "__main__":
    run_main(main)
