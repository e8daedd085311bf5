"""train: fine-tune the base model on the prepared train split with the Hugging Face Trainer: LoRA, QLoRA or full.

    dvc repro train
    dvc exp run -S train.learning_rate=1e-3 -S lora.r=16
    dvc exp run -S train.method=qlora        # 4-bit base (bitsandbytes), LoRA on top
    dvc exp run -S train.method=full -S train.learning_rate=5e-4
    python -m stages.train                   # the same, without DVC

Reads params `model`, `train`, `lora`, `quantization`, `tracking`, `prepare.max_length` (the row length of packed
batches, see stages/batching.py) and `prepare.template` (saved as the tokenizer's chat template). Writes the adapter
(or the full model) as safetensors, the tokenizer, generation_config.json and train_config.json (the resolved
config, device and precision) to train.finetuned_dir; Trainer checkpoints to train.output_dir; metrics/train.json
(including non-padding tokens/s, the padding fraction, and mean/min/max/last of every tracked series under
`summary`); and the step metrics through DVCLive, to train.output_dir/live while the
run is in progress and to metrics/live once it has finished (the DVC plots `loss`, `learning_rate`, `grad_norm`,
`throughput`), and to MLflow and W&B when params `tracking` enables them (stages/tracking.py). Method, quantization,
device and precision are decided once, printed with the reason, and recorded in the metrics. Nothing of the last
finished run's outputs is replaced before this run has finished training.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from stages import metrics as M
from stages.batching import PackedCollator, check_packing, real_tokens
from stages.common import (IGNORE_INDEX, StageError, chat_template, load_base_model, load_tokenizer, read_jsonl,
                           run_main, unpacked_4bit_layers, write_json)
from stages.outputs import CHECKPOINT_MARKER, claim, file_digest, refuse_foreign, replacing, written_files
from stages.params import LoraParams, Params, TrainParams, as_dict, load_params, schedule_warnings
from stages.tracking import LIVE_DIR, RUN_STATE, StepLog, Tracking, read_series, summarize

PREPARED_DIR = Path("data/prepared")
TRIAL_ENV = "DVC_FINETUNE_TRIAL"  # set by stages.search for a trial that reports to a pruner
METRICS_FILE = Path("metrics/train.json")


@dataclass
class Precision:
    device: str  # "cuda" or "cpu"
    dtype: str  # "fp32", "fp16" (autocast + gradient scaling) or "bf16" (autocast)
    reason: str


def choose_precision(train: TrainParams, cuda: bool) -> Precision:
    """Pure decision from validated params and the hardware (params.hardware_problems has refused the impossible)."""
    if cuda:
        if train.fp16:
            return Precision("cuda", "fp16", "train.fp16=true: fp16 autocast with dynamic gradient scaling")
        if train.bf16:
            return Precision("cuda", "bf16", "train.bf16=true: bf16 autocast (no gradient scaling needed)")
        return Precision("cuda", "fp32", "no train.fp16/bf16 set: full fp32 (set train.bf16=true for speed)")
    if train.bf16:
        return Precision("cpu", "bf16", "no CUDA device; train.bf16=true: bf16 autocast on CPU")
    return Precision("cpu", "fp32", "no CUDA device: training on CPU in fp32")


def lora_config(lora: LoraParams):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, target_modules=lora.target_modules,
                      lora_dropout=lora.lora_dropout, bias=lora.bias, task_type="CAUSAL_LM",
                      use_dora=lora.use_dora, use_rslora=lora.use_rslora,
                      modules_to_save=lora.modules_to_save)


def quantization_summary(params: Params) -> str:
    if params.train.method != "qlora":
        return "none"
    q = params.quantization
    return (f"4-bit {q.bnb_4bit_quant_type}{' double-quant' if q.bnb_4bit_use_double_quant else ''}, "
            f"{q.bnb_4bit_compute_dtype} compute")


def training_arguments(train: TrainParams, precision: Precision):
    from transformers import TrainingArguments

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
        activation_checkpointing=train.gradient_checkpointing,
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
    )


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def load_split(prepared_dir: Path, name: str) -> list[dict]:
    path = prepared_dir / f"{name}.jsonl"
    if not path.exists():
        raise StageError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_jsonl(path)]


class StepTimer(TrainerCallback):
    """Trainer callback timing optimizer steps only, so tokens/s is not diluted by evaluation and checkpoints."""

    def __init__(self):
        self.seconds = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._t


class Diverged(StageError):
    pass


class DivergenceGuard(TrainerCallback):
    """Stops before the optimizer applies a non-finite gradient. (fp16 is exempt: there, inf gradients are how the
    gradient scaler finds its scale, and it skips those steps itself.)"""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if not torch.isfinite(norm):
            raise diverged(state.global_step + 1, f"gradient norm is {norm.item()}", self.output_dir)


class TrialPruning(TrainerCallback):
    """When a hyperparameter search runs this training as a trial (stages.search sets DVC_FINETUNE_TRIAL), report
    each validation loss to the Optuna study and stop training early once the study's pruner says so."""

    def __init__(self, spec: str):
        import optuna

        found = json.loads(spec)  # a study does not store its pruner: the search passes its settings
        study = optuna.load_study(study_name=found["study"], storage=found["storage"],
                                  pruner=optuna.pruners.MedianPruner(**found["median_pruner"]))
        self.trial = optuna.trial.Trial(study, found["trial_id"])
        # the pruner ranks by the study's direction: a loss is reported negated when the objective is maximized
        self.sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        self.pruned_at: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics and self.pruned_at is None:
            self.trial.report(self.sign * metrics["eval_loss"], state.global_step)
            if self.trial.should_prune():
                self.pruned_at = state.global_step
                control.should_training_stop = True
                print(f"search: validation loss {metrics['eval_loss']:.4f} at step {state.global_step} trails the "
                      "other trials: stopping this trial early")


