"""Device and precision, decided once from the validated params and the hardware, and the Trainer's arguments."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from finetune.config.train import TrainParams


@dataclass
class Precision:
    device: str  # "cuda" or "cpu"
    dtype: str  # "fp32", "fp16" (autocast + gradient scaling) or "bf16" (autocast)
    reason: str


def choose_precision(train: TrainParams, cuda: bool) -> Precision:
    """Pure decision from validated params and the hardware (Hardware.problems has refused the impossible)."""
    if cuda:
        if train.fp16:
            return Precision("cuda", "fp16", "train.fp16=true: fp16 autocast with dynamic gradient scaling")
        if train.bf16:
            return Precision("cuda", "bf16", "train.bf16=true: bf16 autocast (no gradient scaling needed)")
        return Precision("cuda", "fp32", "no train.fp16/bf16 set: full fp32 (set train.bf16=true for speed)")
    if train.bf16:
        return Precision("cpu", "bf16", "no CUDA device; train.bf16=true: bf16 autocast on CPU")
    return Precision("cpu", "fp32", "no CUDA device: training on CPU in fp32")


def fsdp_arguments(distributed, checkpointing: bool, processes: int) -> dict:
    """The Trainer's FSDP2 settings for params distributed.fsdp (strategy fsdp, on more than one process: alone, a
    process has nothing to shard with), else none. FSDP recomputes activations per decoder layer itself (the
    Trainer's own checkpointing would gather every layer once more); with no layer units (auto_wrap: none) it has
    none to recompute by, and the Trainer's checkpointing does it."""
    if distributed is None or distributed.strategy != "fsdp" or processes < 2:
        return {}
    fsdp = distributed.fsdp
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "reshard_after_forward": fsdp.sharding == "full_shard", "cpu_offload": fsdp.cpu_offload,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP" if fsdp.auto_wrap == "transformer_layer" else "NO_WRAP",
        "activation_checkpointing": checkpointing and fsdp.auto_wrap == "transformer_layer",
        "state_dict_type": "FULL_STATE_DICT" if fsdp.state_dict_type == "full" else "SHARDED_STATE_DICT"}}


def training_arguments(train: TrainParams, precision: Precision, distributed=None):
    from transformers import TrainingArguments

    from finetune.training.ranks import world_size

    fsdp = fsdp_arguments(distributed, train.checkpointing, world_size())
    return TrainingArguments(
        output_dir=train.output_dir,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,  # AdamW's decoupled decay
        warmup_steps=train.warmup_steps,
        lr_scheduler_type="linear",  # linear warmup, then linear decay to 0
        logging_steps=train.logging_steps,
        eval_strategy="steps",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        fp16=precision.dtype == "fp16",
        bf16=precision.dtype == "bf16",
        activation_checkpointing=train.checkpointing and not (fsdp and fsdp["fsdp_config"]["activation_checkpointing"]),
        ddp_find_unused_parameters=False,  # every trained parameter gets a gradient: no extra graph traversal
        activation_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=train.dataloader_num_workers,
        seed=train.seed,
        data_seed=train.seed,
        use_cpu=precision.device == "cpu",
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        torch_compile=train.torch_compile,
        include_num_input_tokens_seen="no",  # counted by GuardedTrainer, which knows packed rows' filler
        report_to=[],
        logging_nan_inf_filter=False,  # a NaN loss must show in the log, not be replaced by the running mean
        disable_tqdm=not sys.stderr.isatty(),  # in a log file, StepLog's one line per log instead of a bar
        **fsdp,
    )


def reset_peak_memory(device: str) -> str:
    """Measure the peak anew from here (once the model is loaded, so loading's transient copies are not counted):
    CUDA's allocator statistics, or on CPU the process's resident high-water mark (Linux: /proc/self/clear_refs).
    Returns what the peak will measure: a system that refuses the reset keeps the peak since the process began."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return "cuda_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return "cpu_rss_with_loading"
    return "cpu_rss"


def resident_mb() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as status:  # VmHWM: what clear_refs resets (getrusage's maximum is not)
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**10


def peak_memory(device: str, resident_at_start: float | None = None, kind: str | None = None) -> dict:
    """The peak memory since reset_peak_memory and what it measures: CUDA memory allocated, or the process's resident
    set on CPU, there also how far it rose above `resident_at_start` (before the model loaded: the libraries' share
    excluded, as in the plan's estimate)."""
    peak = peak_memory_mb(device)
    kind = kind or ("cuda_allocated" if device == "cuda" else "cpu_rss")
    out = {"peak_memory_mb": round(peak, 1), "peak_memory_kind": kind}
    if device == "cpu" and resident_at_start is not None:
        out["peak_memory_above_start_mb"] = round(peak - resident_at_start, 1)
    return out


def out_of_memory(params, plan, output_dir) -> Exception:
    """A CUDA out-of-memory error in training as one message naming the knobs, not a traceback."""
    import torch

    from finetune.errors import StageError
    from finetune.memory import micro_batch_tokens
    from finetune.training.checkpoints import latest_checkpoint

    train = params.train
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    budget = train.max_tokens_per_batch or f"null (up to {micro_batch_tokens(train, params.prepare)})"
    last = latest_checkpoint(output_dir)
    return StageError(
        f"out of GPU memory while training (peak {peak:.1f} GiB allocated; the memory plan estimated "
        f"{plan.total / 2**30:.1f} GiB). Each of these lowers the memory of a step: train.max_tokens_per_batch "
        f"(now {budget}) or train.per_device_train_batch_size (now {train.per_device_train_batch_size}) with more "
        f"train.gradient_accumulation_steps (now {train.gradient_accumulation_steps}) to keep the batch; "
        f"train.gradient_checkpointing: true (now {'on' if train.checkpointing else 'off'}); prepare.max_length "
        f"(now {params.prepare.max_length}); train.method: qlora (now {train.method}). "
        + (f"Rerunning resumes from {last}." if last else "No checkpoint was written yet."))


def peak_against_plan(plan, device: str, resident_at_start: float, kind: str | None) -> dict:
    """The measured peak beside the memory plan's estimate, and their ratio (on CPU, the rise above the start)."""
    peak = peak_memory(device, resident_at_start, kind)
    measured = peak.get("peak_memory_above_start_mb", peak["peak_memory_mb"])
    return {**peak, "memory_plan": plan.summary_mb(), "peak_over_plan": round(measured * 2**20 / plan.total, 3)}
