"""search.yaml: the search space, the strategy and the objective, every problem reported at once."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from finetune.config.schema import build, load_yaml, located
from finetune.errors import StageError
from finetune.training import STUDY_STORAGE_ENV

MEDIAN_PRUNER = {"n_startup_trials": 2, "n_warmup_steps": 0}  # prune from the third trial on, at any evaluation


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
    push: str | None = None  # a git remote each finished trial's experiment is pushed to (dvc exp push)

    @property
    def metric_key(self) -> str:
        return self.metric.split(":", 1)[1]

    @property
    def secondary_key(self) -> str | None:
        return self.secondary.split(":", 1)[1] if self.secondary else None


def metric_problem(where: str, metric: str) -> list[str]:
    if all(metric.partition(":")[::2]):
        return []
    return [(f"{where}: {metric!r} must be <metrics file>:<key>, e.g. metrics/headline.json:exact_match "
            "(a dotted key reads a nested one: metrics/eval_finetuned.json:finetuned.exact_match)")]


# search.yaml's schema, read by the same machinery as params.yaml (finetune/config/schema.py): unknown keys with the
# closest valid one, missing and mistyped values, every problem at once with its line.
@dataclass
class SecondaryFile:
    metric: str  # no defaults: a tie broken the wrong way is worse than one left standing
    direction: Literal["maximize", "minimize"]

    def problems(self) -> list[str]:
        return metric_problem("objective.secondary.metric", self.metric)


@dataclass
class ObjectiveFile:
    metric: str = SearchConfig.metric
    direction: Literal["maximize", "minimize"] = "maximize"
    secondary: SecondaryFile | None = None  # file:key and direction that rank trials tying on the objective

    def problems(self) -> list[str]:
        out = metric_problem("objective.metric", self.metric)
        if self.secondary is not None and self.secondary.metric == self.metric:
            out.append(f"objective.secondary.metric: {self.metric!r} is the objective itself; it cannot break a "
                       "tie on it")
        return out


@dataclass
class DimensionFile:
    type: Literal["categorical", "float", "int"]
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    values: list | None = None

    def checks(self) -> list[str]:
        """What is wrong with this dimension, worded for SearchFile.problems to name it."""
        out = []
        if self.log and self.step is not None:
            out.append("log: true and step cannot be combined")
        if self.type == "categorical":
            if not self.choices:
                out.append(".choices: a categorical dimension needs a non-empty list of choices")
        elif self.low is None or self.high is None:
            out.append("low and high must be numbers")
        elif self.low >= self.high:
            out.append(f"low ({self.low:g}) must be below high ({self.high:g})")
        elif self.log and self.low <= 0:
            out.append("log: true needs low > 0")
        return out


@dataclass
class SearchFile:
    strategy: Literal["grid", "random", "bayes"] = "bayes"
    sampler: Literal["tpe", "gp", "cmaes", "qmc"] = "tpe"
    startup_trials: int = 4
    trials: int = 8
    parallel: int = 1
    seed: int = 0
    objective: ObjectiveFile = field(default_factory=ObjectiveFile)
    pruner: Literal["none", "median"] = "none"
    overrides: dict | None = None
    space: dict[str, DimensionFile] = field(default_factory=dict)
    study_name: str = "search"
    # a SQLite file | journal:<path>, a journal file searches on several machines share over a shared filesystem |
    # a database URL (postgresql://...); DVC_FINETUNE_STUDY_STORAGE in the environment wins
    storage: str = "search/study.db"
    out_dir: str = "search"
    push: str | None = None  # a git remote to `dvc exp push` each finished trial to (its DVC outputs too)

    def problems(self) -> list[str]:
        out = [f"{key}: {getattr(self, key)} must be a positive integer" for key in ("trials", "parallel")
               if getattr(self, key) < 1]
        if self.startup_trials < 0:
            out.append(f"startup_trials: {self.startup_trials} must not be negative")
        if self.pruner != "none" and self.parallel != 1:
            out.append("pruner: needs parallel: 1 (queued workers cannot report to the study)")
        if self.strategy == "bayes" and self.sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
            out.append("sampler: cmaes needs the cmaes package (pip install cmaes)")
        if not self.space:
            out.append("space: expected a mapping of param: {type: ..., ...} with at least one param")
        for name, dim in self.space.items():
            out += [f"space.{name}{'' if p.startswith('.') else ': '}{p}" for p in dim.checks()]
            if self.strategy == "grid" and dim.type != "categorical" and not dim.values:
                out.append(f"space.{name}.values: the grid strategy needs the points of a {dim.type} dimension")
        return out


def load_config(path: Path) -> SearchConfig:
    """search.yaml -> SearchConfig; every problem reported at once, each naming the file, the line and the key."""
    if not path.exists():
        raise StageError(f"{path}: search config not found")
    text = path.read_text(encoding="utf-8")
    try:
        raw, node = load_yaml(text) or {}, yaml.compose(text)
    except yaml.YAMLError as err:
        raise StageError(f"{path}: not valid YAML: {err}") from None
    problems: list[str] = []
    found = build(SearchFile, raw, "", problems)
    if problems:
        raise StageError("invalid search config:\n  " + "\n  ".join(located(problems, node, str(path))))
    objective, secondary = found.objective, found.objective.secondary
    return SearchConfig(
        space=[Dimension(name=name, **dataclasses.asdict(dim)) for name, dim in found.space.items()],
        strategy=found.strategy, sampler=found.sampler, startup_trials=found.startup_trials, trials=found.trials,
        parallel=found.parallel, seed=found.seed, metric=objective.metric, direction=objective.direction,
        secondary=secondary.metric if secondary else None,
        secondary_direction=secondary.direction if secondary else SearchConfig.secondary_direction,
        pruner=found.pruner, overrides=found.overrides or {}, study_name=found.study_name, storage=found.storage,
        out_dir=found.out_dir, push=found.push)


def storage_spec(storage: str) -> str:
    """search.yaml's storage (or DVC_FINETUNE_STUDY_STORAGE, which wins) as finetune.training.study_storage takes
    it: a database URL as it is; a journal or SQLite file by its absolute path (DVC's temporary workspaces, where a
    pruned trial reports from, must name the same file), its folder created."""
    value = os.environ.get(STUDY_STORAGE_ENV) or storage
    if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):  # a relative file: made absolute
        value = value.removeprefix("sqlite:///")
    elif "://" in value:
        return value
    journal = value.startswith("journal:")
    path = Path(value.removeprefix("journal:")).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"journal:{path}" if journal else f"sqlite:///{path}"


@contextlib.contextmanager
def study_lock(spec: str):
    """Held while a search settles interrupted trials, counts the budget and takes its next trials (grid points
    included): two searches sharing a study then never take the same trial, point or share of the budget. A lock
    file beside a journal or SQLite file (Optuna's own open-with-O_EXCL lock, which works on NFS); a database URL
    has no file to lock: searches sharing one may overrun the budget by a trial or two."""
    from optuna.storages.journal import JournalFileOpenLock

    path = next((spec.removeprefix(scheme) for scheme in ("journal:", "sqlite:///") if spec.startswith(scheme)), None)
    if path is None:
        yield
        return
    lock = JournalFileOpenLock(f"{path}.search-lock")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def sampler(config: SearchConfig, taken: int = 0):
    """The sampler for the next trials, seeded by search.yaml's seed and the trials the study has taken so far: the
    same draws for the same history, and other draws for a search on another machine asking after it."""
    import optuna

    seed = config.seed + 100_003 * taken
    if config.strategy in ("grid", "random"):  # grid points are enqueued (see next_grid_points)
        return optuna.samplers.RandomSampler(seed=seed)
    if config.sampler == "tpe":
        # constant_liar: trials running at once (parallel, or in other searches sharing the study) are not all
        # drawn from the same model of the objective
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.startup_trials, constant_liar=True)
    if config.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=config.startup_trials)
    if config.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=config.startup_trials)
    return optuna.samplers.QMCSampler(seed=config.seed)  # a sequence: its position comes from the study


def grid_points(config: SearchConfig) -> list[dict]:
    names = [d.name for d in config.space]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(d.grid() for d in config.space))]


def budget(config: SearchConfig) -> int:
    return min(config.trials, len(grid_points(config))) if config.strategy == "grid" else config.trials


def next_grid_points(study, config: SearchConfig, n: int) -> list[dict]:
    """The grid in declared order, less the points already tried (a restart goes on where it stopped) or taken by
    a search running now (here or on another machine sharing the study)."""
    from optuna.trial import TrialState

    tried = [t.params or t.system_attrs.get("fixed_params", {}) for t in study.get_trials(deepcopy=False)
             if counted(t) or t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return [point for point in grid_points(config) if point not in tried][:n]


def counted(trial) -> bool:
    """Finished trials count toward the budget; an interrupted one (failed without an error of its own) does not."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)
