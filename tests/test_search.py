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
from conftest import run_prepare, run_train

from bench.search import stand_in_repo
from finetune.config.params import load_params
from finetune.errors import StageError
from finetune.training import TRIAL_ENV
from tools import search
from tools.search import experiments as search_experiments
from tools.search.config import Dimension, SearchConfig

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


# The stand-in stage again, writing the pipeline's metric layout (a flat metrics/headline.json, metrics/train.json
# nested under its group key) and printing step lines as the train stage does. exact_match ties b and c; eval_loss
# (the secondary metric) of c is the param x. With wait: true, each trial waits after its first line until the test
# has read that line in the search's own output, so a search that holds a trial's output back makes the trial fail.
STAGE = """
import json, pathlib, sys, time, yaml
p = yaml.safe_load(open("params.yaml"))
print(f"step 1/2 (50%): kind {p['kind']}", file=sys.stderr, flush=True)
seen = pathlib.Path(HANDSHAKE) / f"seen-{p['kind']}"
for _ in range(600 if p["wait"] else 0):
    if seen.exists():
        break
    time.sleep(0.1)
else:
    if p["wait"]:
        sys.exit("the search did not pass this trial's output on while it ran")
pathlib.Path("metrics").mkdir(exist_ok=True)
exact = {"a": 0.25, "b": 0.5, "c": 0.5}[p["kind"]]
loss = {"a": 1.0, "b": 0.9, "c": p["x"]}[p["kind"]]
json.dump({"exact_match": exact, "eval_loss": loss}, open("metrics/headline.json", "w"))
json.dump({"training": {"steps": 2}}, open("metrics/train.json", "w"))
print("step 2/2 (100%): done", file=sys.stderr, flush=True)
"""
HEADLINE_OBJECTIVE = {"metric": "metrics/headline.json:exact_match", "direction": "maximize",
                      "secondary": {"metric": "metrics/headline.json:eval_loss", "direction": "minimize"}}
KINDS = {"kind": {"type": "categorical", "choices": ["a", "b", "c"]}}


def restage(repo: Path, handshake: Path) -> None:
    """Swap the stand-in's stage for STAGE and commit it as the experiments' baseline."""
    (repo / "objective.py").write_text(STAGE.replace("HANDSHAKE", repr(str(handshake))))
    (repo / "params.yaml").write_text("x: 0.0\nlr: 0.01\nkind: a\nwait: false\n")
    stage = {"cmd": "python objective.py", "deps": ["objective.py"], "params": ["x", "lr", "kind", "wait"],
             "metrics": [{"metrics/headline.json": {"cache": False}}, {"metrics/train.json": {"cache": False}}]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"objective": stage}}, sort_keys=False))
    (repo / "metrics/score.json").unlink()
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=repo, check=True, capture_output=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "stand-in writing the pipeline's metric layout")


