"""search: hyperparameter search in which every trial is a real DVC experiment -- grid, random or Bayesian (Optuna).

    python -m tools.search                       # reads search.yaml
    python -m tools.search --config my-search.yaml
    dvc exp show                                  # every trial, with its params and metrics
    dvc exp apply lora-search-3                   # restore the best (named in the leaderboard)

A trial is `dvc exp run --name <study>-<n> -S key=value ...` (run in a temporary directory, or queued and run by
`dvc queue start -j parallel` workers), so DVC records its code, params, data and metrics like any experiment; its
objective is read back from the experiment's committed metrics. Optuna records the study and picks the values:
the grid's points in order for `grid`, RandomSampler (independent draws, log-uniform where `log: true`) for
`random`, TPE (or the sampler named) for `bayes`. The study lives in Optuna's storage (a SQLite file by
default), so a search that is stopped and started again runs only the trials it still owes; a trial cut off
mid-run is recorded as failed ("interrupted") and does not count.

Searches on several machines share one study through a storage they all reach (`storage: journal:<path>` on a shared
filesystem, or a database URL; DVC_FINETUNE_STUDY_STORAGE overrides search.yaml): each asks the study for its next
trial, so together they run the budget once, the trials running elsewhere counting toward it and grid points taken
under a lock; each records which search (host:pid) runs a trial, and settles only the interrupted trials of its own
machine's stopped searches. With `push: <git remote>`, each finished trial's experiment is pushed there (`dvc exp
push`, its DVC outputs to the DVC remote), for `dvc exp pull` on any machine. A failed trial is recorded with its
error and the search goes on. With `pruner: median` (sequential runs), the train stage reports its validation loss
to the study at every evaluation and stops early when the trial trails the median.

While a trial runs, its own output (DVC's lines and the stages', e.g. the train stage's `step 80/320 (25%): ...`)
is passed through with the trial's number in front (`[trial 2] step 80/320 ...`); queued trials' output is read
from the log each DVC worker writes (what `dvc queue logs` prints). Trials are numbered 1..trials in the order they
start (`trial 2 of 8`, `trials 3-4 of 8` for a parallel round); the experiment name carries Optuna's trial number.
Writes <out_dir>/leaderboard.json and leaderboard.md, sorted by the objective and then by `objective.secondary`,
which breaks ties; when the best trials tie on the objective, both say which trials and whether and how the tie
was broken.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import StageError
from finetune.training import TRIAL_ENV, study_storage
from tools.search import experiments
from tools.search.config import (
    MEDIAN_PRUNER,
    SearchConfig,
    budget,
    counted,
    load_config,
    next_grid_points,
    sampler,
    storage_spec,
    study_lock,
)
from tools.search.experiments import POLL_S, dvc, queue_processes, set_param, start_workers
from tools.search.leaderboard import cell, leaderboard, markdown


def experiment_name(config: SearchConfig, number: int) -> str:
    return f"{config.study_name}-{number}"


WORKER = f"{socket.gethostname()}:{os.getpid()}"  # this search, among those sharing a study


def stopped(worker: str | None) -> bool:
    """Whether the search that took a trial has stopped: one of this machine whose process is gone (a trial of
    another machine is that machine's to settle, when its search starts again)."""
    if worker is None:
        return True  # recorded before searches said who they are
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) == os.getpid()


def settle_interrupted(study, config: SearchConfig) -> None:
    """Trials left running by a search that was stopped: the result if its experiment finished, else failed."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not stopped(trial.user_attrs.get("worker")):
            continue  # a search running now, here or on another machine, is running it
        name = experiment_name(config, trial.number)
        files = experiments.experiment_metrics(name)
        if files is not None:
            try:
                study.tell(trial.number, experiments.metric_value(config.metric, files))
                print(f"{name}: finished before the stop; recorded")
                continue
            except StageError:
                pass
        study.tell(trial.number, state=TrialState.FAIL)
        print(f"{name}: interrupted; its trial runs again as a new experiment")



def round_lines(first: int, total: int, strategy: str, trials: list[tuple[str, dict]]) -> list[str]:
    """What a round of trials announces: `trial 2 of 8 (bayes): ...`, or for a parallel round `trials 3-4 of 8`
    and a line per trial. Numbers count the trials of this search from 1; the names carry Optuna's number."""
    described = [f"{name} with {', '.join(f'{key}={cell(value)}' for key, value in values.items())}"
                 for name, values in trials]
    if len(trials) == 1:
        return [f"trial {first} of {total} ({strategy}): {described[0]}"]
    return [f"trials {first}-{first + len(trials) - 1} of {total} ({strategy}, {len(trials)} at a time):"] + [
        f"  trial {first + i}: {line}" for i, line in enumerate(described)]


class Relay:
    """A running trial's output, passed through line by line with the trial's number in front; the last lines are
    kept as the error of a trial that fails."""

    def __init__(self, number: int):
        self.prefix = f"[trial {number}]"
        self.last: collections.deque[str] = collections.deque(maxlen=15)

    def __call__(self, line: str) -> None:
        line = line.rstrip()
        if line.strip():
            print(f"{self.prefix} {line}", flush=True)
            self.last.append(line)

    def tail(self) -> str:
        return "\n".join(self.last)


