"""Trainer callbacks and the Trainer subclass a run uses, each given what it needs when it is created."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from finetune.batching import real_tokens
from finetune.errors import StageError
from finetune.io import write_json
from finetune.outputs import file_digest, written_files
from finetune.training import TRIAL_ENV, study_storage
from finetune.training.checkpoints import MARKER, latest_checkpoint
from finetune.training.ranks import barrier, is_main, summed, world_size


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


def diverged(step: int, what: str, output_dir: str) -> Diverged:
    last = latest_checkpoint(Path(output_dir))
    return Diverged(f"training diverged at step {step}: {what}. Last good checkpoint: {last or 'none'}. "
                    "Nothing final was written; lower train.learning_rate or check the data.")


class DivergenceGuard(TrainerCallback):
    """Stops before the optimizer applies a non-finite gradient. (fp16 is exempt: there, inf gradients are how the
    gradient scaler finds its scale, and it skips those steps itself.)"""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16:
            return
        # this process's gradients; under FSDP its shards (a DTensor's local part), where a non-finite one on any
        # process must stop every process, so none waits for the others at the next collective (under DDP every
        # process holds the same averaged gradients and comes to the same verdict alone)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        sharded = any(hasattr(g, "to_local") for g in grads)
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        bad = 0.0 if torch.isfinite(norm) else 1.0
        if (summed(bad)[0] if sharded else bad):
            raise diverged(state.global_step + 1, f"gradient norm is {norm.item()}", self.output_dir)


def trial_pruning(world_size: int):
    """The pruning callback when a search runs this training as a trial that reports to a pruner, else None."""
    if not os.environ.get(TRIAL_ENV):
        return None
    if world_size > 1:  # only the main process could hear the pruner
        raise StageError("a search trial that reports to a pruner trains on one process; set pruner: none in "
                         "the search config to run its trials on several")
    return TrialPruning(os.environ[TRIAL_ENV])


class TrialPruning(TrainerCallback):
    """When a hyperparameter search runs this training as a trial (tools.search sets DVC_FINETUNE_TRIAL), report
    each validation loss to the Optuna study and stop training early once the study's pruner says so."""

    def __init__(self, spec: str):
        import optuna

        found = json.loads(spec)  # a study does not store its pruner: the search passes its settings
        study = optuna.load_study(study_name=found["study"], storage=study_storage(found["storage"]),
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


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete, after the Trainer has written all of it, with each file's size and digest."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every process has written its part of the checkpoint
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if is_main() and path.is_dir():
            files = {name: {"size": (path / name).stat().st_size, "sha256": file_digest(path / name)}
                     for name in written_files(path) if name != MARKER}
            write_json(path / MARKER, {"fingerprint": self.fingerprint, "step": state.global_step,
                                       "processes": world_size(), "files": files})
        barrier()  # no process goes on (and may stop) before the checkpoint is marked


def guarded_trainer_class():
    from transformers import Trainer

    class GuardedTrainer(Trainer):
        """The Trainer, stopping at the first non-finite loss instead of averaging it into the logged loss, and
        counting real (non-padding, non-filler) tokens against all tokens computed."""

        tokens_computed = 0  # this process's micro-batches, padding and filler included
        tokens_real = 0
        token_batches = None  # a TokenBudgetBatches (train.max_tokens_per_batch), else batches of a fixed size

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            if self.args.fsdp_plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU \
                    or torch.accelerator.is_available():  # CPU training on a machine with an accelerator: left so
                return
            # accelerate turns FSDP on for accelerators only and on CPU would replicate the model without a word;
            # FSDP2's fully_shard itself shards over gloo on CPU, so the run takes the FSDP path as on GPUs
            plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            if state.mixed_precision != "no":
                plugin.set_mixed_precision(state.mixed_precision)
            state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True

        def _save_checkpoint(self, model, trial):
            # the main process makes the checkpoint's folders before any process writes its part into them (each
            # saves its random-number state, and under sharded FSDP its shards; accelerate has each make them)
            if is_main():
                from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME

                folder = Path(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
                folder.mkdir(parents=True, exist_ok=True)
                plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
                if plugin is not None and "SHARDED" in str(plugin.state_dict_type):
                    for name in (FSDP_MODEL_NAME, OPTIMIZER_NAME):
                        (folder / f"{name}_0").mkdir(exist_ok=True)
            barrier()
            super()._save_checkpoint(model, trial)

        def _run_epoch(self, model, epoch, *args, **kwargs):
            # the Trainer's own set_epoch does not reach a batch sampler behind accelerate's shard and skip wrappers
            if self.token_batches is not None:
                self.token_batches.set_epoch(epoch)
            return super()._run_epoch(model, epoch, *args, **kwargs)

        def get_train_dataloader(self):
            if self.token_batches is None:
                return super().get_train_dataloader()
            from torch.utils.data import DataLoader

            args = self.args
            return self.accelerator.prepare(DataLoader(
                self.train_dataset, batch_sampler=self.token_batches, collate_fn=self.data_collator,
                num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory))

        def training_step(self, model, inputs, num_items_in_batch=None):
            real = real_tokens(inputs)
            self.state.num_input_tokens_seen += real  # saved in checkpoints: survives a resume
            self.tokens_real += real
            self.tokens_computed += inputs["input_ids"].numel()
            loss = super().training_step(model, inputs, num_items_in_batch)
            # one verdict for all processes: one that stopped alone would leave the others waiting for it
            bad = 0.0 if torch.isfinite(loss) else 1.0
            if summed(bad)[0]:
                raise diverged(self.state.global_step + 1, f"training loss is {loss.item()}" if bad else
                               "the training loss of another process is not finite", self.args.output_dir)
            return loss

    return GuardedTrainer
