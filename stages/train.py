"""train: fine-tune the base model on the prepared train split with the Hugging Face Trainer: LoRA, QLoRA or full.

    dvc repro train
    dvc exp run -S train.learning_rate=1e-3 -S lora.r=16
    dvc exp run -S train.method=qlora        # 4-bit base (bitsandbytes), LoRA on top
    dvc exp run -S train.method=full -S train.learning_rate=5e-4
    dvc exp run -S distributed.nproc_per_node=2   # two processes (GPUs) on this node, PyTorch DDP
    dvc exp run -S distributed.nproc_per_node=8 -S distributed.strategy=fsdp   # the model sharded over 8 (FSDP2)
    python -m stages.train --prepared data/prepared --metrics metrics/train.json --history metrics/live
    torchrun --nnodes 2 --node_rank 0 --rdzv_endpoint host:29500 --nproc_per_node 8 -m stages.train ...

Reads params `model`, `train`, `lora`, `quantization`, `tracking`, `prepare` (max_length: the row length of packed
batches; template: saved as the tokenizer's chat template) and `distributed` (more than one process: they are
started through torch.distributed.run, finetune/training/launch.py; a stage a launcher started trains as started).
Writes the adapter (or the full model) as safetensors, the tokenizer, generation_config.json and train_config.json
(the resolved config, device and precision) to train.finetuned_dir; Trainer checkpoints to train.output_dir;
--metrics (including non-padding tokens/s, the padding fraction, and mean/min/max/last of every tracked series under
`summary`); and the step series through DVCLive, to train.output_dir/live while the run is in progress and to
--history once it has finished (the DVC plots `loss`, `learning_rate`, `grad_norm`, `throughput`), and to MLflow and
W&B when params `tracking` enables them. Method, quantization, device and precision are decided once, printed with
the reason, and recorded in the metrics. Nothing of the last finished run's outputs is replaced before this run has
finished training (finetune/training/run.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from finetune.config.hardware import Hardware
from finetune.config.params import load_params
from finetune.entrypoint import run_main
from finetune.errors import StageError
from finetune.resources import share_machine
from finetune.training import ranks
from finetune.training.launch import WORKER_ENV, die_with_parent, launch, launched
from finetune.training.run import train

SECTIONS = ["task", "model", "train", "lora", "quantization", "tracking", "prepare", "distributed"]  # checked here


def main() -> None:
    parser = argparse.ArgumentParser(description="Fine-tune the base model.")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepare stage's folder")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True, help="the finished run's step series (DVCLive)")
    args = parser.parse_args()
    if os.environ.get(WORKER_ENV):
        die_with_parent()
    # this run's share of the cores and GPUs of its own, one per process, before CUDA starts
    share_machine(processes=load_params(sections=["distributed"]).distributed.nproc_per_node)
    params = load_params(sections=SECTIONS, hardware=Hardware.detect(),
                         writes=("train.output_dir", "train.finetuned_dir"))
    if params.distributed.nproc_per_node > 1 and not launched():
        code = launch(params.distributed.nproc_per_node, "stages.train", sys.argv[1:])
        if code:
            raise StageError(f"the training processes stopped (exit status {code}); their errors are above")
        return
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
