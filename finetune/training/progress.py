"""What a training run prints while it trains: one line per log, with an estimate of the time left."""

from __future__ import annotations

import sys
import time

from transformers import TrainerCallback

from finetune.tracking import Tracking


class StepLog(TrainerCallback):
    """Each Trainer log (training every logging_steps, validation every eval_steps) as one record to every tracker,
    and one progress line on stderr: above the progress bar on a terminal, plain in a log file."""

    def __init__(self, tracking: Tracking, trainer, timer, elapsed_before: float = 0.0):
        self.tracking, self.trainer, self.timer = tracking, trainer, timer
        self.elapsed_before = elapsed_before  # of the run this one resumes

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.perf_counter(), state.global_step
        self.last = (self.trainer.tokens_real, self.timer.seconds)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            tokens, seconds = self.trainer.tokens_real - self.last[0], self.timer.seconds - self.last[1]
            self.last = (self.trainer.tokens_real, self.timer.seconds)
            record = {"train/loss": logs["loss"], "train/learning_rate": logs.get("learning_rate"),
                      "train/grad_norm": logs.get("grad_norm"), "train/epoch": logs.get("epoch"),
                      "train/tokens_per_second": tokens / seconds if seconds else None,
                      "train/elapsed_s": self.elapsed_before + time.perf_counter() - self.started}
        elif "eval_loss" in logs:
            record = {"eval/loss": logs["eval_loss"]}
        else:
            return  # the end-of-training summary the Trainer logs: metrics/train.json holds those
        if not state.is_world_process_zero:
            return  # one process logs for all
        record = {k: float(v) for k, v in record.items() if v is not None}
        self.tracking.log(state.global_step, record)
        done = state.global_step - self.first_step  # steps of this session: a resumed run's rate is its own
        left = (time.perf_counter() - self.started) / done * (state.max_steps - state.global_step) if done else None
        line = progress_line(state.global_step, state.max_steps, record, left)
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stderr)  # above the bar, which stays at the bottom
        else:
            print(line, file=sys.stderr, flush=True)


def rough_duration(seconds: float) -> str:
    """A remaining time as a person would say it: '~40s', '~3 min'. Steps of a shared machine vary by tens of
    percent, so more digits would only make the estimate jump."""
    if seconds < 60:
        return f"~{max(5, round(seconds / 5) * 5)}s"
    if seconds < 600:
        return f"~{seconds / 60:.1f} min".replace(".0 min", " min")
    return f"~{round(seconds / 60)} min"


def progress_line(step: int, max_steps: int, record: dict[str, float], left: float | None = None) -> str:
    """The README's step line: 'step 80/320 (25%): loss 0.6960, lr 0.00643, grad norm 2.87, 8,356 tokens/s,
    8s elapsed, ~25s left'; for a validation, 'step 80/320: validation loss 0.5866'."""
    if "eval/loss" in record:
        return f"step {step}/{max_steps}: validation loss {record['eval/loss']:.4f}"
    line = f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%): loss {record['train/loss']:.4f}"
    if "train/learning_rate" in record:
        line += f", lr {record['train/learning_rate']:.3g}"
    if "train/grad_norm" in record:
        line += f", grad norm {record['train/grad_norm']:.3g}"
    if "train/tokens_per_second" in record:
        line += f", {record['train/tokens_per_second']:,.0f} tokens/s"
    line += f", {record['train/elapsed_s']:.0f}s elapsed"
    if left is not None and 0 < step < max_steps:
        line += f", {rough_duration(left)} left"
    return line
