"""A training run: setup, resume, train, save, finish, and every side effect of it done once, by the main process.

    run = TrainingRun(params, prepared_dir, metrics_file, history_dir)
    metrics = run.run()           # setup() -> resume() -> train() -> save() -> finish()

The run writes the fine-tuned model (params train.finetuned_dir), the step history (`history_dir`, DVCLive's files,
staged beside the checkpoints while the run is in progress) and `metrics_file`, in that order, and only then marks
the run finished: a run that stops anywhere before resumes from its last checkpoint. Nothing of the previous run's
outputs or history is touched until this run has finished training. With several processes, the others train and
wait at the barriers; the main one writes.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from finetune import metrics as M
from finetune.batching import padding_fraction, token_budget_batches
from finetune.config.params import Params, as_dict
from finetune.config.train import schedule_warnings
from finetune.data.chat import apply_chat
from finetune.data.prepared import read_meta, training_split
from finetune.errors import StageError
from finetune.io import write_json
from finetune.memory import check_plan, plan_run
from finetune.models import (
    check_target_modules,
    fit_chat_tokens,
    load_base_model,
    load_tokenizer,
    lora_config,
    trainable_parameters,
    trained_in_fp32,
    training_dtype,
    upcasts_embeddings,
)
from finetune.outputs import refuse_foreign, replacing
from finetune.quantization import prepare_4bit_training, quantization_summary, unpacked_4bit_layers
from finetune.resources import shared_threads
from finetune.tasks import task_for
from finetune.tasks.causal_lm import token_counts
from finetune.tracking import Tracking
from finetune.tracking.history import read_series, summarize
from finetune.training import ranks
from finetune.training.callbacks import (
    CheckpointMarker,
    DivergenceGuard,
    QuietProgressBar,
    StepTimer,
    guarded_trainer_class,
    trial_pruning,
)
from finetune.training.checkpoints import (
    FINISHED,
    LIVE_STAGING,
    checkpoint_step,
    fingerprint,
    load_finished_training,
    other_world_size,
    prepare_output_dir,
    resumable,
    trained_through,
    versions,
)
from finetune.training.precision import (
    choose_precision,
    out_of_memory,
    peak_against_plan,
    reset_peak_memory,
    resident_mb,
    training_arguments,
)
from finetune.training.progress import StepLog


class TrainingRun:
    def __init__(self, params: Params, prepared_dir: Path, metrics_file: Path, history_dir: Path):
        self.params, self.prepared_dir = params, Path(prepared_dir)
        self.metrics_file, self.history_dir = Path(metrics_file), Path(history_dir)
        self.output_dir, self.finetuned_dir = Path(params.train.output_dir), Path(params.train.finetuned_dir)
        self.staged_history = self.output_dir / LIVE_STAGING
        self.task = task_for(params.task.type if params.task else "causal_lm")
        self.main = ranks.is_main()

    def run(self) -> dict:
        started = time.perf_counter()
        if self.main:
            for folder, kind, name in ((self.output_dir, "checkpoints", "train.output_dir"),
                                       (self.finetuned_dir, "model", "train.finetuned_dir"),
                                       (self.history_dir, "live", str(self.history_dir))):
                refuse_foreign(folder, kind, name)
        self.fingerprint = fingerprint(self.params, self.prepared_dir, ranks.world_size())
        if problem := other_world_size(self.output_dir, self.params, self.prepared_dir, ranks.world_size()):
            raise StageError(problem)  # every process finds it: none waits at a barrier for the others
        self.setup()  # may refuse: nothing changed
        resume = self.resume()
        tracking = Tracking(self.params, self.output_dir, checkpoint_step(resume), self.staged_history) \
            if self.main else None
        elapsed = read_series(self.staged_history, "train/elapsed_s")
        self.trainer.add_callback(StepLog(tracking, self.trainer, self.timer, elapsed[-1][1] if elapsed else 0.0))
        try:
            self.train(resume)
            metrics = self.final_metrics(started)
            self.save(metrics)
        except BaseException as err:
            if tracking:
                tracking.finish({}, self.finetuned_dir, "killed" if isinstance(err, KeyboardInterrupt) else "failed")
            if isinstance(err, torch.cuda.OutOfMemoryError):
                raise out_of_memory(self.params, self.plan, self.output_dir) from None
            raise
        if tracking:
            tracking.finish(metrics, self.finetuned_dir, "finished")
        self.finish()
        return metrics

    def setup(self) -> None:
        """The Trainer, ready to train, the precision chosen and the base weights' memory; nothing trained or
        written."""
        from peft import get_peft_model
        from transformers import set_seed

        params, train, method = self.params, self.params.train, self.params.train.method
        precision = self.precision = choose_precision(train, torch.cuda.is_available())
        print(f"device: {precision.device}, precision: {precision.dtype} ({precision.reason})")
        print(f"method: {method}, base weights: {quantization_summary(params)}")

        set_seed(train.seed)
        train_rows, val_rows = (training_split(self.prepared_dir, name) for name in ("train", "validation"))
        batches = token_budget_batches(token_counts(train_rows), replace(train, packing=train.packing and
                                                                         self.task.packs), params.prepare) \
            if train.max_tokens_per_batch else None
        for message in schedule_warnings(train, len(train_rows), len(batches) if batches else None):
            print(f"warning: {message}", file=sys.stderr)
        tokenizer = load_tokenizer(params.model)
        self.meta = meta = read_meta(self.prepared_dir, self.task.name)
        self.chat = meta["chat"]
        apply_chat(tokenizer, self.chat)  # conversations: the template, tokens and EOS prepare used
        self.plan = plan_run(params, precision.dtype, self.task.model_class(), len(tokenizer),
                             bool(self.chat and self.chat["added_tokens"]), ranks.world_size())  # before any load
        check_plan(self.plan, params, precision.device, self.main)
        self.resident_at_start = resident_mb()
        frozen_dtype = training_dtype(method, precision.dtype, params.lora, params.quantization)
        model = load_base_model(params.model, params.quantization if method == "qlora" else None, frozen_dtype,
                                self.task.model_class(), fsdp_precision=precision.dtype
                                if getattr(params.distributed, "strategy", None) == "fsdp" and ranks.world_size() > 1
                                else None, options=self.task.model_options(meta.get("labels"),
                                                                           tokenizer.pad_token_id))
        new_tokens = fit_chat_tokens(model, tokenizer, self.chat)
        model.config.use_cache = False  # the KV cache is for generation; training does not use it
        if method == "qlora":
            prepare_4bit_training(model, upcasts_embeddings(params.quantization, params.lora, bool(new_tokens)))
            unpacked_4bit_layers(model)  # trainable layout, also after each validation
        self.base_memory_mb = model.get_memory_footprint() / 2**20
        if method in ("lora", "qlora"):
            check_target_modules(model, params.lora, params.model.model_name)
            model = trained_in_fp32(get_peft_model(model, lora_config(params.lora, self.task.peft_task_type,
                                                                      new_tokens)))
        collator = self.task.collator(tokenizer, train, params.prepare, model, train_rows)
        self.parameters = trainable, total = trainable_parameters(model)  # before FSDP shards them
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%), "
              f"base weights {self.base_memory_mb:.1f} MB")

        self.timer = StepTimer()
        self.pruning = trial_pruning(ranks.world_size())
        callbacks = [self.timer, DivergenceGuard(train.output_dir), CheckpointMarker(self.fingerprint),
                     *shared_threads()]  # the cores' share followed as other runs start and end
        loss, self.class_weights = self.task.loss(meta, params.task)  # None: the model's own loss
        self.trainer = guarded_trainer_class()(
            model=model, args=training_arguments(train, precision, params.distributed), train_dataset=train_rows,
            eval_dataset=val_rows, data_collator=collator, processing_class=tokenizer, compute_loss_func=loss,
            callbacks=callbacks + ([self.pruning] if self.pruning else []))
        self.trainer.token_batches = batches
        # StepLog prints one line per log; the Trainer's own printers would add each log again as a raw dict
        self.trainer.remove_callback(PrinterCallback)
        if self.trainer.pop_callback(ProgressCallback):  # on a terminal: keep the bar, without its dicts
            self.trainer.add_callback(QuietProgressBar)

    def resume(self) -> Path | None:
        """The checkpoint to resume from, if any; the main process clears what cannot be resumed, the others wait."""
        resume = prepare_output_dir(self.output_dir, self.fingerprint) if self.main else None
        ranks.barrier()
        if not self.main:  # the main process has left only the checkpoint to resume, if any
            resume = resumable(self.output_dir, self.fingerprint)
        self.peak_kind = reset_peak_memory(self.precision.device)
        if resume and self.main:
            print(f"resuming from {resume}: weights, optimizer, scheduler, RNG and data position")
        return resume

    def train(self, resume: Path | None) -> None:
        if resume and trained_through(resume):
            load_finished_training(self.trainer, resume)
        else:
            self.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        state = self.trainer.state
        if not any(e.get("step") == state.global_step and "eval_loss" in e for e in state.log_history):
            self.trainer.evaluate()  # make sure the final weights have a validation loss

    def save(self, metrics: dict) -> None:
        """The fine-tuned model, then the step history, then the metrics, each swapped into place whole."""
        ranks.barrier()
        # FSDP: every process gives its shards of what is saved (an adapter: not the frozen base) to the main one
        self.state_dict = ranks.gathered_state_dict(self.trainer.model, self.params.train.method != "full") \
            if self.trainer.is_fsdp_enabled else None
        if not self.main:
            return
        # again, before the first swap: files may have come while training
        refuse_foreign(self.finetuned_dir, "model", "train.finetuned_dir")
        refuse_foreign(self.history_dir, "live", str(self.history_dir))
        with replacing(self.finetuned_dir, "model", "train.finetuned_dir") as staged:
            self.save_model(staged)
        with replacing(self.history_dir, "live", str(self.history_dir)) as staged:
            shutil.copytree(self.staged_history, staged, dirs_exist_ok=True)
        write_json(self.metrics_file, M.nest("training", metrics))

    def save_model(self, folder: Path) -> None:
        """The adapter (or, for full fine-tuning, the whole model) as safetensors, the tokenizer with what the task
        saves in it (the prompt template as its chat template), generation_config.json and the resolved config."""
        trainer, params, precision = self.trainer, self.params, self.precision
        trainer.model.save_pretrained(folder, state_dict=self.state_dict)  # peft saves the adapter alone
        tokenizer = trainer.processing_class
        generation = self.task.generation_defaults(trainer.model, tokenizer)
        if generation is not None:
            generation.save_pretrained(folder)
        self.task.save_with_tokenizer(tokenizer, params.prepare, self.chat)
        tokenizer.save_pretrained(folder)
        write_json(folder / "train_config.json", {
            "task": self.task.name, "model": as_dict(params.model), "train": as_dict(params.train),
            "lora": as_dict(params.lora), "quantization": as_dict(params.quantization), "device": precision.device,
            "precision": precision.dtype, "precision_reason": precision.reason, "processes": ranks.world_size(),
            "strategy": ranks.strategy(trainer.model), "distributed": as_dict(params.distributed),
            "tokenizer_size": len(tokenizer), "chat": self.chat is not None, "pad_token_id": tokenizer.pad_token_id,
            "labels": self.meta.get("labels"), "class_weights": self.class_weights, "versions": versions()})

    def finish(self) -> None:
        ranks.barrier()
        if self.main:
            (self.output_dir / FINISHED).touch()  # last: a run that stops before this point resumes instead

    def final_metrics(self, started: float) -> dict:
        trainer, train, state, precision = self.trainer, self.params.train, self.trainer.state, self.precision
        train_losses = [e["loss"] for e in state.log_history if "loss" in e]
        eval_losses = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]
        trainable, total = self.parameters
        tokens_real, tokens_computed = ranks.summed(trainer.tokens_real, trainer.tokens_computed)
        pruned_at = self.pruning.pruned_at if self.pruning else None
        return {
            "task": self.task.name,
            "method": train.method,
            "quantization": quantization_summary(self.params),
            "device": precision.device,
            "precision": precision.dtype,
            "processes": ranks.world_size(),
            "strategy": ranks.strategy(trainer.model),
            "parameter_share_per_process": round(ranks.summed(ranks.parameter_share(trainer.model))[0]
                                                 / ranks.world_size(), 4),
            "final_train_loss": round(train_losses[-1], 6) if train_losses else None,
            "best_eval_loss": round(min(eval_losses), 6),
            "final_eval_loss": round(eval_losses[-1], 6),
            "steps": state.global_step,
            "epochs": round(state.epoch or 0.0, 4),
            "tokens_trained": int(ranks.summed(state.num_input_tokens_seen)[0]),
            # non-padding tokens per second of this session's steps (a resumed run counts only its own part)
            "tokens_per_second": round(tokens_real / self.timer.seconds, 1) if self.timer.seconds else None,
            "packing": train.packing and self.task.packs,
            **({"class_weights": self.class_weights} if self.class_weights else {}),
            "padding_fraction": padding_fraction(tokens_real, tokens_computed),
            "train_time_s": round(self.timer.seconds, 2),
            "wall_time_s": round(time.perf_counter() - started, 2),
            **peak_against_plan(self.plan, self.precision.device, self.resident_at_start, self.peak_kind),
            "base_weight_memory_mb": round(self.base_memory_mb, 6),
            "effective_batch_size": (train.per_device_train_batch_size * train.gradient_accumulation_steps
                                     * trainer.args.world_size),
            "trainable_params": trainable,
            "total_params": total,
            **({"pruned_at_step": pruned_at} if pruned_at else {}),
            "summary": summarize(self.staged_history),  # mean/min/max/last of each series DVCLive tracked
        }


def train(params: Params, prepared_dir: Path, metrics_file: Path, history_dir: Path) -> dict:
    """Train as params say, on `prepared_dir`'s train and validation splits; write the model (train.finetuned_dir),
    the step history (`history_dir`) and the metrics (`metrics_file`); return the metrics."""
    return TrainingRun(params, prepared_dir, metrics_file, history_dir).run()


def trainer_for(params: Params, prepared_dir: Path, run_fingerprint: str = "setup-only"):
    """The Trainer a run would train with, its precision and the base weights' memory: nothing trained or written
    (what benchmarks and tests look inside)."""
    run = TrainingRun(params, prepared_dir, Path(os.devnull), Path(os.devnull))
    run.fingerprint = run_fingerprint
    run.setup()
    return run.trainer, run.precision, run.base_memory_mb
