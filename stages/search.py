"""search: hyperparameter search in which every trial is a real DVC experiment -- grid, random or Bayesian (Optuna).

    python -m stages.search                       # reads search.yaml
    python -m stages.search --config my-search.yaml
    dvc exp show                                  # every trial, with its params and metrics
    dvc exp apply lora-search-3                   # restore the best (named in the leaderboard)

A trial is `dvc exp run --name <study>-<n> -S key=value ...` (run in a temporary directory, or queued and run by
`dvc queue start -j parallel` workers), so DVC records its code, params, data and metrics like any experiment; its
objective is read back from the experiment's committed metrics. Optuna records the study and picks the values:
the grid's points in order for `grid`, RandomSampler (independent draws, log-uniform where `log: true`) for
`random`, TPE (or the sampler named) for `bayes`. The study lives in Optuna's SQLite storage, so a search that
is stopped and started again runs only the trials it still owes; a trial cut off mid-run is recorded as failed
("interrupted") and does not count. A failed trial is recorded with its error and the search goes on. With
`pruner: median` (sequential runs), the train stage reports its validation loss to the study at every evaluation
and stops early when the trial trails the median.

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
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stages.common import StageError, markdown_table, run_main, write_json, write_text
from stages.metrics import unnest
from stages.params import load_yaml
from stages.train import METRICS_FILE as TRAIN_METRICS
from stages.train import TRIAL_ENV  # set for a trial's `dvc exp run`: where the train stage reports for pruning

STRATEGIES = ("grid", "random", "bayes")
MEDIAN_PRUNER = {"n_startup_trials": 2, "n_warmup_steps": 0}  # prune from the third trial on, at any evaluation
SAMPLERS = ("tpe", "gp", "cmaes", "qmc")
DIRECTIONS = ("maximize", "minimize")
POLL_S = 2  # parallel: how often the queue is checked and the workers' new output passed through


@dataclass
class Dimension:
    name: str
    type: str  # categorical | float | int
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    values: list | None = None  # the grid's points for a float/int dimension

    def grid(self) -> list:
        return self.choices if self.type == "categorical" else self.values

    def suggest(self, trial, strategy: str):
        if strategy == "grid" or self.type == "categorical":
            return trial.suggest_categorical(self.name, self.grid())
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclass
class SearchConfig:
    space: list[Dimension]
    strategy: str = "bayes"
    sampler: str = "tpe"
    startup_trials: int = 4
    trials: int = 8
    parallel: int = 1
    seed: int = 0
    metric: str = "metrics/headline.json:exact_match"
    direction: str = "maximize"
    secondary: str | None = None  # file:key that ranks trials tying on the objective
    secondary_direction: str = "minimize"
    pruner: str = "none"
    overrides: dict = field(default_factory=dict)
    study_name: str = "search"
    storage: str = "search/study.db"
    out_dir: str = "search"

    @property
    def metric_key(self) -> str:
        return self.metric.split(":", 1)[1]

    @property
    def secondary_key(self) -> str | None:
        return self.secondary.split(":", 1)[1] if self.secondary else None


def metric_problem(where: str, metric) -> list[str]:
    if isinstance(metric, str) and all(metric.partition(":")[::2]):
        return []
    return [(f"{where}: {metric!r} must be <metrics file>:<key>, e.g. metrics/headline.json:exact_match "
            "(a dotted key reads a nested one: metrics/eval_finetuned.json:finetuned.exact_match)")]


def load_config(path: Path) -> SearchConfig:
    """search.yaml -> SearchConfig; every problem reported at once, each naming the file and key."""
    if not path.exists():
        raise StageError(f"{path}: search config not found")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise StageError(f"{path}: not valid YAML: {err}") from None
    problems: list[str] = []
    known = {"strategy", "sampler", "startup_trials", "trials", "parallel", "seed", "objective", "pruner",
             "overrides", "space", "study_name", "storage", "out_dir"}
    problems += [f"{path}: {key}: unknown key (known: {', '.join(sorted(known))})" for key in raw if key not in known]
    objective = raw.get("objective") or {}
    if not isinstance(objective, dict):
        problems.append(f"{path}: objective: expected a mapping like {{metric: {SearchConfig.metric}, "
                        "direction: maximize}")
        objective = {}
    problems += [f"{path}: objective.{key}: unknown key (known: direction, metric, secondary)"
                 for key in objective if key not in ("metric", "direction", "secondary")]
    secondary = objective.get("secondary")
    if secondary is not None and not isinstance(secondary, dict):
        problems.append(f"{path}: objective.secondary: expected a mapping like "
                        "{metric: metrics/headline.json:eval_loss, direction: minimize}")
        secondary = None
    for key in secondary or {}:
        if key not in ("metric", "direction"):
            problems.append(f"{path}: objective.secondary.{key}: unknown key (known: direction, metric)")
    for key in ("metric", "direction"):  # no default: a tie broken the wrong way is worse than one left standing
        if secondary is not None and key not in secondary:
            problems.append(f"{path}: objective.secondary.{key}: missing")
    if raw.get("overrides") is None:
        raw["overrides"] = {}
    config = SearchConfig(space=[], **{k: raw[k] for k in known - {"objective", "space"} if k in raw},
                          metric=objective.get("metric", SearchConfig.metric),
                          direction=objective.get("direction", SearchConfig.direction),
                          secondary=(secondary or {}).get("metric"),
                          secondary_direction=(secondary or {}).get("direction", SearchConfig.secondary_direction))
    if config.strategy not in STRATEGIES:
        problems.append(f"{path}: strategy: {config.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if config.sampler not in SAMPLERS:
        problems.append(f"{path}: sampler: {config.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if config.pruner not in ("none", "median"):
        problems.append(f"{path}: pruner: {config.pruner!r} is not none or median")
    for key in ("trials", "parallel", "startup_trials"):
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "startup_trials" else 1):
            problems.append(f"{path}: {key}: {value!r} must be a positive integer")
    if config.pruner != "none" and config.parallel != 1:
        problems.append(f"{path}: pruner: needs parallel: 1 (queued workers cannot report to the study)")
    if config.strategy == "bayes" and config.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            problems.append(f"{path}: sampler: cmaes needs the cmaes package (pip install cmaes)")
    if config.direction not in DIRECTIONS:
        problems.append(f"{path}: objective.direction: {config.direction!r} is not maximize or minimize")
    problems += metric_problem(f"{path}: objective.metric", config.metric)
    if secondary is not None and "metric" in secondary:
        problems += metric_problem(f"{path}: objective.secondary.metric", config.secondary)
        if config.secondary == config.metric:
            problems.append(f"{path}: objective.secondary.metric: {config.secondary!r} is the objective itself; "
                            "it cannot break a tie on it")
    if secondary is not None and config.secondary_direction not in DIRECTIONS:
        problems.append(f"{path}: objective.secondary.direction: {config.secondary_direction!r} is not maximize "
                        "or minimize")
    if not isinstance(config.overrides, dict):
        problems.append(f"{path}: overrides: expected a mapping of param: value")
    space = raw.get("space") or {}
    if not isinstance(space, dict) or not space:
        problems.append(f"{path}: space: expected a mapping of param: {{type: ..., ...}} with at least one param")
        space = {}
    for name, spec in space.items():
        where = f"{path}: space.{name}"
        if not isinstance(spec, dict):
            problems.append(f"{where}: expected a mapping like {{type: float, low: 1e-4, high: 1e-2, log: true}}")
            continue
        unknown = set(spec) - {"type", "choices", "low", "high", "log", "step", "values"}
        problems += [f"{where}.{key}: unknown key" for key in sorted(unknown)]
        if "type" not in spec:
            problems.append(f"{where}.type: missing (categorical, float or int)")
            continue
        dim = Dimension(name=name, **{k: v for k, v in spec.items() if k not in unknown})
        if dim.log and dim.step is not None:
            problems.append(f"{where}: log: true and step cannot be combined")
        if dim.type == "categorical":
            if not isinstance(dim.choices, list) or not dim.choices:
                problems.append(f"{where}.choices: a categorical dimension needs a non-empty list of choices")
        elif dim.type in ("float", "int"):
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (dim.low, dim.high)):
                problems.append(f"{where}: low and high must be numbers")
            elif dim.low >= dim.high:
                problems.append(f"{where}: low ({dim.low}) must be below high ({dim.high})")
            elif dim.log and dim.low <= 0:
                problems.append(f"{where}: log: true needs low > 0")
            if config.strategy == "grid" and not (isinstance(dim.values, list) and dim.values):
                problems.append(f"{where}.values: the grid strategy needs the points of a {dim.type} dimension")
        else:
            problems.append(f"{where}.type: {dim.type!r} is not categorical, float or int")
        config.space.append(dim)
    if problems:
        raise StageError("invalid search config:\n  " + "\n  ".join(problems))
    return config


def sampler(config: SearchConfig):
    import optuna

    if config.strategy in ("grid", "random"):  # grid points are enqueued (see next_grid_points)
        return optuna.samplers.RandomSampler(seed=config.seed)
    if config.sampler == "tpe":
        # constant_liar: trials asked together (parallel) are not all drawn from the same model of the objective
        return optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=config.startup_trials,
                                          constant_liar=config.parallel > 1)
    if config.sampler == "gp":
        return optuna.samplers.GPSampler(seed=config.seed, n_startup_trials=config.startup_trials)
    if config.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=config.seed, n_startup_trials=config.startup_trials)
    return optuna.samplers.QMCSampler(seed=config.seed)


def grid_points(config: SearchConfig) -> list[dict]:
    names = [d.name for d in config.space]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(d.grid() for d in config.space))]


def budget(config: SearchConfig) -> int:
    return min(config.trials, len(grid_points(config))) if config.strategy == "grid" else config.trials


def next_grid_points(study, config: SearchConfig, n: int) -> list[dict]:
    """The grid in declared order, less the points already tried (a restart goes on where it stopped)."""
    tried = [t.params for t in study.get_trials(deepcopy=False) if counted(t)]
    return [point for point in grid_points(config) if point not in tried][:n]


# DVC


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


def experiment_ref(name: str) -> str | None:
    """The git ref of experiment `name` on the current commit (DVC keeps experiments under their baseline commit:
    refs/exps/<sha[:2]>/<sha[2:]>/<name>), so an experiment of the same name on another commit is never read."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    ref = f"refs/exps/{head[:2]}/{head[2:]}/{name}"
    found = subprocess.run(["git", "show-ref", "--verify", "--quiet", ref], check=False)
    return ref if found.returncode == 0 else None


