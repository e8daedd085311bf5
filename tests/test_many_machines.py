"""Experiments shared across machines, two clones standing for two machines: a bare git repository is their git
remote and the DVC remote this repository configures (a folder beside the clone) their storage. An experiment run
on one is pushed, pulled on the other, shown, its model fetched and evaluated there, and reviewed; two searches
against one shared study (a journal file) run its budget once between them. Several processes at once:
RUN_MULTIPROCESS=1 (.ci/run sets it)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_dvc_config
from test_pipeline_dvc import ENV

from bench.search import SPACE, stand_in_repo

pytestmark = pytest.mark.skipif(os.environ.get("RUN_MULTIPROCESS") != "1",
                                reason="pipelines and searches on two clones; RUN_MULTIPROCESS=1 (.ci/run sets it)")


def sh(cwd: Path, *cmd: str, env: dict | None = None, ok: tuple[int, ...] = (0,)) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=1200)
    assert done.returncode in ok, f"{' '.join(cmd)} in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shown(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json`: each experiment's name -> its metrics files' data."""
    out = {}
    for baseline in json.loads(sh(repo, "dvc", "exp", "show", "--json", env={**ENV, "OMP_NUM_THREADS": "1"})):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = (rev.get("data") or {}).get("metrics") or {}
                out[rev.get("name") or exp.get("name")] = {f: d.get("data") for f, d in data.items()}
    return out


@pytest.fixture
def two_machines(dvc_repo, tmp_path) -> tuple[Path, Path]:
    """Machine A with the toy pipeline run and pushed (git to a bare repository, data to the DVC remote), and
    machine B a clone of it with the data pulled."""
    a = dvc_repo
    sh(a, "git", "init", "-q", "-b", "main")
    sh(a, "dvc", "init", "-q")
    copy_dvc_config(a)  # this repository's: the DVC remote `shared`, ../../dvc-finetune-storage from .dvc
    sh(a, "dvc", "repro")
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "toy pipeline, run")
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", "remote.git")
    sh(a, "git", "remote", "add", "origin", str(tmp_path / "remote.git"))
    sh(a, "git", "push", "-q", "origin", "main")
    sh(a, "dvc", "push")
    assert (tmp_path / "dvc-finetune-storage").is_dir()  # the default remote, beside the repository
    sh(tmp_path, "git", "clone", "-q", str(tmp_path / "remote.git"), "other")
    b = tmp_path / "other"
    sh(b, "dvc", "pull")
    return a, b


def test_an_experiment_from_one_machine_is_pulled_shown_evaluated_and_reviewed_on_another(two_machines, tmp_path):
    a, b = two_machines
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    sh(a, "dvc", "exp", "run", "--name", "from-a", "-S", "train.seed=5", "-S", "train.learning_rate=0.004", env=env)
    trained_a = json.loads((a / "metrics/train.json").read_text())["training"]
    evaluated_a = json.loads((a / "metrics/eval_finetuned.json").read_text())["finetuned"]
    adapter_a = digest(a / "models/finetuned/adapter_model.safetensors")
    sh(a, "dvc", "exp", "push", "origin", "from-a")  # its git ref to origin, its outputs to the DVC remote

    sh(b, "dvc", "exp", "pull", "origin", "from-a")
    listed = shown(b)
    assert "from-a" in listed
    assert listed["from-a"]["metrics/train.json"]["training"]["final_train_loss"] == trained_a["final_train_loss"]
    sh(b, "dvc", "exp", "apply", "from-a")  # the workspace as the experiment left it: the model from the remote
    assert digest(b / "models/finetuned/adapter_model.safetensors") == adapter_a
    assert yaml.safe_load((b / "params.yaml").read_text())["train"]["seed"] == 5

    # evaluated again here, by this machine (the stage forced to run): the same metrics
    (b / "metrics/eval_finetuned.json").unlink()
    sh(b, "dvc", "repro", "--force", "--single-item", "evaluate", env=env)
    assert json.loads((b / "metrics/eval_finetuned.json").read_text())["finetuned"] == evaluated_a

    out = sh(b, sys.executable, "-m", "tools.review", "--base", "main", "--exp", "from-a", "--out",
             str(tmp_path / "review.md"), env={**env, "PYTHONPATH": str(ROOT)}, ok=(0, 1))
    report = (tmp_path / "review.md").read_text()
    assert "from-a" in report and "exact_match" in report, out


SLOW_OBJECTIVE = "import time\ntime.sleep(1.5)  # a trial long enough for the searches to overlap\n"


def test_two_searches_on_two_machines_share_one_study_and_run_its_budget_once(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    a = stand_in_repo(tmp_path / "a")
    (a / "objective.py").write_text(SLOW_OBJECTIVE + (a / "objective.py").read_text())
    sh(a, "dvc", "repro", "-q")
    sh(a, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "storage"))
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "a slower stand-in")
    sh(tmp_path, "git", "init", "-q", "--bare", "remote.git")
    sh(a, "git", "remote", "add", "origin", str(tmp_path / "remote.git"))
    sh(a, "git", "push", "-q", "origin", "HEAD:main")
    sh(tmp_path, "git", "clone", "-q", "-b", "main", str(tmp_path / "remote.git"), "b")
    b = tmp_path / "b"
    journal = tmp_path / "shared/study.log"  # on a filesystem both machines reach
    config = {"strategy": "random", "trials": 4, "seed": 0, "study_name": "shared", "startup_trials": 4,
              "objective": {"metric": "metrics/score.json:score", "direction": "maximize"}, "space": SPACE,
              "storage": f"journal:{journal}", "push": "origin"}
    for repo in (a, b):
        (repo / "search.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    env = {**ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    searches = [subprocess.Popen([sys.executable, "-m", "tools.search"], cwd=repo, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for repo in (a, b)]
    outputs = [proc.communicate(timeout=900)[0] for proc in searches]
    assert [proc.returncode for proc in searches] == [0, 0], "\n\n".join(outputs)

    study = optuna.load_study(study_name="shared", storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)  # the budget, once
    names = [t.user_attrs["experiment"] for t in trials]
    assert len(set(names)) == 4
    assert len({t.params["lr"] for t in trials}) == 4  # each machine drew its own values, none the other's
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2  # both searches ran trials
    ran = [{ref.rsplit("/", 1)[-1] for ref in sh(repo, "git", "for-each-ref", "--format=%(refname)",
                                                  "refs/exps").split()} for repo in (a, b)]
    assert not ran[0] & ran[1] and ran[0] | ran[1] == set(names)  # no trial ran on both machines
    pushed = {ref.rsplit("/", 1)[-1] for ref in sh(a, "git", "ls-remote", "origin", "refs/exps/*").split()[1::2]}
    assert pushed == set(names)  # every trial's experiment is on the shared git remote

    # the search again, on either machine: nothing left to run, and a leaderboard of every machine's trials
    again = sh(b, sys.executable, "-m", "tools.search", env=env)
    assert "trial 1 of" not in again and "of 4 (random)" not in again
    board = json.loads((b / "search/leaderboard.json").read_text())
    assert sorted(row["experiment"] for row in board["trials"]) == sorted(names)
    assert {row["worker"] for row in board["trials"]} == workers
