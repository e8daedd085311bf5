"""Step metrics of a training run, to DVCLive (always) and to MLflow and Weights & Biases (when params.tracking says).

The Trainer logs every train.logging_steps and validates every train.eval_steps; `StepLog` turns each of those logs
into one record of named series, at the optimizer step, and hands it to every tracker:

    train/loss  train/learning_rate  train/grad_norm  train/epoch  train/tokens_per_second  train/elapsed_s
    eval/loss

DVCLive writes each series to <train.output_dir>/live/plots/metrics/<series>.tsv while the run is in progress; the
train stage publishes that folder to metrics/live (the files dvc.yaml's plots draw) once the run has finished, so a
failed run never replaces the history of the last finished one. A resumed run keeps the history up to its
checkpoint's step and drops the rows after it (that part of the killed run is replayed). `summarize` reads the same
files back into mean/min/max/last per series for metrics/train.json.

MLflow and W&B are optional extras (`pip install -e ".[mlflow]"`, `".[wandb]"`). Their local stores belong to the
repository (./mlruns, ./wandb), also for `dvc exp run --temp` and queued experiments, which run in a copy under
.dvc/tmp/exps. Credentials (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, a password in MLFLOW_TRACKING_URI) are read by
those clients from the environment and never written by this module: what is logged is params.yaml's values, the
step metrics, the final metrics and the fine-tuned directory.
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from transformers import TrainerCallback

from stages.common import write_json, write_text
from stages.params import MlflowParams, Params, WandbParams, as_dict

LIVE_DIR = Path("metrics/live")
RUN_STATE = "tracking.json"  # in train.output_dir: the tracker runs a resumed training continues
SERIES = {"train/loss": "train_loss", "eval/loss": "eval_loss", "train/learning_rate": "learning_rate",
          "train/grad_norm": "grad_norm", "train/tokens_per_second": "tokens_per_second", "train/epoch": "epoch",
          "train/elapsed_s": "elapsed_s"}  # series -> its key in metrics/train.json's summary


def read_series(live_dir: Path, series: str) -> list[tuple[int, float]]:
    """(step, value) rows of one DVCLive metric file; empty if it was never logged."""
    path = live_dir / "plots" / "metrics" / f"{series}.tsv"
    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    name = series.rsplit("/", 1)[-1]
    return [(int(r["step"]), float(r[name])) for r in rows]


def _row(line: str, width: int) -> tuple[int, ...] | None:
    """A complete TSV row's step (and values), or None for a row a kill cut short."""
    fields = line.rstrip("\n").split("\t")
    if not line.endswith("\n") or len(fields) != width:
        return None
    try:
        return (int(fields[0]), *(float(v) for v in fields[1:]))
    except ValueError:
        return None


def truncate_history(live_dir: Path, last_step: int) -> None:
    """Keep each DVCLive series up to `last_step` (the checkpoint a resumed run starts from), dropping the steps it
    will log again and whatever a kill cut short (a half-written row, an empty file, a torn metrics.json, which
    DVCLive rebuilds from the series)."""
    for path in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        header = lines[0].rstrip("\n").split("\t") if lines and lines[0].endswith("\n") else []
        if header[:1] != ["step"]:
            path.unlink()  # nothing complete in it; DVCLive writes a new header
            continue
        kept = [line for line in lines[1:] if (row := _row(line, len(header))) and row[0] <= last_step]
        write_text(path, "".join(lines[:1] + kept))
    (live_dir / "metrics.json").unlink(missing_ok=True)


def latest_values(live_dir: Path) -> dict:
    """DVCLive's summary (the last value of each series, nested by '/') rebuilt from the series files."""
    summary: dict = {}
    for path in sorted((live_dir / "plots" / "metrics").rglob("*.tsv")):
        series = path.relative_to(live_dir / "plots" / "metrics").with_suffix("").as_posix()
        rows = read_series(live_dir, series)
        if rows:
            *parents, leaf = series.split("/")
            node = summary
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = rows[-1][1]
    return summary


def summarize(live_dir: Path) -> dict[str, dict[str, float]]:
    """Mean, min, max and last of each tracked series: what `dvc exp show` can sort by (summary.eval_loss.min)."""
    out = {}
    for series, key in SERIES.items():
        values = [v for _, v in read_series(live_dir, series) if math.isfinite(v)]  # an fp16 overflow logs inf
        if values:
            stats = {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "last": values[-1]}
            out[key] = {stat: float(f"{v:.6g}") for stat, v in stats.items()}
    return out


def history(live_dir: Path) -> dict[int, dict[str, float]]:
    """Every series DVCLive holds, as one record per step (what a tracker enabled mid-run is first given)."""
    steps: dict[int, dict[str, float]] = {}
    for series in SERIES:
        for step, value in read_series(live_dir, series):
            steps.setdefault(step, {})[series] = value
    return dict(sorted(steps.items()))


