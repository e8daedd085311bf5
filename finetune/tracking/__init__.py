"""Step metrics of a training run, to DVCLive (always) and to MLflow and Weights & Biases (when params.tracking says).

The training run hands `Tracking.log` one record of named series per Trainer log, at the optimizer step:

    train/loss  train/learning_rate  train/grad_norm  train/epoch  train/tokens_per_second  train/elapsed_s
    eval/loss

DVCLive writes each series to a history folder beside the checkpoints while the run is in progress; the run publishes
that folder to the train stage's declared history output (the files dvc.yaml's plots draw) once it has finished, so a
failed run never replaces the history of the last finished one. A resumed run keeps the history up to its
checkpoint's step and drops the rows after it (that part of the killed run is replayed)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from finetune.config.params import Params
from finetune.io import write_json
from finetune.tracking.history import history
from finetune.tracking.trackers import DvcLiveTracker, MlflowTracker, WandbTracker, repository_root

RUN_STATE = "tracking.json"  # in train.output_dir: the tracker runs a resumed training continues


class Tracking:
    """DVCLive and the enabled trackers, fed the same records. DVCLive is the pipeline's record: an error there stops
    training. MLflow and W&B are side channels: an error in one is reported, that tracker is left out for the rest of
    the run (its run marked failed), and training goes on.

    A resumed training continues the tracker runs it started, under the same names, and sends each tracker only the
    series steps it does not hold yet: per series, since the training and validation losses of one step are two
    logs, and a kill can fall between them. MLflow is asked what it holds, so each step reaches it exactly once;
    for W&B the state file in output_dir says, written after each log (a kill between W&B's write and the state's
    can send that one step twice). A tracker enabled only when the training resumes, or dropped before the kill
    after an error, is first given the history DVCLive kept up to the checkpoint."""

    def __init__(self, params: Params, output_dir: Path, resume_step: int | None, live_dir: Path):
        self.state_file = output_dir / RUN_STATE
        state = read_state(self.state_file) if resume_step is not None else {}
        self.runs = state.get("runs", {})
        self.held: dict[str, dict[str, int]] = state.get("held", {})  # tracker -> series -> its last step there
        self.run_name = state.get("run_name") or os.environ.get("DVC_EXP_NAME") or "train"
        self.live: DvcLiveTracker | None = None
        self.trackers: list = []  # the side channels: MLflow, W&B
        self.dropped: list = []
        try:
            self.live = DvcLiveTracker(live_dir, resume_step)
            root, tracking = repository_root(), params.tracking
            for name, tracker_class in (("mlflow", MlflowTracker), ("wandb", WandbTracker)):
                settings = getattr(tracking, name)
                if not settings.enabled:
                    continue
                tracker = tracker_class(settings, params, self.runs.get(name), settings.run_name or self.run_name,
                                        root)
                self.trackers.append(tracker)
                if resume_step is not None:
                    self.catch_up(tracker, live_dir)
                self.runs[name] = tracker.run_id
        except BaseException:
            self.finish({}, Path(), "failed")  # the trackers already started
            raise
        self.save()

    def catch_up(self, tracker, live_dir: Path) -> None:
        """Send a resumed training's tracker the steps up to the checkpoint that its run lacks: all of them for a
        run started now, the ones after it was dropped for a run that failed mid-way."""
        if tracker.name not in self.runs:
            held = {}
        elif hasattr(tracker, "held"):
            held = tracker.held()  # what the tracker itself holds
        else:
            held = self.held.get(tracker.name, {})
        for step, record in history(live_dir).items():  # DVCLive's, kept up to the checkpoint
            if new := unsent(held, step, record):
                tracker.log(step, new)
                held.update(dict.fromkeys(new, step))
        self.held[tracker.name] = held

    def save(self) -> None:
        write_json(self.state_file, {"runs": self.runs, "run_name": self.run_name, "held": self.held})

    def log(self, step: int, record: dict[str, float]) -> None:
        self.live.log(step, record)
        for tracker in list(self.trackers):
            held = self.held.setdefault(tracker.name, {})
            new = unsent(held, step, record)
            if not new:
                continue  # that run has this step from before the resume
            try:
                tracker.log(step, new)
            except Exception as err:
                warn(f"{tracker.name}: logging failed ({type(err).__name__}: {err}); training goes on without "
                     f"{tracker.name}")
                self.trackers.remove(tracker)
                self.dropped.append(tracker)
                continue
            held.update(dict.fromkeys(new, step))
        if self.trackers:
            self.save()

    def finish(self, metrics: dict, model_dir: Path, outcome: str) -> None:
        """outcome: finished, failed or killed (Ctrl-C). A tracker that cannot finish is reported, not raised:
        the training's own outcome (its outputs, or the error that stopped it) is what the stage reports."""
        ending = [(t, outcome) for t in [self.live, *self.trackers] if t] + [(t, "failed") for t in self.dropped]
        for tracker, tracker_outcome in ending:
            try:
                tracker.finish(metrics, model_dir, tracker_outcome)
            except Exception as err:
                warn(f"{tracker.name}: could not finish its run ({type(err).__name__}: {err})")
        self.live, self.trackers, self.dropped = None, [], []


def unsent(held: dict[str, int], step: int, record: dict[str, float]) -> dict[str, float]:
    """The part of `record` a tracker does not hold yet, `held` being its last step of each series."""
    return {series: value for series, value in record.items() if step > held.get(series, -1)}


def read_state(path: Path) -> dict:
    """The tracker runs of the training being resumed (written atomically, so only a hand-edited file is torn)."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        warn(f"{path}: unreadable ({err}); the trackers start new runs")
        return {}


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
