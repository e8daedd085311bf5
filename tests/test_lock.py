"""The committed dvc.lock records what the committed code and params produce: the metrics in the repository were made
by this code. A change to a stage's code, its params or the raw data without rerunning the pipeline (`dvc repro`)
and committing the new dvc.lock fails here."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from conftest import ROOT


def stale_entries(status: dict, outputs: set[str]) -> list[str]:
    """What `dvc status --json` reports as changed, other than the stages' outputs missing from a fresh clone (the
    DVC cache is not in the repository), as outputs or as a later stage's dependencies."""
    stale = []
    for stage, changes in status.items():
        for change in changes:
            if change == "always changed":  # base_model: it runs every time; its output must still match
                continue
            if isinstance(change, str):  # "changed command"
                stale.append(f"{stage}: {change}")
                continue
            for kind, entries in change.items():
                for path, what in entries.items():
                    output = any(path == o or path.startswith(o + "/") for o in outputs)
                    missing_output = output and what in ("deleted", "not in cache")
                    if not missing_output:
                        stale.append(f"{stage}: {kind}: {path} {what}")
    return stale


def lock_outputs() -> set[str]:
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    return {out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def test_committed_lock_matches_the_code_params_and_data():
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    stale = stale_entries(json.loads(done.stdout or "{}"), lock_outputs())
    assert stale == [], "dvc.lock is stale; run `dvc repro` and commit dvc.lock and the metrics:\n" + "\n".join(stale)