def record(study, trial, config: SearchConfig, label: str, ok: bool, error: str = "") -> None:
    """Tell the study how a trial went, reading its objective (and secondary metric) back from its experiment."""
    from optuna.trial import TrialState

    name = trial.user_attrs["experiment"]
    label = f"{label} ({name})"
    if not ok:
        trial.set_user_attr("error", error or "failed")
        study.tell(trial, state=TrialState.FAIL)
        # its output has been shown as it ran (the tail is kept in the study, for the leaderboard)
        print(f"{label}: FAILED: {(error or 'failed').splitlines()[-1]}", flush=True)
        return
    files = experiments.experiment_metrics(name)
    try:
        if files is None:
            raise StageError(f"no experiment named {name} was recorded")
        value = experiments.metric_value(config.metric, files)
    except StageError as err:
        trial.set_user_attr("error", str(err))
        study.tell(trial, state=TrialState.FAIL)
        print(f"{label}: FAILED: {err}", flush=True)
        return
    secondary = ""
    if config.secondary:  # recorded with its name: a later search.yaml may name another one
        try:
            second = experiments.metric_value(config.secondary, files, "objective.secondary.metric")
            trial.set_user_attr("secondary", {"metric": config.secondary, "value": second})
            secondary = f" ({config.secondary_key} {second:g})"
        except StageError as err:
            print(f"{label}: warning: {err}; a tie with this trial cannot be broken", flush=True)
    train_metrics = experiments.training_metrics(files)
    if train_metrics.get("pruned_at_step"):
        trial.set_user_attr("pruned_at_step", train_metrics["pruned_at_step"])
        trial.set_user_attr("value_when_pruned", value)
        study.tell(trial, state=TrialState.PRUNED)
        print(f"{label}: pruned at step {train_metrics['pruned_at_step']}", flush=True)
        return
    study.tell(trial, value)
    print(f"{label}: {config.metric_key} = {value:g}{secondary}", flush=True)