def experiment_json(ref: str, path: str) -> dict | None:
    shown = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True, check=False)
    return json.loads(shown.stdout) if shown.returncode == 0 else None


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


def metric_value(metric: str, ref: str, name: str = "objective.metric") -> float:
    """`metric` (file:key) as the experiment at `ref` committed it; `name` is the search.yaml key it came from."""
    path, key = metric.split(":", 1)
    metrics = experiment_json(ref, path)
    if metrics is None:
        raise StageError(f"{name}: the experiment has no {path}")
    return lookup(metrics, key, f"{name}: {path}")


def objective_value(config: SearchConfig, ref: str) -> float:
    return metric_value(config.metric, ref)


def training_metrics(ref: str) -> dict:
    """The experiment's metrics/train.json: nested under its group key ({"training": {...}}) since the metric files
    were grouped, flat in experiments made before; both read the same."""
    return unnest(TRAIN_METRICS, experiment_json(ref, TRAIN_METRICS.as_posix()) or {})


# The search


def experiment_name(config: SearchConfig, number: int) -> str:
    return f"{config.study_name}-{number}"


def settle_interrupted(study, config: SearchConfig) -> None:
    """Trials left running by a search that was stopped: the result if its experiment finished, else failed."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        name = experiment_name(config, trial.number)
        ref = experiment_ref(name)
        if ref is not None:
            try:
                study.tell(trial.number, objective_value(config, ref))
                print(f"{name}: finished before the stop; recorded")
                continue
            except StageError:
                pass
        study.tell(trial.number, state=TrialState.FAIL)
        print(f"{name}: interrupted; its trial runs again as a new experiment")


def counted(trial) -> bool:
    """Finished trials count toward the budget; an interrupted one (failed without an error of its own) does not."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)


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
    ref = experiment_ref(name)
    try:
        if ref is None:
            raise StageError(f"no experiment named {name} was recorded")
        value = objective_value(config, ref)
    except StageError as err:
        trial.set_user_attr("error", str(err))
        study.tell(trial, state=TrialState.FAIL)
        print(f"{label}: FAILED: {err}", flush=True)
        return
    secondary = ""
    if config.secondary:  # recorded with its name: a later search.yaml may name another one
        try:
            second = metric_value(config.secondary, ref, "objective.secondary.metric")
            trial.set_user_attr("secondary", {"metric": config.secondary, "value": second})
            secondary = f" ({config.secondary_key} {second:g})"
        except StageError as err:
            print(f"{label}: warning: {err}; a tie with this trial cannot be broken", flush=True)
    train_metrics = training_metrics(ref)
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