class QuietProgressBar(ProgressCallback):
    """The Trainer's progress bar, without the raw dict it writes for every log (StepLog writes a line instead)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def diverged(step: int, what: str, output_dir: str) -> Diverged:
    last = latest_checkpoint(Path(output_dir))
    return Diverged(f"training diverged at step {step}: {what}. Last good checkpoint: {last or 'none'}. "
                    "Nothing final was written; lower train.learning_rate or check the data.")


def guarded_trainer_class():
    from transformers import Trainer

    class GuardedTrainer(Trainer):
        """The Trainer, stopping at the first non-finite loss instead of averaging it into the logged loss, and
        counting real (non-padding, non-filler) tokens against all tokens computed."""

        tokens_computed = 0  # this process's micro-batches, padding and filler included
        tokens_real = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            real = real_tokens(inputs)
            self.state.num_input_tokens_seen += real  # saved in checkpoints: survives a resume
            self.tokens_real += real
            self.tokens_computed += inputs["input_ids"].numel()
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss):
                raise diverged(self.state.global_step + 1, f"training loss is {loss.item()}", self.args.output_dir)
            return loss

    return GuardedTrainer


# Resume. A checkpoint counts only once the Trainer has finished writing it and we have added a marker holding the
# fingerprint of everything that determines training (params, data, code, library versions) and the size and digest
# of each file. Resume takes the latest checkpoint whose marker matches this run and whose files match the marker;
# half-written ones and ones from another run are removed, corrupt ones are set aside as corrupt-checkpoint-N.
MARKER = CHECKPOINT_MARKER  # fingerprint.json
FINISHED = "FINISHED"  # written once a run completes: its checkpoints are results, not a run to resume
LIVE_STAGING = "live"  # in train.output_dir: the step history of the run in progress, published to metrics/live at
#                        the end, so metrics/live always holds the history of the last finished run


def fingerprint(params: Params, prepared_dir: Path) -> str:
    train = {k: v for k, v in as_dict(params.train).items() if k not in ("output_dir", "finetuned_dir")}
    code_dir = Path(__file__).parent
    identity = {
        "model": as_dict(params.model), "train": train, "lora": as_dict(params.lora),
        "row_length": params.prepare.max_length,
        "quantization": as_dict(params.quantization) if params.train.method == "qlora" else None,
        "data": {name: file_digest(prepared_dir / f"{name}.jsonl") for name in ("train", "validation")},
        "code": {name: file_digest(code_dir / name) for name in ("train.py", "batching.py", "common.py", "params.py")},
        "versions": versions(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def read_marker(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def checkpoint_problem(checkpoint: Path, fingerprint: str) -> str | None:
    """Why `checkpoint` cannot be resumed by the run of `fingerprint`, or None."""
    marker = read_marker(checkpoint)
    if marker is None:
        return "half-written"
    if marker.get("fingerprint") != fingerprint:
        return "from a run with other params, data or code"
    for name, expected in marker.get("files", {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"corrupt: {name} is missing"
        if path.stat().st_size != expected["size"] or file_digest(path) != expected["sha256"]:
            return f"corrupt: {name} is not the file that was saved ({path.stat().st_size:,} bytes, " \
                   f"{expected['size']:,} when saved)"
    return None


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint marked complete (of any run): what a divergence message points to."""
    return next((p for p in reversed(checkpoints(output_dir)) if read_marker(p) is not None), None)


