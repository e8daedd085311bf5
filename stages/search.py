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
Writes <out_dir>/leaderboard.json and leaderboard.md, sorted by the objective.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stages.common import StageError, run_main, write_json, write_text
from stages.params import load_yaml
from stages.train import TRIAL_ENV  # set for a trial's `dvc exp run`: where the train stage reports for pruning

STRATEGIES = ("grid", "random", "bayes")
MEDIAN_PRUNER = {"n_startup_trials": 2, "n_warmup_steps": 0}  # prune from the third trial on, at any evaluation
SAMPLERS = ("tpe", "gp", "cmaes", "qmc")


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
    metric: str = "metrics/eval_finetuned.json:exact_match"
    direction: str = "maximize"
    pruner: str = "none"
    overrides: dict = field(default_factory=dict)
    study_name: str = "search"
    storage: str = "search/study.db"
    out_dir: str = "search"

    @property
    def metric_file(self) -> str:
        return self.metric.split(":", 1)[0]

    @property
    def metric_key(self) -> str:
        return self.metric.split(":", 1)[1]


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
    if raw.get("overrides") is None:
        raw["overrides"] = {}
    config = SearchConfig(space=[], **{k: raw[k] for k in known - {"objective", "space"} if k in raw},
                          metric=objective.get("metric", SearchConfig.metric),
                          direction=objective.get("direction", SearchConfig.direction))
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
    if config.direction not in ("maximize", "minimize"):
        problems.append(f"{path}: objective.direction: {config.direction!r} is not maximize or minimize")
    if ":" not in config.metric:
        problems.append(f"{path}: objective.metric: {config.metric!r} must be <metrics file>:<key>, "
                        "e.g. metrics/eval_finetuned.json:exact_match")
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


def objective_value(config: SearchConfig, ref: str) -> float:
    metrics = experiment_json(ref, config.metric_file)
    if metrics is None:
        raise StageError(f"objective.metric: the experiment has no {config.metric_file}")
    value = metrics
    for part in config.metric_key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise StageError(f"objective.metric: {config.metric_file} has no key {config.metric_key!r} "
                             f"(it has: {', '.join(sorted(metrics))})")
        value = value[part]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise StageError(f"objective.metric: {config.metric} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise StageError(f"objective.metric: {config.metric} is {number}")
    return number


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# The search


def experiment_name(config: SearchConfig, number: int) -> str:
    return f"{config.study_name}-{number}"


def settle_interrupted(study, config: SearchConfig) -> None:
    """Trials left running by a search that was stopped: the result if its experiment finished, else failed."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ref = experiment_ref(experiment_name(config, trial.number))
        if ref is not None:
            try:
                study.tell(trial.number, objective_value(config, ref))
                print(f"trial {trial.number}: finished before the stop; recorded")
                continue
            except StageError:
                pass
        study.tell(trial.number, state=TrialState.FAIL)
        print(f"trial {trial.number}: interrupted; it will be run again as a new trial")


def counted(trial) -> bool:
    """Finished trials count toward the budget; an interrupted one (failed without an error of its own) does not."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def record(study, trial, config: SearchConfig, ok: bool, error: str = "") -> None:
    from optuna.trial import TrialState

    name = trial.user_attrs["experiment"]
    if not ok:
        trial.set_user_attr("error", error or "failed")
        study.tell(trial, state=TrialState.FAIL)
        print(f"trial {trial.number} ({name}): FAILED\n{error}")
        return
    ref = experiment_ref(name)
    try:
        if ref is None:
            raise StageError(f"no experiment named {name} was recorded")
        value = objective_value(config, ref)
    except StageError as err:
        trial.set_user_attr("error", str(err))
        study.tell(trial, state=TrialState.FAIL)
        print(f"trial {trial.number} ({name}): FAILED: {err}")
        return
    train_metrics = experiment_json(ref, "metrics/train.json") or {}
    if train_metrics.get("pruned_at_step"):
        trial.set_user_attr("pruned_at_step", train_metrics["pruned_at_step"])
        trial.set_user_attr("value_when_pruned", value)
        study.tell(trial, state=TrialState.PRUNED)
        print(f"trial {trial.number} ({name}): pruned at step {train_metrics['pruned_at_step']}")
        return
    study.tell(trial, value)
    print(f"trial {trial.number} ({name}): {config.metric_key} = {value:g}")


def run_sequential(study, trial, config: SearchConfig, settings: list[str], storage_url: str) -> None:
    name = trial.user_attrs["experiment"]
    env = dict(os.environ)
    if config.pruner != "none":
        env[TRIAL_ENV] = json.dumps({"storage": storage_url, "study": config.study_name,
                                     "trial_id": trial._trial_id, "median_pruner": MEDIAN_PRUNER})
    done = dvc("exp", "run", "--temp", "--name", name, *settings, env=env, check=False)
    record(study, trial, config, done.returncode == 0, tail(done.stderr or done.stdout))


def run_queued(study, trials: list, config: SearchConfig, settings: dict[int, list[str]]) -> None:
    for trial in trials:
        dvc("exp", "run", "--queue", "--name", trial.user_attrs["experiment"], *settings[trial.number])
    dvc("queue", "start", "-j", str(config.parallel))
    names = {trial.user_attrs["experiment"] for trial in trials}
    while True:
        status = dvc("queue", "status").stdout
        rows = [line.split() for line in status.splitlines()]
        if not any(len(r) > 2 and r[1] in names and r[-1] in ("Queued", "Running") for r in rows):
            break
        time.sleep(2)
    dvc("queue", "stop", check=False)
    for trial in trials:
        name = trial.user_attrs["experiment"]
        if experiment_ref(name) is None:
            logs = dvc("queue", "logs", name, check=False)
            record(study, trial, config, False, tail(logs.stdout + logs.stderr))
        else:
            record(study, trial, config, True)


def search(config: SearchConfig) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    Path(config.storage).parent.mkdir(parents=True, exist_ok=True)
    storage_url = f"sqlite:///{Path(config.storage).resolve()}"
    pruner = optuna.pruners.MedianPruner(**MEDIAN_PRUNER) if config.pruner == "median" \
        else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage_url, study_name=config.study_name, direction=config.direction,
                                sampler=sampler(config), pruner=pruner, load_if_exists=True)
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
        print(f"trials {done + 1}-{done + batch} of {total} ({config.strategy})")
        trials, settings = [], {}
        if config.strategy == "grid":
            for point in next_grid_points(study, config, batch):
                study.enqueue_trial(point)  # ask() hands these out first
        for _ in range(batch):
            trial = study.ask()
            values = {d.name: d.suggest(trial, config.strategy) for d in config.space}
            trial.set_user_attr("experiment", experiment_name(config, trial.number))
            trial.set_user_attr("overrides", config.overrides)
            settings[trial.number] = [arg for key, value in {**config.overrides, **values}.items()
                                      for arg in ("-S", set_param(key, value))]
            trials.append(trial)
        if config.parallel == 1:
            run_sequential(study, trials[0], config, settings[trials[0].number], storage_url)
        else:
            run_queued(study, trials, config, settings)
    return leaderboard(study, config)


