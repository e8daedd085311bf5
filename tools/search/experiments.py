"""Trials as DVC experiments: run (in a temporary copy, or queued for `dvc queue` workers), and read back through
DVC's Python API (`dvc.repo.Repo`): an experiment's committed metrics, the queue's state, the workers' logs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time

import yaml

from finetune.errors import StageError
from finetune.metrics import unnest

POLL_S = 2  # parallel: how often the queue is checked and the workers' new output passed through
SHOW_ATTEMPTS = 10  # reads of the experiments a worker starting or stopping at that moment may make fail


def dvc(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, env=env, check=False)
    if check and done.returncode:
        raise StageError(f"dvc {' '.join(args)} failed:\n{done.stderr.strip() or done.stdout.strip()}")
    return done


def start_workers(workers: int) -> None:
    """`dvc queue start -j workers`. The workers outlive it and hold on to whatever output it was given: with pipes,
    waiting for it would wait for every queued trial to end, so its output goes to a file."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the stages' prints reach the workers' logs as they are made
    with tempfile.TemporaryFile("w+") as output:
        done = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(workers)], stdout=output,
                              stderr=subprocess.STDOUT, text=True, env=env, check=False)
        if done.returncode:
            output.seek(0)
            raise StageError(f"dvc queue start -j {workers} failed:\n{output.read().strip()}")


def set_param(key: str, value) -> str:
    """-S key=value with the value as YAML, the way DVC parses it."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def lookup(metrics: dict, key: str, where: str) -> float:
    """The number at `key` in a metric file's content; a dotted key reads a nested one
    (`finetuned.exact_match` in metrics/eval_finetuned.json's {"finetuned": {"exact_match": ...}})."""
    value, parts = metrics, key.split(".")
    if key in metrics:  # a flat key that has a dot in its name
        value, parts = metrics[key], []
    for depth, part in enumerate(parts):
        if not isinstance(value, dict) or part not in value:
            under = f" under {'.'.join(parts[:depth])!r}" if depth else ""
            found = ", ".join(sorted(value)) if isinstance(value, dict) else f"a {type(value).__name__}"
            raise StageError(f"{where}: no key {part!r}{under} (found: {found})")
        value = value[part]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise StageError(f"{where}: {key} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise StageError(f"{where}: {key} is {number}")
    return number


def queue_processes():
    """DVC's record of the processes its queue workers run: each queued experiment's output goes to a log file, the
    one `dvc queue logs` prints. Reading it here costs nothing; `dvc queue logs` per trial per poll costs a second."""
    from dvc.repo import Repo

    with Repo() as repo:
        return repo.experiments.celery_queue.proc


def experiment_metrics(name: str) -> dict[str, dict] | None:
    """The metric files experiment `name` committed (path -> content), read through DVC's API; None when the current
    commit has no experiment of that name (DVC keeps experiments under their baseline commit, so one of the same
    name on another commit is never read)."""
    from dvc.repo import Repo

    for attempt in range(SHOW_ATTEMPTS):
        try:
            with Repo() as repo:
                shown = repo.experiments.show(hide_queued=True, hide_failed=True, hide_workspace=True)
            break
        except FileNotFoundError:  # DVC read a running experiment's info file as its worker started or stopped
            if attempt == SHOW_ATTEMPTS - 1:
                raise
            time.sleep(POLL_S)
    for baseline in shown:
        for run in baseline.experiments or []:
            for exp in run.revs:
                if exp.name == name and exp.data is not None:
                    return {path: found.get("data", {}) for path, found in exp.data.metrics.items()}
    return None


def metric_value(metric: str, files: dict[str, dict], name: str = "objective.metric") -> float:
    """`metric` (file:key) in an experiment's metric files; `name` is the search.yaml key it came from."""
    path, key = metric.split(":", 1)
    if path not in files:
        raise StageError(f"{name}: the experiment has no {path}")
    return lookup(files[path], key, f"{name}: {path}")


def training_metrics(files: dict[str, dict]) -> dict:
    """The train stage's metrics among an experiment's metric files (the one nested under `training`)."""
    return next((unnest(data) for data in files.values() if isinstance(data, dict) and "training" in data), {})


def queue_entries(names) -> dict[str, str]:
    """Of the experiments `names`, those DVC's queue still holds as queued or running: name -> DVC's id for the run."""
    from dvc.repo import Repo

    with Repo() as repo:
        queue = repo.experiments.celery_queue
        entries = [*queue.iter_active(), *queue.iter_queued()]
    return {entry.name: entry.stash_rev for entry in entries if entry.name in names}


def workers_running() -> bool:
    """Whether any `dvc queue` worker is alive (busy or idle)."""
    from dvc.repo import Repo

    with Repo() as repo:
        return bool(repo.experiments.celery_queue.worker_status())