def run_and_answer(repo: Path, config: Path, handshake: Path) -> list[str]:
    """`python -m tools.search`, telling each waiting trial when its first line has come through; its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tools.search", "--config", str(config)], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if found := re.fullmatch(r"\[trial \d+\] step 1/2 \(50%\): kind (\w)", lines[-1]):
            (handshake / f"seen-{found[1]}").touch()
    assert proc.wait() == 0, "\n".join(lines)
    return lines


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
    ref = next(r for r in git(stand_in, "for-each-ref", "--format=%(refname)", "refs/exps").split()
               if r.endswith("/" + best["experiment"]))
    score = json.loads(git(stand_in, "show", f"{ref}:metrics/score.json"))
    assert score["score"] == best["value"]  # read back from the experiment itself (its git ref), independently
    assert search_experiments.experiment_metrics(best["experiment"])["metrics/score.json"] == score
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
    proc = subprocess.Popen([sys.executable, "-m", "tools.search", "--config", str(path)], cwd=stand_in, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    finished = 0
    for line in proc.stdout:  # once two trials are done, kill the search and the trial it started, as Ctrl-C would
        finished += line.startswith("trial ") and ": score = " in line
        if finished == 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert experiments(stand_in) >= {"s-0", "s-1"}
    done = subprocess.run([sys.executable, "-m", "tools.search", "--config", str(path)], cwd=stand_in, env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    board = json.loads((stand_in / "search/leaderboard.json").read_text())
    assert sorted(t["state"] for t in board["trials"]) == ["complete"] * 4
    ran_again = [line.split(":")[0] for line in done.stdout.splitlines() if " of 4 (random): " in line]
    assert ran_again == ["trial 3 of 4 (random)", "trial 4 of 4 (random)"]  # a killed trial's number goes on
    names = {t["experiment"] for t in board["trials"]}
    assert {"s-0", "s-1"} <= names
    if "s-2: interrupted" in done.stdout:  # killed mid-trial (else: killed before it started)
        assert "s-2" not in names and names == {"s-0", "s-1", "s-3", "s-4"}


def test_a_changed_search_config_is_not_mixed_into_an_old_study(stand_in):
    search.search(search.load_config(config_file(stand_in, trials=1)))
    changed = search.load_config(config_file(stand_in, trials=2, objective={"metric": "metrics/score.json:score",
                                                                            "direction": "minimize"}))
    with pytest.raises(StageError, match="was started with another direction; give this search a new study_name"):
        search.search(changed)


@pytest.mark.parametrize("change, message", [
    ({"strategy": "annealing"}, "strategy: 'annealing' is not 'grid' or 'random' or 'bayes'"),
    ({"objective": {"metric": "score"}}, "objective.metric: 'score' must be <metrics file>:<key>"),
    ({"space": {"x": {"type": "float", "low": 3, "high": 1}}}, "space.x: low (3) must be below high (1)"),
    ({"space": {"x": {"type": "float", "low": 0, "high": 1, "log": True}}}, "space.x: log: true needs low > 0"),
    ({"strategy": "grid", "space": {"x": {"type": "float", "low": 0, "high": 1}}}, "space.x.values: the grid"),
    ({"trails": 3}, "trails: unknown key"),
    ({"space": {"x": {"low": 0, "high": 1}}}, "space.x.type: missing"),
    ({"parallel": "two"}, "parallel: 'two' is not an integer"),
    ({"objective": {"metric": "m.json:a", "tiebreak": "m.json:b"}}, "objective.tiebreak: unknown key"),
    ({"objective": {"metric": "m.json:a", "secondary": "m.json:b"}}, "objective.secondary: expected a mapping"),
    ({"objective": {"metric": "m.json:a", "secondary": {"metric": "m.json:b"}}},
     "objective.secondary.direction: missing"),
    ({"objective": {"metric": "m.json:a", "secondary": {"metric": "eval_loss", "direction": "minimize"}}},
     "objective.secondary.metric: 'eval_loss' must be <metrics file>:<key>"),
    ({"objective": {"metric": "m.json:a", "secondary": {"metric": "m.json:a", "direction": "minimize"}}},
     "objective.secondary.metric: 'm.json:a' is the objective itself"),
    ({"objective": {"metric": "m.json:a", "secondary": {"metric": "m.json:b", "direction": "lowest"}}},
     "objective.secondary.direction: 'lowest' is not 'maximize' or 'minimize'"),
    ({"objective": {"metric": "m.json:a", "secondary": {"metric": "m.json:b", "direction": "minimize",
                                                        "wieght": 1}}}, "objective.secondary.wieght: unknown key"),
])
def test_bad_search_config_names_file_and_key(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)  # reading a config needs no repository
    with pytest.raises(StageError, match=r"search\.yaml:\d+: " + re.escape(message)):
        search.load_config(config_file(tmp_path, **change))


def test_parallel_trials_are_queued_run_by_dvc_workers_and_their_output_shown_as_they_run(stand_in, tmp_path):
    restage(stand_in, tmp_path)
    path = config_file(stand_in, strategy="grid", trials=3, parallel=2, objective=HEADLINE_OBJECTIVE,
                       space=KINDS, overrides={"wait": True})
    lines = run_and_answer(stand_in, path, tmp_path)  # each trial waits until the search has shown its first line
    board = json.loads((stand_in / "search/leaderboard.json").read_text())
    assert sorted(t["state"] for t in board["trials"]) == ["complete"] * 3, "\n".join(lines)
    assert experiments(stand_in) == {"s-0", "s-1", "s-2"}
    assert lines.index("trials 1-2 of 3 (grid, 2 at a time):") < lines.index("  trial 1: s-0 with kind=a") \
        < lines.index("  trial 2: s-1 with kind=b") < lines.index("trial 3 of 3 (grid): s-2 with kind=c")
    for number, kind in ((1, "a"), (2, "b"), (3, "c")):  # each worker's lines, under the trial's number
        assert f"[trial {number}] step 1/2 (50%): kind {kind}" in lines
        assert lines.count(f"[trial {number}] step 2/2 (100%): done") == 1  # passed on once, not per poll
    assert any(line.startswith("trial 1 of 3 (s-0): exact_match = 0.25") for line in lines)
    queued = subprocess.run([sys.executable, "-m", "dvc", "queue", "status"], capture_output=True, text=True,
                            check=True).stdout
    assert "Success" in queued and "Failed" not in queued


def test_a_trial_shows_its_own_output_as_it_runs_under_its_number(stand_in, tmp_path):
    restage(stand_in, tmp_path)
    path = config_file(stand_in, strategy="grid", objective=HEADLINE_OBJECTIVE,
                       space={"kind": {"type": "categorical", "choices": ["a", "b"]}}, overrides={"wait": True})
    lines = run_and_answer(stand_in, path, tmp_path)  # a trial whose first line is not shown at once fails
    for number, name, kind, score in ((1, "s-0", "a", 0.25), (2, "s-1", "b", 0.5)):
        started = lines.index(f"trial {number} of 2 (grid): {name} with kind={kind}")
        step = lines.index(f"[trial {number}] step 1/2 (50%): kind {kind}")
        ended = lines.index(f"trial {number} of 2 ({name}): exact_match = {score:g} (eval_loss 1)"
                            if kind == "a" else f"trial {number} of 2 ({name}): exact_match = {score:g} "
                            "(eval_loss 0.9)")
        assert started < step < lines.index(f"[trial {number}] step 2/2 (100%): done") < ended


def test_trials_are_numbered_from_one_in_the_order_they_start():
    one = search.round_lines(2, 3, "bayes", [("s-1", {"lr": 0.003, "r": 8})])
    assert one == ["trial 2 of 3 (bayes): s-1 with lr=0.003, r=8"]
    parallel = search.round_lines(3, 8, "random", [("s-2", {"lr": 1e-3}), ("s-5", {"lr": 2e-2})])
    assert parallel == ["trials 3-4 of 8 (random, 2 at a time):", "  trial 3: s-2 with lr=0.001",
                        "  trial 4: s-5 with lr=0.02"]


@pytest.mark.parametrize("c_loss, ranked, broken, says", [
    (0.7, ["s-2", "s-1", "s-0"], True, ("the best trials tie on exact_match = 0.5: s-2 and s-1; "
                                       "broken by eval_loss (minimize): s-2 0.7, s-1 0.9")),
    (0.9, ["s-1", "s-2", "s-0"], False, ("the best trials tie on exact_match = 0.5: s-1 and s-2; "
                                        "not broken: s-1 and s-2 also tie on eval_loss = 0.9")),
])
def test_a_tie_on_the_objective_is_broken_by_the_secondary_metric_or_said_to_stand(stand_in, tmp_path, c_loss,
                                                                                    ranked, broken, says):
    restage(stand_in, tmp_path)  # b and c tie on exact_match; c's eval_loss is c_loss, b's 0.9
    config = search.load_config(config_file(stand_in, strategy="grid", objective=HEADLINE_OBJECTIVE, space=KINDS,
                                            overrides={"x": c_loss}))
    board = search.search(config)
    assert [t["experiment"] for t in board["trials"]] == ranked  # s-1 first when nothing breaks the tie
    assert board["best"]["experiment"] == ranked[0]
    tie = board["tie"]
    assert tie["trials"] == ranked[:2] and tie["broken"] is broken and tie["summary"] == says
    assert tie["secondary_values"] == {"s-1": 0.9, "s-2": c_loss}  # read back from each experiment
    assert tie["still_tied"] == ([] if broken else ["s-1", "s-2"])
    md = (stand_in / "search/leaderboard.md").read_text()
    assert f"**Tie:** {says}" in md
    if broken:
        assert "Best: **s-2** with exact_match = 0.5" in md
    else:
        assert "No single best: **s-1** and **s-2** tie" in md and "Best:" not in md


def finished_trial(number: int, exact: float, loss: float | None, secondary: str = "m.json:eval_loss"):
    import optuna

    return optuna.trial.create_trial(
        value=exact, params={"kind": number}, user_attrs={
            "experiment": f"s-{number}", **({"secondary": {"metric": secondary, "value": loss}} if loss else {})},
        distributions={"kind": optuna.distributions.CategoricalDistribution(list(range(5)))})


@pytest.mark.parametrize("secondary, ranked, still_tied, says", [
    ("m.json:eval_loss", ["s-1", "s-3", "s-0", "s-4", "s-2"], ["s-1", "s-3"],
     ("the best trials tie on exact_match = 0.5: s-1, s-3, s-0 and s-4; not broken: s-1 and s-3 also tie on "
     "eval_loss = 0.3")),
    (None, ["s-0", "s-1", "s-3", "s-4", "s-2"], ["s-0", "s-1", "s-3", "s-4"],
     ("the best trials tie on exact_match = 0.5: s-0, s-1, s-3 and s-4; not broken: search.yaml names no "
     "objective.secondary to break it")),
])
def test_a_tie_is_broken_only_as_far_as_the_secondary_metric_separates_the_trials(tmp_path, monkeypatch, secondary,
                                                                                  ranked, still_tied, says):
    import optuna

    # s-4's experiment has no eval_loss either
    monkeypatch.setattr(search_experiments, "experiment_metrics", lambda name: None)
    study = optuna.create_study(direction="maximize")
    for number, exact, loss in ((0, 0.5, 0.4), (1, 0.5, 0.3), (2, 0.25, 0.1), (3, 0.5, 0.3), (4, 0.5, None)):
        study.add_trial(finished_trial(number, exact, loss))
    config = SearchConfig(space=[Dimension("kind", "categorical", choices=list(range(5)))],
                                 metric="m.json:exact_match", secondary=secondary, out_dir=str(tmp_path))
    board = search.leaderboard(study, config)
    assert [t["experiment"] for t in board["trials"]] == ranked  # s-2's low loss does not lift it past a tie
    assert board["tie"]["broken"] is False and board["tie"]["still_tied"] == still_tied
    assert board["tie"]["summary"] == says
    assert "No single best" in (tmp_path / "leaderboard.md").read_text()


def test_a_secondary_metric_recorded_under_another_name_does_not_break_a_tie(tmp_path, monkeypatch):
    import optuna

    monkeypatch.setattr(search_experiments, "experiment_metrics", lambda name: None)  # the experiments are gone
    study = optuna.create_study(direction="maximize")
    study.add_trial(finished_trial(0, 0.5, 0.9, secondary="m.json:perplexity"))
    study.add_trial(finished_trial(1, 0.5, 0.1, secondary="m.json:perplexity"))
    config = SearchConfig(space=[Dimension("kind", "categorical", choices=list(range(5)))],
                                 metric="m.json:exact_match", secondary="m.json:eval_loss", out_dir=str(tmp_path))
    board = search.leaderboard(study, config)
    assert board["tie"]["broken"] is False and "none of them has m.json:eval_loss" in board["tie"]["summary"]


def test_metric_keys_read_nested_values_and_name_what_is_there():
    headline = {"exact_match": 0.5, "eval_loss": 0.9}
    finetuned = {"finetuned": {"exact_match": 0.25, "summary": {"eval_loss": {"min": 0.8}}}}
    assert search_experiments.lookup(headline, "exact_match", "objective.metric: metrics/headline.json") == 0.5
    assert search_experiments.lookup(finetuned, "finetuned.exact_match", "objective.metric") == 0.25
    assert search_experiments.lookup(finetuned, "finetuned.summary.eval_loss.min", "objective.metric") == 0.8
    assert search_experiments.lookup({"eval.loss": 2}, "eval.loss", "objective.metric") == 2.0
    with pytest.raises(StageError, match=re.escape("objective.metric: no key 'exact_mach' under 'finetuned' "
                                                   "(found: exact_match, summary)")):
        search_experiments.lookup(finetuned, "finetuned.exact_mach", "objective.metric")
    with pytest.raises(StageError, match="finetuned is {.*}, not a number"):
        search_experiments.lookup(finetuned, "finetuned", "objective.metric")


def test_the_train_metrics_of_an_experiment_are_found_by_their_group():
    files = {"metrics/headline.json": {"exact_match": 0.5}, "m/train.json": {"training": {"pruned_at_step": 3}}}
    assert search_experiments.training_metrics(files)["pruned_at_step"] == 3
    assert search_experiments.training_metrics({"metrics/headline.json": {"exact_match": 0.5}}) == {}


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_a_trial_trailing_the_median_stops_training_early(workdir, monkeypatch, direction):
    """Whatever the objective's direction, the trial with the higher validation loss is the one stopped."""
    import optuna


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
    monkeypatch.setenv(TRIAL_ENV, json.dumps({"storage": storage, "study": "p", "trial_id": trial._trial_id,
                                                    "median_pruner": search.MEDIAN_PRUNER}))
    params = load_params()
    run_prepare(params)
    metrics = run_train(params)
    assert metrics["pruned_at_step"] == 3 and metrics["steps"] == 3  # of max_steps 6
    assert study.trials[-1].intermediate_values == {3: pytest.approx(sign * metrics["best_eval_loss"])}