def leaderboard(study, config: SearchConfig) -> dict:
    from optuna.trial import TrialState

    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.FAIL and "error" not in trial.user_attrs:
            continue  # interrupted and re-run as another trial
        value = trial.value if trial.state == TrialState.COMPLETE else None  # a pruned trial's value is a loss
        rows.append({"trial": trial.number, "experiment": trial.user_attrs.get("experiment"),
                     "state": trial.state.name.lower(), "value": value, "params": trial.params,
                     "error": trial.user_attrs.get("error"), "pruned_at_step": trial.user_attrs.get("pruned_at_step")})
    sign = -1 if config.direction == "maximize" else 1
    rows.sort(key=lambda r: (r["value"] is None, sign * r["value"] if r["value"] is not None else 0, r["trial"]))
    best = rows[0] if rows and rows[0]["value"] is not None else None
    board = {"strategy": config.strategy, "objective": config.metric, "direction": config.direction,
             "overrides": config.overrides, "best": best, "trials": rows}
    out = Path(config.out_dir)
    write_json(out / "leaderboard.json", board)
    write_text(out / "leaderboard.md", markdown(board, config))
    return board


def cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(board: dict, config: SearchConfig) -> str:
    names = [d.name for d in config.space]
    lines = [f"# Search: {config.strategy}, {config.direction} {config.metric}", ""]
    if board["best"]:
        best = board["best"]
        lines += [(f"Best: **{best['experiment']}** with {config.metric_key} = {best['value']:g} "
                   f"(`dvc exp apply {best['experiment']}`)"), ""]
    if board["overrides"]:
        lines += ["Every trial: " + ", ".join(f"`{k}={v}`" for k, v in board["overrides"].items()), ""]
    lines += ["| rank | experiment | state | " + config.metric_key + " | " + " | ".join(names) + " |",
              "|---" * (4 + len(names)) + "|"]
    for rank, row in enumerate(board["trials"], 1):
        value = f"{row['value']:g}" if row["value"] is not None else (row["error"] or "").splitlines()[-1][:60] \
            if row["state"] == "fail" else f"pruned at step {row['pruned_at_step']}"
        lines.append(f"| {rank} | {row['experiment']} | {row['state']} | {value} | "
                     + " | ".join(cell(row["params"].get(n, "")) for n in names) + " |")
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