def queue_processes():
    """DVC's record of the processes its queue workers run: each queued experiment's output goes to a log file, the
    one `dvc queue logs` prints. Reading it here costs nothing; `dvc queue logs` per trial per poll costs a second."""
    from dvc.repo import Repo

    with Repo() as repo:
        return repo.experiments.celery_queue.proc


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


def run_queued(study, trials: list, config: SearchConfig, settings: dict[int, list[str]],
               numbers: dict[int, int], labels: dict[int, str]) -> None:
    processes = queue_processes()
    earlier = set(processes)  # runs of earlier searches, one maybe under the same name
    for trial in trials:
        dvc("exp", "run", "--queue", "--name", trial.user_attrs["experiment"], *settings[trial.number])
    start_workers(config.parallel)
    queued = {trial.user_attrs["experiment"]: QueuedTrial(trial, labels[trial.number], Relay(numbers[trial.number]))
              for trial in trials}
    while True:
        rows = [line.split() for line in dvc("queue", "status").stdout.splitlines()]
        for row in rows:  # task (the start of DVC's id for the run), name, created, status
            if len(row) > 2 and row[1] in queued and queued[row[1]].log is None:
                run = next((key for key in processes if key.startswith(row[0]) and key not in earlier), None)
                info = processes.get(run) if run else None
                queued[row[1]].log = Path(info.stdout) if info and info.stdout else None
        for each in queued.values():
            each.pass_through()
        if not any(len(r) > 2 and r[1] in queued and r[-1] in ("Queued", "Running") for r in rows):
            break
        time.sleep(POLL_S)
    dvc("queue", "stop", check=False)
    for name, each in queued.items():
        each.pass_through(final=True)
        if experiment_ref(name) is None:
            output = each.relay.tail()
            if not output:  # failed before its run started: DVC says why
                logs = dvc("queue", "logs", name, check=False)
                output = "\n".join((logs.stdout + logs.stderr).strip().splitlines()[-15:])
            record(study, each.trial, config, each.label, False, output)
        else:
            record(study, each.trial, config, each.label, True)