def repository_root() -> Path:
    """The repository this run belongs to. `dvc exp run --temp` and queued experiments run in a throwaway copy
    under <repository>/.dvc/tmp/exps/; local tracking stores must outlive it."""
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def redact(uri: str) -> str:
    """A URI without the user:password part, fit to print."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=f"***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")))


def flat_params(params: Params) -> dict[str, object]:
    """The params that determine training, as 'section.key': value."""
    sections = {"model": as_dict(params.model), "train": as_dict(params.train), "lora": as_dict(params.lora),
                "prepare": {"max_length": params.prepare.max_length}}
    if params.train.method == "qlora":
        sections["quantization"] = as_dict(params.quantization)
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


def run_context() -> dict[str, str]:
    """Where the run comes from: the DVC experiment's name and baseline commit, and the git commit."""
    context = {}
    if os.environ.get("DVC_EXP_NAME"):
        context["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        context["dvc_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    found = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    if found.returncode == 0:
        context["git_commit"] = found.stdout.strip()
    return context


class DvcLiveTracker:
    """DVCLive in the train stage, as a writer of the series files and nothing else: the stage's outputs and plots
    are declared in dvc.yaml and the history is published to metrics/live by the stage, so DVCLive neither looks
    for a DVC repository (it would run `dvc init` outside one, and git-add files inside one) nor edits dvc.yaml nor
    saves experiments of its own (dvc exp run does that)."""

    name = "dvclive"

    def __init__(self, live_dir: Path, resume_step: int | None):
        from dvclive import Live

        class StageLive(Live):
            def _init_dvc(self):
                pass

        if resume_step is not None:
            truncate_history(live_dir, resume_step)
        self.live = StageLive(dir=str(live_dir), resume=resume_step is not None, dvcyaml=False, save_dvc_exp=False,
                              report=None)
        if resume_step is not None:
            self.live.summary = latest_values(live_dir)

    def log(self, step: int, record: dict[str, float]) -> None:
        self.live.step = step
        for series, value in record.items():
            self.live.log_metric(series, value)
        self.live.make_summary()

    def finish(self, metrics: dict, model_dir: Path, outcome: str) -> None:
        self.live.end()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, settings: MlflowParams, params: Params, run_id: str | None, run_name: str, root: Path):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
        database = None
        if uri.startswith("sqlite:///"):  # a relative path: the repository's, not the temporary copy's
            database = root / uri.removeprefix("sqlite:///")
            uri = f"sqlite:///{database}"
        # a local store keeps its artifacts beside the database (MLflow would put them under the current
        # directory, which for a temporary experiment is deleted); one process at a time creates its tables
        artifacts = (database.parent / "artifacts").as_uri() if database else None
        with store_lock(database):
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(settings.experiment_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                settings.experiment_name, artifact_location=artifacts)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {f"dvc_finetune.{k}": v for k, v in run_context().items()}
            run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
            self.client.log_batch(run_id, params=[Param(k, json.dumps(v) if not isinstance(v, str) else v)
                                                  for k, v in flat_params(params).items()])
        self.run_id, self.settings = run_id, settings
        print(f"mlflow: run {run_id} ({run_name}) in experiment {settings.experiment_name!r} at {redact(uri)}")

    def held(self) -> dict[str, int]:
        """The last step of each series this run already holds, read from MLflow itself."""
        out = {}
        for series in SERIES:
            steps = [m.step for m in self.client.get_metric_history(self.run_id, series)]
            if steps:
                out[series] = max(steps)
        return out

    def log(self, step: int, record: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in record.items()])

    def finish(self, metrics: dict, model_dir: Path, outcome: str) -> None:
        from mlflow.entities import Metric

        if outcome == "finished":
            now, step = int(time.time() * 1000), metrics.get("steps", 0)
            final = {f"final/{k}": float(v) for k, v in numeric(metrics).items()}
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in final.items()])
            if self.settings.log_model:
                self.client.log_artifacts(self.run_id, str(model_dir), artifact_path=artifact_name(metrics))
        self.client.set_terminated(self.run_id, status=outcome.upper())


@contextmanager
def store_lock(database: Path | None):
    """An exclusive lock beside a local SQLite store while it is opened (parallel experiments share one store, and
    MLflow creates its tables unguarded)."""
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.parent / f".{database.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class WandbTracker:
    name = "wandb"

    def __init__(self, settings: WandbParams, params: Params, run_id: str | None, run_name: str, root: Path):
        import wandb

        mode = os.environ.get("WANDB_MODE") or settings.mode
        self.wandb, self.settings = wandb, settings
        self.run = wandb.init(
            project=settings.project, name=run_name, id=run_id or uuid.uuid4().hex[:12], resume="allow",
            mode=mode, dir=str(root), config={**flat_params(params), **run_context()},
            # git metadata is left out: a remote URL can carry a token; the commit is in the config instead
            settings=wandb.Settings(disable_git=True, quiet=True))
        self.run_id = self.run.id
        where = f"{root / 'wandb'} (offline; `wandb sync` uploads it)" if mode == "offline" else mode
        print(f"wandb: run {self.run_id} ({run_name}) in project {settings.project!r}, {where}")

    def log(self, step: int, record: dict[str, float]) -> None:
        self.run.log(record, step=step)

    def finish(self, metrics: dict, model_dir: Path, outcome: str) -> None:
        if outcome == "finished":
            self.run.summary.update({f"final/{k}": v for k, v in numeric(metrics).items()})
            if self.settings.log_model:
                artifact = self.wandb.Artifact(f"{artifact_name(metrics)}-{self.run_id}", type="model")
                artifact.add_dir(str(model_dir))
                self.run.log_artifact(artifact)
        self.run.finish(exit_code={"finished": 0, "killed": 255}.get(outcome, 1))
        # run.finish() returns while W&B's service may still be writing the run's file (offline) or uploading it;
        # teardown waits for it, so the run is complete when the stage goes on (its atexit hook would otherwise
        # do this only when the process exits)
        self.wandb.teardown()


def artifact_name(metrics: dict) -> str:
    return "model" if metrics.get("method") == "full" else "adapter"


def numeric(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


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