def clear_run(output_dir: Path) -> None:
    """Remove what a run left in output_dir (the folder holds nothing else: params.path_problems checked), except
    the checkpoints set aside as corrupt, which stay for a look until removed by hand."""
    for entry in output_dir.iterdir():
        if entry.name in (FINISHED, RUN_STATE, LIVE_STAGING) or entry.name.startswith(("checkpoint-", "tmp-")):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def prepare_output_dir(output_dir: Path, fingerprint: str) -> Path | None:
    """The checkpoint to resume from, if any. Checkpoints that cannot be resumed are removed (or, when corrupt, set
    aside); a finished run's checkpoints and history are cleared."""
    claim(output_dir, "train.output_dir")
    if (output_dir / FINISHED).exists():
        print(f"the run that left {output_dir} finished: starting fresh")
        clear_run(output_dir)
        return None
    for path in reversed(checkpoints(output_dir)):
        problem = checkpoint_problem(path, fingerprint)
        if problem is None:
            return path
        if problem.startswith("corrupt"):
            aside = path.with_name(f"corrupt-{path.name}")
            for n in range(2, 1000):
                if not aside.exists():
                    break
                aside = path.with_name(f"corrupt-{path.name}.{n}")
            path.rename(aside)
            print(f"not resuming from {path}: {problem}; set aside as {aside}, trying the one before")
        else:
            print(f"not resuming from {path}: {problem}; removing it")
            shutil.rmtree(path)
    print(f"no checkpoint of this run in {output_dir}: starting fresh")
    clear_run(output_dir)
    return None


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete, after the Trainer has written all of it, with each file's size and digest."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if path.is_dir():
            files = {name: {"size": (path / name).stat().st_size, "sha256": file_digest(path / name)}
                     for name in written_files(path) if name != MARKER}
            write_json(path / MARKER, {"fingerprint": self.fingerprint, "step": state.global_step, "files": files})


def check_target_modules(model, lora: LoraParams, model_name: str) -> None:
    """Refuse LoRA targets that name no module of the model, listing the modules that could be targeted."""
    names = [name for name, _ in model.named_modules()]
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    for key in ("target_modules", "modules_to_save"):
        wanted = getattr(lora, key)
        if not wanted or wanted == "all-linear":
            continue
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise StageError(f"lora.{key}: {', '.join(missing)} names no module of {model_name}; its linear layers "
                             f"are {', '.join(linear)} (or use lora.target_modules: all-linear)")


