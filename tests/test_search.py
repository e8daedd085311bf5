"""Hyperparameter search over real DVC experiments, on a cheap stand-in stage in a temporary git + DVC repository."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.search import stand_in_repo
from stages import search
from stages.common import StageError

ROOT = Path(__file__).resolve().parent.parent


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def stand_in(tmp_path, monkeypatch) -> Path:
    repo = stand_in_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    return repo


def config_file(repo: Path, **overrides) -> Path:
    config = {"strategy": "random", "trials": 4, "seed": 0, "study_name": "s",
              "objective": {"metric": "metrics/score.json:score", "direction": "maximize"},
              "space": {"x": {"type": "float", "low": -2.0, "high": 4.0, "values": [1.0]},
                        "lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True, "values": [1e-3, 1e-2]},
                        "kind": {"type": "categorical", "choices": ["a", "b"]}}}
    config.update(overrides)
    path = repo / "search.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def experiments(repo: Path) -> set[str]:
    return {ref.rsplit("/", 1)[-1] for ref in git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split()}


@pytest.mark.parametrize("strategy, trials, expected", [("grid", 20, 4), ("random", 4, 4), ("bayes", 4, 4)])
def test_each_strategy_runs_its_trials_as_dvc_experiments(stand_in, strategy, trials, expected):
    config = search.load_config(config_file(stand_in, strategy=strategy, trials=trials, startup_trials=2))
    board = search.search(config)
    assert len(board["trials"]) == expected
    assert experiments(stand_in) == {f"s-{n}" for n in range(expected)}
    values = [t["value"] for t in board["trials"]]
    assert values == sorted(values, reverse=True)  # leaderboard sorted by the objective
    best = board["trials"][0]
    score = json.loads(git(stand_in, "show", f"{search.experiment_ref(best['experiment'])}:metrics/score.json"))
    assert score["score"] == best["value"]  # read back from the experiment itself
    if strategy == "grid":
        combos = {(t["params"]["x"], t["params"]["lr"], t["params"]["kind"]) for t in board["trials"]}
        assert len(combos) == 4
    if strategy == "random":
        assert all(1e-5 <= t["params"]["lr"] <= 1e-1 for t in board["trials"])
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True,
                           check=True).stdout
    assert all(f"s-{n}" in shown for n in range(expected))
    md = (stand_in / "search/leaderboard.md").read_text()
    assert f"dvc exp apply {best['experiment']}" in md and md.count("| s-") == expected


def test_a_failed_trial_is_recorded_and_the_search_goes_on(stand_in):
    config = search.load_config(config_file(
        stand_in, strategy="grid", space={"x": {"type": "categorical", "choices": [1.0, 5.0, 2.0]},
                                          "lr": {"type": "categorical", "choices": [1e-3]},
                                          "kind": {"type": "categorical", "choices": ["a"]}}))
    board = search.search(config)
    states = {t["params"]["x"]: t["state"] for t in board["trials"]}
    assert states == {1.0: "complete", 2.0: "complete", 5.0: "fail"}
    failed = next(t for t in board["trials"] if t["state"] == "fail")
    assert "x too large" in failed["error"]
    assert board["best"]["params"]["x"] == 1.0 and board["trials"][-1]["state"] == "fail"


def test_a_stopped_search_resumes_with_only_the_remaining_trials(stand_in):
    path = config_file(stand_in, trials=4)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stages.search", "--config", str(path)], cwd=stand_in, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    finished = 0
    for line in proc.stdout:  # once two trials are done, kill the search and the trial it started, as Ctrl-C would
        finished += line.startswith("trial ") and ": score = " in line
        if finished == 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert experiments(stand_in) >= {"s-0", "s-1"}
    done = subprocess.run([sys.executable, "-m", "stages.search", "--config", str(path)], cwd=stand_in, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    board = json.loads((stand_in / "search/leaderboard.json").read_text())
    assert sorted(t["state"] for t in board["trials"]) == ["complete"] * 4
    ran_again = [line for line in done.stdout.splitlines() if line.startswith("trials ")]
    assert ran_again == ["trials 3-3 of 4 (random)", "trials 4-4 of 4 (random)"]
    names = {t["experiment"] for t in board["trials"]}
    assert {"s-0", "s-1"} <= names
    if "trial 2: interrupted" in done.stdout:  # killed mid-trial (else: killed before it started)
        assert "s-2" not in names and names == {"s-0", "s-1", "s-3", "s-4"}


def test_a_changed_search_config_is_not_mixed_into_an_old_study(stand_in):
    search.search(search.load_config(config_file(stand_in, trials=1)))
    changed = search.load_config(config_file(stand_in, trials=2, objective={"metric": "metrics/score.json:score",
                                                                            "direction": "minimize"}))
    with pytest.raises(StageError, match="was started with another direction; give this search a new study_name"):
        search.search(changed)


@pytest.mark.parametrize("change, message", [
    ({"strategy": "annealing"}, "strategy: 'annealing' is not one of grid, random, bayes"),
    ({"objective": {"metric": "score"}}, "objective.metric: 'score' must be <metrics file>:<key>"),
    ({"space": {"x": {"type": "float", "low": 3, "high": 1}}}, "space.x: low (3) must be below high (1)"),
    ({"space": {"x": {"type": "float", "low": 0, "high": 1, "log": True}}}, "space.x: log: true needs low > 0"),
    ({"strategy": "grid", "space": {"x": {"type": "float", "low": 0, "high": 1}}}, "space.x.values: the grid"),
    ({"trails": 3}, "trails: unknown key"),
    ({"space": {"x": {"low": 0, "high": 1}}}, "space.x.type: missing"),
    ({"parallel": "two"}, "parallel: 'two' must be a positive integer"),
])
def test_bad_search_config_names_file_and_key(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)  # reading a config needs no repository
    with pytest.raises(StageError, match=re.escape("search.yaml: " + message)):
        search.load_config(config_file(tmp_path, **change))


def test_parallel_trials_are_queued_and_run_by_dvc_workers(stand_in):
    config = search.load_config(config_file(stand_in, trials=2, parallel=2))
    board = search.search(config)
    assert sorted(t["state"] for t in board["trials"]) == ["complete", "complete"]
    assert experiments(stand_in) == {"s-0", "s-1"}
    queued = subprocess.run([sys.executable, "-m", "dvc", "queue", "status"], capture_output=True, text=True,
                            check=True).stdout
    assert "Success" in queued and "Failed" not in queued


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_a_trial_trailing_the_median_stops_training_early(workdir, monkeypatch, direction):
    """Whatever the objective's direction, the trial with the higher validation loss is the one stopped."""
    import optuna

    from stages import prepare, train
    from stages.params import load_params

    sign = -1 if direction == "maximize" else 1  # how the train stage reports a loss to this study
    storage = f"sqlite:///{workdir / 'study.db'}"
    study = optuna.create_study(study_name="p", storage=storage, direction=direction,
                                pruner=optuna.pruners.MedianPruner(**search.MEDIAN_PRUNER))
    for _ in range(2):  # two earlier trials with a far lower validation loss at every evaluation
        earlier = study.ask()
        for step in (3, 6):
            earlier.report(sign * 0.01, step)
        study.tell(earlier, 1.0)
    trial = study.ask()
    monkeypatch.setenv(train.TRIAL_ENV, json.dumps({"storage": storage, "study": "p", "trial_id": trial._trial_id,
                                                    "median_pruner": search.MEDIAN_PRUNER}))
    params = load_params()
    prepare.run(params)
    metrics = train.run(params)
    assert metrics["pruned_at_step"] == 3 and metrics["steps"] == 3  # of max_steps 6
    assert study.trials[-1].intermediate_values == {3: pytest.approx(sign * metrics["best_eval_loss"])}
