"""params `train`: the Trainer's settings, and what a run of them on a given number of examples would do."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainParams:
    method: Literal["lora", "qlora", "full"] = "lora"  # qlora: 4-bit base (see quantization); full: every weight
    output_dir: str = "models/checkpoints"  # Trainer checkpoints (every save_steps)
    finetuned_dir: str = "models/finetuned"  # the adapter (or full model), tokenizer and resolved config
    num_train_epochs: float = 4.0
    max_steps: int = -1  # > 0 overrides num_train_epochs; handy for quick experiments
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1  # effective batch = per-device batch x this x processes
    learning_rate: float = 8e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    logging_steps: int = 20
    save_steps: int = 160
    eval_steps: int = 80
    save_total_limit: int = 2
    fp16: bool = False  # CUDA only: fp16 autocast with gradient scaling
    bf16: bool = False  # bf16 autocast on CUDA (Ampere+) or CPU
    # recompute activations in backward: less memory, ~30% slower; auto: on for qlora (big models), off otherwise
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    max_tokens_per_batch: int | None = None  # bound each micro-batch's tokens (padding/filler included)
    memory_plan: Literal["enforce", "warn"] = "enforce"  # a run the plan says cannot fit the GPU: refuse | warn
    packing: bool = True  # several examples per row, no attention across them: no compute spent on padding
    group_by_length: bool = False  # without packing: batch examples of similar length to cut padding
    torch_compile: bool = False  # torch.compile the model (see the benchmark before turning it on)
    dataloader_num_workers: int = 0
    seed: int = 42

    @property
    def checkpointing(self) -> bool:
        """Whether activations are recomputed in the backward pass (gradient_checkpointing, auto resolved)."""
        return self.method == "qlora" if self.gradient_checkpointing == "auto" else self.gradient_checkpointing

    def problems(self) -> list[str]:
        out = []
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_steps", "eval_steps", "save_total_limit")
        for name in positive:
            if getattr(self, name) < 1:
                out.append(f"train.{name}: {getattr(self, name)} must be at least 1")
        if self.learning_rate <= 0:
            out.append(f"train.learning_rate: {self.learning_rate} must be positive")
        if self.max_steps < -1:
            out.append(f"train.max_steps: {self.max_steps} must be positive, or -1 to train num_train_epochs")
        elif self.num_train_epochs <= 0 and self.max_steps <= 0:
            out.append(f"train.num_train_epochs: {self.num_train_epochs} must be positive (or set train.max_steps)")
        for name in ("weight_decay", "warmup_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                out.append(f"train.{name}: {getattr(self, name)} must not be negative")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            out.append(f"train.max_tokens_per_batch: {self.max_tokens_per_batch} must be at least 1 (or null)")
        if self.fp16 and self.bf16:
            out.append("train.fp16 and train.bf16: both are true; choose one")
        if self.packing and self.group_by_length:
            out.append("train.group_by_length: only applies without packing (packed rows have no padding to cut); "
                       "set train.packing: false to use it")
        return out


WARMUP_SHARE = 0.25  # warmup longer than this share of the run leaves little of it at the full learning rate


def optimizer_steps(train: TrainParams, train_examples: int, batches: int | None = None) -> tuple[int, int]:
    """(optimizer steps of the run, of one epoch) on one process, as transformers counts them: batches rounded up,
    then accumulated batches rounded up, times the epochs rounded up. Packing lays a batch's examples into fewer
    rows but keeps the examples per batch, so it leaves the count alone; more processes take fewer steps.
    `batches`: the micro-batches of an epoch when a token budget forms them."""
    batches = batches or math.ceil(train_examples / train.per_device_train_batch_size)
    per_epoch = max(math.ceil(batches / train.gradient_accumulation_steps), 1)
    return (train.max_steps if train.max_steps > 0 else math.ceil(train.num_train_epochs * per_epoch)), per_epoch


def schedule_warnings(train: TrainParams, train_examples: int, batches: int | None = None) -> list[str]:
    """What in train's step-based schedule a run on `train_examples` examples would make pointless: warmup taking
    much of the run, no validation or checkpoint before the last step, no training loss logged. One line each, for
    the train stage to print. The step count is exact on one process and an upper bound on more, where each warning
    holds all the more."""
    steps, per_epoch = optimizer_steps(train, train_examples, batches)
    per_batch = f"in {batches} token-budget batches" if batches else \
        f"/ batch {train.per_device_train_batch_size}"
    how = ("train.max_steps" if train.max_steps > 0 else
           f"{train_examples} examples {per_batch} x {train.gradient_accumulation_steps} accumulated = "
           f"{per_epoch} per epoch, x {train.num_train_epochs:g} epochs")
    run = f"this run's optimizer steps (at most {steps}: {how})"
    every = max(steps // 4, 1)  # the suggestion: four times a run
    out = []
    if train.warmup_steps > WARMUP_SHARE * steps:
        then = ("the learning rate never reaches train.learning_rate" if train.warmup_steps >= steps else
                f"the learning rate peaks at step {train.warmup_steps} and decays to 0 over the last "
                f"{steps - train.warmup_steps}")
        out.append(f"train.warmup_steps: {train.warmup_steps} is {100 * min(train.warmup_steps / steps, 1):.0f}% or "
                   f"more of {run}: {then}; about 10% ({max(round(steps / 10), 1)}) is typical")
    if train.eval_steps >= steps:
        out.append(f"train.eval_steps: {train.eval_steps} leaves no validation before the last of {run}, so "
                   f"the validation loss is measured once, after training: no curve shows overfitting; e.g. {every}")
    if train.save_steps >= steps:
        out.append(f"train.save_steps: {train.save_steps} leaves no checkpoint before the last of {run}, so a run "
                   f"stopped before the end starts over; e.g. {every}")
    if train.logging_steps > steps:
        out.append(f"train.logging_steps: {train.logging_steps} exceeds {run}, so no training loss is logged; "
                   f"e.g. {every}")
    return out