def setup(params: Params, prepared_dir: Path = PREPARED_DIR, run_fingerprint: str | None = None):
    """The Trainer, ready to train, the precision chosen and the base weights' memory; nothing trained or written."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, set_seed

    train, method = params.train, params.train.method
    precision = choose_precision(train, torch.cuda.is_available())
    print(f"device: {precision.device}, precision: {precision.dtype} ({precision.reason})")
    print(f"method: {method}, base weights: {quantization_summary(params)}")

    set_seed(train.seed)
    train_rows, val_rows = load_split(prepared_dir, "train"), load_split(prepared_dir, "validation")
    for message in schedule_warnings(train, len(train_rows)):
        print(f"warning: {message}", file=sys.stderr)
    tokenizer = load_tokenizer(params.model)
    # A frozen LoRA base under autocast needs no fp32 copy; trained weights (full fine-tuning, or base copies that
    # LoRA trains: modules_to_save, biases) keep fp32 master weights, and peft keeps the adapter in fp32.
    base_trains = bool(params.lora.modules_to_save) or params.lora.bias != "none"
    frozen_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision.dtype, "float32") \
        if method == "lora" and not base_trains else "float32"
    model = load_base_model(params.model, params.quantization if method == "qlora" else None, frozen_dtype)
    base_memory_mb = model.get_memory_footprint() / 2**20
    model.config.use_cache = False  # the KV cache is for generation; training does not use it
    if method == "qlora":  # fp32 norms and embeddings, input grads for checkpointing through frozen 4-bit layers
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        unpacked_4bit_layers(model)  # trainable layout, also after each validation
    if method in ("lora", "qlora"):
        check_target_modules(model, params.lora, params.model.model_name)
        model = get_peft_model(model, lora_config(params.lora))
    if train.packing:
        collator = PackedCollator(tokenizer.pad_token_id, params.prepare.max_length)
        check_packing(model, collator, train_rows)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainable, total = trainable_parameters(model)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%), "
          f"base weights {base_memory_mb:.1f} MB")

    trainer = guarded_trainer_class()(
        model=model,
        args=training_arguments(train, precision),
        train_dataset=train_rows,
        eval_dataset=val_rows,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[StepTimer(), DivergenceGuard(train.output_dir),
                   CheckpointMarker(run_fingerprint or fingerprint(params, prepared_dir))],
    )
    if os.environ.get(TRIAL_ENV):
        trainer.add_callback(TrialPruning(os.environ[TRIAL_ENV]))
    return trainer, precision, base_memory_mb


def trainable_parameters(model) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):  # peft counts 4-bit weights at their unpacked size
        return model.get_nb_trainable_parameters()
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def generation_defaults(model, tokenizer):
    """The model's generation config with the saved tokenizer's EOS and padding ids (padding may be EOS, set by
    load_tokenizer). The sampling settings are evaluate's, which train does not read (a generation change must not
    retrain): the merge stage writes those into the export."""
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return generation


def save_finetuned(params: Params, trainer, precision: Precision) -> None:
    """The adapter (or, for full fine-tuning, the whole model) as safetensors, the tokenizer with prepare.template as
    its chat template, generation_config.json and the resolved config, written beside each other in a temporary
    folder, marked as ours and swapped into place at once."""
    with replacing(Path(params.train.finetuned_dir), "model", "train.finetuned_dir") as staged:
        trainer.model.save_pretrained(staged)  # peft saves the adapter alone
        generation_defaults(trainer.model, trainer.processing_class).save_pretrained(staged)
        trainer.processing_class.chat_template = chat_template(params.prepare.template)
        trainer.processing_class.save_pretrained(staged)
        write_json(staged / "train_config.json", {
            "model": as_dict(params.model), "train": as_dict(params.train), "lora": as_dict(params.lora),
            "quantization": as_dict(params.quantization), "device": precision.device, "precision": precision.dtype,
            "precision_reason": precision.reason, "versions": versions()})


def publish_history(staged_live: Path, live_dir: Path) -> None:
    """The finished run's step history (DVCLive's files) replaces metrics/live in one rename."""
    with replacing(live_dir, "live", str(live_dir)) as staged:
        shutil.copytree(staged_live, staged, dirs_exist_ok=True)


def run(params: Params, prepared_dir: Path = PREPARED_DIR, metrics_file: Path = METRICS_FILE,
        live_dir: Path = LIVE_DIR) -> dict:
    """Train, then write the fine-tuned model, the step history (live_dir) and the metrics, in that order, and only
    then mark the run finished: a run that stops anywhere before resumes from its last checkpoint. Nothing of the
    previous run's outputs or history is touched until this run has finished training."""
    started = time.perf_counter()
    output_dir, finetuned_dir = Path(params.train.output_dir), Path(params.train.finetuned_dir)
    for folder, kind, name in ((output_dir, "checkpoints", "train.output_dir"),
                               (finetuned_dir, "model", "train.finetuned_dir"), (live_dir, "live", str(live_dir))):
        refuse_foreign(folder, kind, name)
    run_fingerprint = fingerprint(params, prepared_dir)
    trainer, precision, base_memory_mb = setup(params, prepared_dir, run_fingerprint)  # may refuse: nothing changed
    resume = prepare_output_dir(output_dir, run_fingerprint)
    timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer))
    if precision.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if resume:
        print(f"resuming from {resume}: weights, optimizer, scheduler, RNG and data position")
    staged_live = output_dir / LIVE_STAGING
    tracking = Tracking(params, output_dir, int(resume.name.split("-")[-1]) if resume else None, staged_live)
    elapsed = read_series(staged_live, "train/elapsed_s")
    trainer.add_callback(StepLog(tracking, trainer, timer, elapsed[-1][1] if elapsed else 0.0))
    # StepLog prints one line per log; the Trainer's own printers would add each log again as a raw dict
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback):  # on a terminal: keep the bar, without its dicts
        trainer.add_callback(QuietProgressBar)
    try:
        if resume and trained_through(resume):
            load_finished_training(trainer, resume)
        else:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        state = trainer.state
        if not any(e.get("step") == state.global_step and "eval_loss" in e for e in state.log_history):
            trainer.evaluate()  # make sure the final weights have a validation loss
        metrics = final_metrics(params, trainer, timer, precision, base_memory_mb, started, staged_live)
        # again, before the first swap: files may have come while training
        refuse_foreign(finetuned_dir, "model", "train.finetuned_dir")
        refuse_foreign(live_dir, "live", str(live_dir))
        save_finetuned(params, trainer, precision)
        publish_history(staged_live, live_dir)
        write_json(metrics_file, M.nest(METRICS_FILE, metrics))
    except BaseException as err:
        tracking.finish({}, finetuned_dir, "killed" if isinstance(err, KeyboardInterrupt) else "failed")
        raise
    tracking.finish(metrics, finetuned_dir, "finished")
    (output_dir / FINISHED).touch()  # last: a run that stops before this point resumes instead of restarting
    return metrics


