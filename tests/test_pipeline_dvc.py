"""The real `dvc` CLI driving the real stages, at toy scale, in a fresh git repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def sh(repo: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=repo, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def dvc(repo: Path, *args: str) -> str:
    return sh(repo, sys.executable, "-m", "dvc", *args)


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def find_runs(node) -> list[dict]:
    """Every {'params': ..., 'metrics': ...} record in `dvc exp show --json` output, whatever its nesting."""
    found = []
    if isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and "params" in data and "metrics" in data:
            found.append(node)
        for value in node.values():
            found += find_runs(value)
    elif isinstance(node, list):
        for value in node:
            found += find_runs(value)
    return found


def test_repro_is_incremental_and_experiments_show_metrics(dvc_repo):
    repo = dvc_repo
    sh(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "toy pipeline")

    out = dvc(repo, "repro")
    assert stages_run(out) == {"prepare", "train", "evaluate_base", "evaluate", "merge", "compare"}
    compare = json.loads((repo / "metrics/compare.json").read_text())
    for metric in ("exact_match", "bleu", "rouge1", "rouge2", "rougeL", "eval_loss", "perplexity"):
        row = compare[metric]
        assert row["delta"] == pytest.approx(row["finetuned"] - row["base"], abs=1e-5)
    assert (repo / "metrics/compare.md").read_text().startswith("# Base vs fine-tuned")
    assert (repo / "models/finetuned/adapter_model.safetensors").exists()
    merge = json.loads((repo / "metrics/merge.json").read_text())
    assert merge["greedy_agreement"] == 1.0 and merge["max_abs_logit_diff"] < 1e-3
    assert len((repo / "outputs/predictions_finetuned.jsonl").read_text().splitlines()) == \
        json.loads((repo / "metrics/prepare.json").read_text())["test_examples"]

    again = dvc(repo, "repro")
    assert stages_run(again) == set() and "up to date" in again
    shown = json.loads(dvc(repo, "metrics", "show", "--json"))
    assert "metrics/train.json" in json.dumps(shown)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")

    # An evaluate-only param reruns evaluation and comparison, never prepare or train.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["max_new_tokens"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(dvc(repo, "repro")) == {"evaluate_base", "evaluate", "compare"}
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "shorter generations")

    # A train param, as an experiment: train and everything downstream of it, and exp show reports its metrics.
    out = dvc(repo, "exp", "run", "-S", "train.learning_rate=0.001")
    assert stages_run(out) == {"train", "evaluate", "merge", "compare"}
    runs = find_runs(json.loads(dvc(repo, "exp", "show", "--json")))
    experiment = [r for r in runs
                  if r["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.001]
    baseline = [r for r in runs if r["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.005]
    assert experiment and baseline
    metrics = experiment[0]["data"]["metrics"]
    assert metrics["metrics/train.json"]["data"]["steps"] == 6
    assert "exact_match" in metrics["metrics/compare.json"]["data"]
    assert metrics["metrics/train.json"]["data"] != baseline[0]["data"]["metrics"]["metrics/train.json"]["data"]

    # Bad values set through -S get the same checks, and the failed run leaves the outputs as they were.
    before = {p: (repo / p).read_bytes() for p in ("metrics/train.json", "metrics/compare.json", "dvc.lock",
                                                     "models/finetuned/adapter_model.safetensors")}
    for setting, message in [("train.learning_rate=-1", "train.learning_rate: -1.0 must be positive"),
                             ("+train.learnig_rate=0.1", "did you mean train.learning_rate?")]:
        failed = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", setting], cwd=repo, env=ENV,
                                capture_output=True, text=True)
        assert failed.returncode != 0 and message in failed.stdout + failed.stderr
        assert {p: (repo / p).read_bytes() for p in before} == before
        sh(repo, "git", "checkout", "params.yaml")