def search(config: SearchConfig) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    Path(config.storage).parent.mkdir(parents=True, exist_ok=True)
    storage_url = f"sqlite:///{Path(config.storage).resolve()}"
    pruner = optuna.pruners.MedianPruner(**MEDIAN_PRUNER) if config.pruner == "median" \
        else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage_url, study_name=config.study_name, direction=config.direction,
                                sampler=sampler(config), pruner=pruner, load_if_exists=True)
    # what the trials' values mean; not the secondary metric, which only orders ties in the leaderboard
    identity = {"strategy": config.strategy, "metric": config.metric, "direction": config.direction,
                "space": [vars(d) for d in config.space], "overrides": config.overrides}
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", identity)
    elif stored != json.loads(json.dumps(identity)):
        changed = sorted(k for k in identity if json.loads(json.dumps(identity[k])) != stored.get(k))
        raise StageError(f"study_name: {config.study_name!r} in {config.storage} was started with another "
                         f"{', '.join(changed)}; give this search a new study_name (or delete the storage)")
    settle_interrupted(study, config)
    total = budget(config)
    while (done := sum(counted(t) for t in study.get_trials(deepcopy=False))) < total:
        batch = min(config.parallel, total - done)
        if config.strategy == "grid":
            for point in next_grid_points(study, config, batch):
                study.enqueue_trial(point)  # ask() hands these out first
        trials, settings, chosen, numbers, labels = [], {}, [], {}, {}
        for i in range(batch):
            trial = study.ask()
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
    return leaderboard(study, config)


# The leaderboard


def secondary_of(trial, config: SearchConfig) -> float | None:
    """A trial's tie-breaker as recorded when it finished; else (a trial settled after a stop, or recorded under
    another secondary metric) read from its experiment; None when it has none."""
    if not config.secondary:
        return None
    recorded = trial.user_attrs.get("secondary") or {}
    if recorded.get("metric") == config.secondary:
        return recorded["value"]
    ref = experiment_ref(trial.user_attrs["experiment"]) if "experiment" in trial.user_attrs else None
    try:
        return metric_value(config.secondary, ref, "objective.secondary.metric") if ref else None
    except StageError:
        return None


def rank_key(row: dict, config: SearchConfig) -> tuple:
    """By the objective, then the secondary metric (which orders ties), then the trial's number; no value last."""
    sign = -1 if config.direction == "maximize" else 1
    second_sign = -1 if config.secondary_direction == "maximize" else 1
    value, second = row["value"], row["secondary"]
    return (value is None, sign * value if value is not None else 0,
            second is None, second_sign * second if second is not None else 0, row["trial"])