def trained_through(checkpoint: Path) -> bool:
    """Whether `checkpoint` holds the last step: a run that stopped after training (writing its outputs) resumes
    from there without training (the Trainer would run one step more than max_steps)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return state["global_step"] >= state["max_steps"]


def load_finished_training(trainer, checkpoint: Path) -> None:
    from transformers import TrainerState

    print(f"{checkpoint} holds the last training step: writing its outputs without training again")
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def final_metrics(params: Params, trainer, timer: StepTimer, precision: Precision, base_memory_mb: float,
                  started: float, history: Path) -> dict:
    train, state = params.train, trainer.state
    train_losses = [e["loss"] for e in state.log_history if "loss" in e]
    eval_losses = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]
    trainable, total = trainable_parameters(trainer.model)
    pruning = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TrialPruning)), None)
    return {
        "method": train.method,
        "quantization": quantization_summary(params),
        "device": precision.device,
        "precision": precision.dtype,
        "final_train_loss": round(train_losses[-1], 6) if train_losses else None,
        "best_eval_loss": round(min(eval_losses), 6),
        "final_eval_loss": round(eval_losses[-1], 6),
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "tokens_trained": int(state.num_input_tokens_seen),
        # non-padding tokens per second of this session's steps (a resumed run counts only its own part)
        "tokens_per_second": round(trainer.tokens_real / timer.seconds, 1) if timer.seconds else None,
        "packing": train.packing,
        "padding_fraction": (round(1 - trainer.tokens_real / trainer.tokens_computed, 4)
                             if trainer.tokens_computed else None),  # of the tokens computed, the share wasted
        "train_time_s": round(timer.seconds, 2),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "peak_memory_mb": round(peak_memory_mb(precision.device), 1),
        "peak_memory_kind": "cuda_allocated" if precision.device == "cuda" else "cpu_rss",
        "base_weight_memory_mb": round(base_memory_mb, 6),
        "effective_batch_size": (train.per_device_train_batch_size * train.gradient_accumulation_steps
                                 * trainer.args.world_size),
        "trainable_params": trainable,
        "total_params": total,
        **({"pruned_at_step": pruning.pruned_at} if pruning and pruning.pruned_at else {}),
        "summary": summarize(history),  # mean/min/max/last of each series DVCLive tracked
    }


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def main() -> None:
    params = load_params(training=True, writes=("train.output_dir", "train.finetuned_dir"))
    try:
        metrics = run(params)
    except KeyboardInterrupt:
        raise StageError(f"interrupted: nothing final was written; complete checkpoints in "
                         f"{params.train.output_dir} let the next run resume") from None
    print(f"trained {metrics['steps']} steps in {metrics['train_time_s']:.1f}s "
          f"({metrics['tokens_per_second'] or 0:,.0f} tokens/s): final training loss {metrics['final_train_loss']}, "
          f"best validation loss {metrics['best_eval_loss']}; saved to {params.train.finetuned_dir}, "
          f"every metric in {METRICS_FILE}")


if __name__ == "__main__":
    run_main(main)