def run_sequential(study, trial, config: SearchConfig, settings: list[str], storage_url: str, number: int,
                   label: str) -> None:
    name = trial.user_attrs["experiment"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the stages' prints arrive as they are made, not at the end
    if config.pruner != "none":
        env[TRIAL_ENV] = json.dumps({"storage": storage_url, "study": config.study_name,
                                     "trial_id": trial._trial_id, "median_pruner": MEDIAN_PRUNER})
    relay = Relay(number)
    command = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", name, *settings]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          env=env) as proc:
        for line in proc.stdout:
            relay(line)
    record(study, trial, config, label, proc.returncode == 0, relay.tail())


@dataclass
class QueuedTrial:
    trial: object
    label: str  # trial <n> of <total>
    relay: Relay
    log: Path | None = None  # the worker's output, once it has one
    offset: int = 0  # how much of it has been passed through

    def pass_through(self, final: bool = False) -> None:
        """The lines the worker has written since the last call (and, when final, an unfinished last one)."""
        if self.log is None or not self.log.exists():
            return
        with self.log.open("rb") as log:
            log.seek(self.offset)
            written = log.read()
        end = len(written) if final else written.rfind(b"\n") + 1
        self.offset += end
        for line in written[:end].decode(errors="replace").splitlines():
            self.relay(line)


# how long trials may be pending with no worker running before the workers are started again (and, once more,
# before the search gives up on them): a worker takes seconds to start, many more on a loaded machine
IDLE_POLLS = 30


def run_queued(study, trials: list, config: SearchConfig, settings: dict[int, list[str]],
               numbers: dict[int, int], labels: dict[int, str]) -> None:
    processes = queue_processes()
    earlier = set(processes)  # runs of earlier searches, one maybe under the same name
    for trial in trials:
        dvc("exp", "run", "--queue", "--name", trial.user_attrs["experiment"], *settings[trial.number])
    start_workers(config.parallel)
    queued = {trial.user_attrs["experiment"]: QueuedTrial(trial, labels[trial.number], Relay(numbers[trial.number]))
              for trial in trials}
    idle_polls, restarted = 0, False
    while True:
        pending = experiments.queue_entries(queued)
        for name, key in pending.items():
            if queued[name].log is None:
                run = next((k for k in processes if k.startswith(key[:7]) and k not in earlier), None)
                info = processes.get(run) if run else None
                queued[name].log = Path(info.stdout) if info and info.stdout else None
        for each in queued.values():
            each.pass_through()
        if not pending:
            break
        # trials pending, and no worker left to run them (a worker that died, or stopped): start them once more,
        # then give up on what is left rather than wait for ever
        idle_polls = 0 if experiments.workers_running() else idle_polls + 1
        if idle_polls >= IDLE_POLLS:
            if restarted:
                print(f"search: the dvc queue workers stopped with {len(pending)} trials pending "
                      f"({', '.join(pending)}); recording them as failed", flush=True)
                break
            print("search: no dvc queue worker is running, though trials are pending; starting the workers again",
                  flush=True)
            start_workers(config.parallel)
            idle_polls, restarted = 0, True
        time.sleep(POLL_S)
    dvc("queue", "stop", check=False)
    for name, each in queued.items():
        each.pass_through(final=True)
        if experiments.experiment_metrics(name) is None:
            output = each.relay.tail()
            if not output:  # failed before its run started: DVC says why
                logs = dvc("queue", "logs", name, check=False)
                output = "\n".join((logs.stdout + logs.stderr).strip().splitlines()[-15:])
            record(study, each.trial, config, each.label, False, output)
        else:
            record(study, each.trial, config, each.label, True)


def push(config: SearchConfig, name: str) -> None:
    """A finished trial's experiment, with its DVC outputs, to search.yaml's `push` remote: other machines pull it."""
    if not config.push:
        return
    done = dvc("exp", "push", config.push, name, check=False)
    said = (done.stderr or done.stdout).strip().splitlines()
    print(f"{name}: pushed to {config.push}" if done.returncode == 0 else
          f"{name}: warning: dvc exp push {config.push} failed: {said[-1] if said else done.returncode}", flush=True)


def running_elsewhere(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker") != WORKER]


def search(config: SearchConfig) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = storage_spec(config.storage)
    storage_url = spec  # what a trial's train stage reports its validation losses to (pruner: median)
    pruner = optuna.pruners.MedianPruner(**MEDIAN_PRUNER) if config.pruner == "median" \
        else optuna.pruners.NopPruner()
    with study_lock(spec):  # two searches creating the study at once: one creates it, the other loads it
        study = optuna.create_study(storage=study_storage(spec), study_name=config.study_name,
                                    direction=config.direction, sampler=sampler(config), pruner=pruner,
                                    load_if_exists=True)
    # what the trials' values mean; not the secondary metric, which only orders ties in the leaderboard
    identity = {"strategy": config.strategy, "metric": config.metric, "direction": config.direction,
                "space": [vars(d) for d in config.space], "overrides": config.overrides}
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", identity)
    elif stored != json.loads(json.dumps(identity)):
        changed = sorted(k for k in identity if json.loads(json.dumps(identity[k])) != stored.get(k))
        raise StageError(f"study_name: {config.study_name!r} in {spec} was started with another "
                         f"{', '.join(changed)}; give this search a new study_name (or delete the storage)")
    total = budget(config)
    with study_lock(spec):  # no other search takes a trial while this one settles what was left running
        settle_interrupted(study, config)
    while True:
        trials, settings, chosen, numbers, labels = [], {}, [], {}, {}
        with study_lock(spec):  # the budget counted and the trials taken as one step, by one search at a time
            taken = study.get_trials(deepcopy=False)
            done = sum(counted(t) for t in taken)
            # trials other searches sharing the study are running count toward the budget: together they run it once
            batch = min(config.parallel, total - done - len(running_elsewhere(study)))
            if batch <= 0:
                break
            if config.strategy == "grid":
                for point in next_grid_points(study, config, batch):
                    study.enqueue_trial(point, user_attrs={"worker": WORKER})  # ask() hands these out first
            study.sampler = sampler(config, len(taken))
            asked = [study.ask() for _ in range(batch)]
            for trial in asked:
                trial.set_user_attr("worker", WORKER)
        for i, trial in enumerate(asked):
            values = {d.name: d.suggest(trial, config.strategy) for d in config.space}
            trial.set_user_attr("experiment", experiment_name(config, trial.number))
            trial.set_user_attr("overrides", config.overrides)
            settings[trial.number] = [arg for key, value in {**config.overrides, **values}.items()
                                      for arg in ("-S", set_param(key, value))]
            numbers[trial.number] = done + 1 + i  # an interrupted trial's number goes to the one run instead
            labels[trial.number] = f"trial {done + 1 + i} of {total}"
            chosen.append((trial.user_attrs["experiment"], values))
            trials.append(trial)
        print("\n".join(round_lines(done + 1, total, config.strategy, chosen)), flush=True)
        if config.parallel == 1:
            number = trials[0].number
            run_sequential(study, trials[0], config, settings[number], storage_url, numbers[number], labels[number])
        else:
            run_queued(study, trials, config, settings, numbers, labels)
        for trial in trials:
            if experiments.experiment_metrics(trial.user_attrs["experiment"]) is not None:  # it ran to the end
                push(config, trial.user_attrs["experiment"])
    if elsewhere := running_elsewhere(study):
        print(f"search: {len(elsewhere)} trials are still running in other searches of this study "
              f"({', '.join(sorted({t.user_attrs.get('worker', '?') for t in elsewhere}))}): the leaderboard lists "
              "them as running; run the search again once they finish for the final one", flush=True)
    return leaderboard(study, config)


def main() -> None:
    parser = argparse.ArgumentParser(description="Hyperparameter search over DVC experiments.")
    parser.add_argument("--config", type=Path, default=Path("search.yaml"))
    args = parser.parse_args()
    config = load_config(args.config)
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise StageError("the search needs Optuna: pip install -e '.[search]'") from None
    board = search(config)
    print(markdown(board, config))
