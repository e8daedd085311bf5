"""The pull-request review of a real experiment against main, in a temporary git + DVC repository (toy scale)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline_dvc import ENV, dvc, sh

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def review(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.review", *args], cwd=repo, capture_output=True, text=True,
                          env={**ENV, "PYTHONPATH": str(ROOT)})


def test_review_of_an_experiment_against_main(dvc_repo):
    repo = dvc_repo
    sh(repo, "git", "init", "-q", "-b", "main")
    dvc(repo, "init", "-q")
    dvc(repo, "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")

    same = review(repo, "--base", "main")
    assert same.returncode == 0, same.stderr
    assert "No regressions flagged." in same.stdout and "No params changed." in same.stdout

    # A planted regression: a learning rate too small to learn anything in the toy's 6 steps.
    dvc(repo, "exp", "run", "--name", "tiny-lr", "-S", "train.learning_rate=1e-7")
    done = review(repo, "--base", "main", "--exp", "tiny-lr", "--out", "review/tiny-lr.md")
    assert done.returncode == 1, done.stderr
    assert "regression: " in done.stderr
    report = (repo / "review/tiny-lr.md").read_text()
    assert report.strip() in done.stdout
    assert "| `train.learning_rate` | 0.005 | 1e-07 |" in report  # the params diff
    eval_loss = next(line for line in report.splitlines() if "| eval_loss |" in line and "eval_finetuned" in line)
    assert "↑ worse ⚠ regression" in eval_loss  # higher loss: an up arrow, worse, flagged
    image = repo / "review/tiny-lr_plots/loss.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 5000
    assert "![training and validation loss" in report and "tiny-lr_plots/loss.png" in report
    differ = re.search(r"(\d+) of (\d+) test predictions differ", report)
    assert differ and 0 < int(differ[1]) <= int(differ[2]) and "| prompt | reference | base | new |" in report

    # A threshold wide enough for every regressed metric lets the same change pass.
    regressed = [line.split("|")[2].strip().rsplit(".", 1)[-1] for line in report.splitlines() if "⚠" in line]
    wide = [arg for name in set(regressed) for arg in ("--threshold", f"{name}=1e9")]
    assert review(repo, "--base", "main", "--exp", "tiny-lr", *wide).returncode == 0