def join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def best_tie(rows: list[dict], config: SearchConfig) -> dict | None:
    """When the best trials (rows, ranked) tie on the objective: which, and whether and how the tie was broken."""
    if not rows or rows[0]["value"] is None:
        return None
    tied = [row for row in rows if row["value"] == rows[0]["value"]]  # equal counts give equal scores exactly
    if len(tied) < 2:
        return None
    names = [row["experiment"] for row in tied]
    still = [row["experiment"] for row in tied if row["secondary"] == tied[0]["secondary"]]
    summary = f"the best trials tie on {config.metric_key} = {tied[0]['value']:g}: {join(names)}"
    if not config.secondary:
        summary += "; not broken: search.yaml names no objective.secondary to break it"
    elif tied[0]["secondary"] is None:
        summary += f"; not broken: none of them has {config.secondary}"
    elif len(still) > 1:
        summary += f"; not broken: {join(still)} also tie on {config.secondary_key} = {tied[0]['secondary']:g}"
    else:
        values = ", ".join(f"{row['experiment']} {row['secondary']:g}" if row["secondary"] is not None
                           else f"{row['experiment']} none" for row in tied)
        summary += f"; broken by {config.secondary_key} ({config.secondary_direction}): {values}"
    return {"trials": names, "value": tied[0]["value"], "broken": len(still) == 1,
            "broken_by": config.secondary if len(still) == 1 else None,
            "secondary_values": {row["experiment"]: row["secondary"] for row in tied},
            "still_tied": still if len(still) > 1 else [], "summary": summary}


def leaderboard(study, config: SearchConfig) -> dict:
    from optuna.trial import TrialState

    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.FAIL and "error" not in trial.user_attrs:
            continue  # interrupted and re-run as another trial
        value = trial.value if trial.state == TrialState.COMPLETE else None  # a pruned trial's value is a loss
        rows.append({"trial": trial.number, "experiment": trial.user_attrs.get("experiment"),
                     "state": trial.state.name.lower(), "value": value,
                     "secondary": secondary_of(trial, config) if value is not None else None, "params": trial.params,
                     "error": trial.user_attrs.get("error"), "pruned_at_step": trial.user_attrs.get("pruned_at_step")})
    rows.sort(key=lambda row: rank_key(row, config))
    best = rows[0] if rows and rows[0]["value"] is not None else None
    board = {"strategy": config.strategy, "objective": config.metric, "direction": config.direction,
             "secondary": {"metric": config.secondary, "direction": config.secondary_direction}
             if config.secondary else None,
             "overrides": config.overrides, "best": best, "tie": best_tie(rows, config), "trials": rows}
    out = Path(config.out_dir)
    write_json(out / "leaderboard.json", board)
    write_text(out / "leaderboard.md", markdown(board, config))
    return board


def cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(board: dict, config: SearchConfig) -> str:
    names = [d.name for d in config.space]
    title = f"# Search: {config.strategy}, {config.direction} {config.metric}"
    if config.secondary:
        title += f", ties: {config.secondary_direction} {config.secondary}"
    lines = [title, ""]
    best, tie = board["best"], board.get("tie")
    if tie and not tie["broken"]:
        lines += [(f"No single best: {join([f'**{n}**' for n in tie['still_tied']])} tie, listed by trial number "
                  f"(`dvc exp apply {best['experiment']}` restores the first)"), ""]
    elif best:
        lines += [(f"Best: **{best['experiment']}** with {config.metric_key} = {best['value']:g} "
                   f"(`dvc exp apply {best['experiment']}`)"), ""]
    if tie:
        lines += [f"**Tie:** {tie['summary']}", ""]
    if board["overrides"]:
        lines += ["Every trial: " + ", ".join(f"`{k}={v}`" for k, v in board["overrides"].items()), ""]
    metrics = [config.metric_key] + ([config.secondary_key] if config.secondary else [])
    rows = []
    for rank, row in enumerate(board["trials"], 1):
        value = f"{row['value']:g}" if row["value"] is not None else (row["error"] or "").splitlines()[-1][:60] \
            if row["state"] == "fail" else f"pruned at step {row['pruned_at_step']}"
        second = [f"{row['secondary']:g}" if row["secondary"] is not None else ""] if config.secondary else []
        rows.append([rank, row["experiment"], row["state"], value, *second,
                     *(cell(row["params"].get(n, "")) for n in names)])
    lines += markdown_table(["rank", "experiment", "state", *metrics, *names], rows)
    return "\n".join(lines) + "\n"


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


if __name__ == "__main__":
    run_main(main)
