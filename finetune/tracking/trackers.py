"""The clients a training run logs to: DVCLive (always), MLflow and Weights & Biases (when params.tracking
enables them). Each has log(step, record) and finish(metrics, model_dir, outcome).

MLflow and W&B are optional extras (`pip install -e ".[mlflow]"`, `".[wandb]"`). Their local stores belong to the
repository (./mlruns, ./wandb), also for `dvc exp run --temp` and queued experiments, which run in a copy under
.dvc/tmp/exps. Credentials (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, a password in MLFLOW_TRACKING_URI) are read by
those clients from the environment and never written by this module: what is logged is params.yaml's values, the
step metrics, the final metrics and the fine-tuned directory."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from finetune.config.params import Params, as_dict
from finetune.config.tracking import MlflowParams, WandbParams
from finetune.tracking.history import SERIES, latest_values, truncate_history


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
