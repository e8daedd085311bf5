"""The real `dvc` CLI driving the real stages, at toy scale, in a fresh git repository."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import browser
import pytest
import yaml
from conftest import ROOT, copy_dvc_config
from test_daily_loop import undeclared

from finetune.metrics import DIAGNOSTICS_DROP, base_name

pytestmark = pytest.mark.e2e

# Secrets a user may have in the environment: the pipeline runs with them set and must write them nowhere.
CANARIES = {name: f"canary-{name.lower()}-7f3a9c" for name in (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN")}
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com", "HF_HUB_OFFLINE": "1", **CANARIES}
LOGS: list[str] = []  # everything the commands printed


def sh(repo: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=repo, env=ENV, capture_output=True, text=True)
    LOGS.append(done.stdout + done.stderr)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def canary_hits(repo: Path) -> list[str]:
    """Where any canary appears: every file in the repo (workspace, .dvc/cache, checkpoints with the Trainer's
    pickled training_args.bin), every git object (experiment commits included) and every log line."""
    hits = []
    blobs = [(str(p.relative_to(repo)), p.read_bytes()) for p in repo.rglob("*") if p.is_file()]
    objects = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=repo, capture_output=True)
    blobs += [("git objects", objects.stdout), ("logs", "".join(LOGS).encode())]
    for name, value in CANARIES.items():
        hits += [f"{name} in {where}" for where, data in blobs if value.encode() in data]
    return hits


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


def review(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.review", *args], cwd=repo, capture_output=True, text=True,
                          env=ENV, check=False)


def test_repro_is_incremental_and_experiments_show_metrics(dvc_repo, tmp_path):
    repo = dvc_repo
    sh(repo, "git", "init", "-q", "-b", "main")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    copy_dvc_config(repo)  # the offline plots page: browser.render refuses every network request
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "toy pipeline")

    out = dvc(repo, "repro")
    assert stages_run(out) == {"params", "base_model", "prepare", "train", "evaluate_base", "evaluate", "merge",
                               "compare"}
    read = {name: json.loads((repo / f"metrics/{name}.json").read_text())
            for name in ("compare", "eval_base", "eval_finetuned", "merge", "prepare", "headline")}
    for metric in ("exact_match", "bleu", "rouge1", "rouge2", "rougeL", "eval_loss", "perplexity"):
        assert read["compare"]["delta"][metric] == pytest.approx(
            read["eval_finetuned"]["finetuned"][metric] - read["eval_base"]["base"][metric], abs=1e-5)
    assert read["headline"] == {k: read["eval_finetuned"]["finetuned"][k]
                                for k in ("exact_match", "bleu", "rougeL", "eval_loss")}
    assert undeclared(repo) == []  # every metric written has a declared direction
    assert (repo / "metrics/compare.md").read_text().startswith("# Base vs fine-tuned")
    assert (repo / "models/finetuned/adapter_model.safetensors").exists()
    merge = read["merge"]["merge_check"]
    assert merge["greedy_agreement"] == 1.0 and merge["max_abs_logit_diff"] < 1e-3
    assert len((repo / "outputs/predictions_finetuned.jsonl").read_text().splitlines()) == \
        read["prepare"]["prepared"]["test_examples"]
    # quiet: no library warnings that are not about the run, no metrics JSON dumped, one line per logging step
    for noise in ("FutureWarning", "is_gradient_checkpointing", "gemm_4bit", '"summary": {', "{'loss'"):
        assert noise not in out, noise

    # progress in a log: plain lines (one per logging step, 10% marks), no carriage-return redraws
    assert "\r" not in out and re.search(r"^step 6/6 \(100%\): loss [0-9.]+, lr", out, re.M)
    assert re.search(r"^tokenize toy.jsonl: \d+/\d+ ", out, re.M) and re.search(r"^generate: \d+/\d+ ", out, re.M)
    check_plots_page(repo, tmp_path / "plots.png")

    again = dvc(repo, "repro")
    assert stages_run(again) == {"base_model"}  # always runs: milliseconds to hash the model's files
    assert "didn't change, skipping" in again and "unchanged" in again
    shown = json.loads(dvc(repo, "metrics", "show", "--json"))
    assert "metrics/train.json" in json.dumps(shown)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")

    # An evaluate-only param reruns evaluation and comparison, never prepare or train.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["max_new_tokens"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(dvc(repo, "repro")) == {"params", "base_model", "evaluate_base", "evaluate", "compare",
                                              "merge"}  # merge saves the generation settings with the export
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "shorter generations")

    # A new option in the tracking section, its schema code and its key: of the stages that do work, only train
    # (which reads that section) is out of date; prepare and evaluate_base are not ("params" checks the whole file).
    schema = repo / "finetune/config/tracking.py"
    schema.write_text(schema.read_text().replace(
        "    log_model: bool = True  # the adapter (or, for full fine-tuning, the whole model) as a run artifact\n",
        "    log_model: bool = True  # the adapter (or, for full fine-tuning, the whole model) as a run artifact\n"
        "    tags: list[str] | None = None  # extra run tags\n"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tracking"]["mlflow"]["tags"] = None
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = set(json.loads(dvc(repo, "status", "--json")))
    assert stale == {"params", "base_model", "train"}, stale  # base_model: always changed
    sh(repo, "git", "checkout", "finetune/config/tracking.py", "params.yaml")

    # A train param, as an experiment: train and everything downstream of it, and exp show reports its metrics.
    out = dvc(repo, "exp", "run", "-S", "train.learning_rate=0.001")
    assert stages_run(out) == {"params", "base_model", "train", "evaluate", "merge", "compare"}
    # The README's comparison: one documented --drop leaves a row that fits 200 characters, the changed param
    # and the headline in it (COLUMNS wide enough that rich truncates nothing).
    def exp_show(*flags: str) -> tuple[str, list[str]]:
        shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--no-pager", *flags, "--drop",
                                DIAGNOSTICS_DROP], cwd=repo, env={**ENV, "COLUMNS": "1000"}, capture_output=True,
                               text=True, check=True).stdout
        return shown, [line.rstrip() for line in shown.splitlines() if line.strip() and not set(line.strip()) <= {"─"}]

    shown, rows = exp_show("--only-changed")
    header = rows[0]
    assert "train.learning_rate" in header and "…" not in shown
    # the toy model learns too little in 6 steps to move its text scores; its eval loss moves
    assert header.index("eval_loss") < header.index("train.learning_rate")  # the headline leads
    assert max(map(len, rows)) <= 200, shown
    _, every = exp_show()  # without --only-changed: all four headline columns, before the params
    assert all(every[0].index(name) < every[0].index("data.path")
               for name in ("exact_match", "bleu", "rougeL", "eval_loss")), every[0]
    runs = find_runs(json.loads(dvc(repo, "exp", "show", "--json")))
    experiment = [r for r in runs
                  if r["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.001]
    baseline = [r for r in runs if r["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.005]
    assert experiment and baseline
    metrics = experiment[0]["data"]["metrics"]
    training = metrics["metrics/train.json"]["data"]["training"]
    assert training["steps"] == 6
    summary = training["summary"]
    assert summary["eval_loss"]["min"] == pytest.approx(training["best_eval_loss"], rel=1e-5)
    table = dvc(repo, "exp", "show", "--no-pager", "--md", "--sort-by", "training.summary.eval_loss.min",
                "--drop", ".*", "--keep", "Experiment|training.summary.eval_loss.min|train.learning_rate")
    assert "training.summary.eval_loss.min" in table.splitlines()[0] and f"{summary['eval_loss']['min']:.5g}" in table
    assert "exact_match" in metrics["metrics/compare.json"]["data"]["delta"]
    assert metrics["metrics/train.json"]["data"] != baseline[0]["data"]["metrics"]["metrics/train.json"]["data"]

    # DVC's run-cache: back to params already run (the baseline's learning rate), the outputs come back without
    # training or evaluating.
    again = dvc(repo, "exp", "run", "-S", "train.learning_rate=0.005")
    for stage in ("train", "evaluate", "merge"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in again, again
    assert "step " not in again and "generate: " not in again

    # Bad values set through -S get the same checks, and the failed run leaves every file as it was: the
    # repository's own, the outputs, the checkpoints and metrics/live (a section no stage reads is refused by the
    # params stage, which depends on the whole file).
    before, params_text, restores = workspace(repo), (repo / "params.yaml").read_text(), 0
    for setting, message in [("train.learning_rate=-1", "train.learning_rate: -1.0 must be positive"),
                             ("+train.learnig_rate=0.1", "did you mean train.learning_rate?"),
                             ("train.output_dir=.", "train.output_dir: . is the repository itself"),
                             ("train.learning_rate=1e400", "train.learning_rate: inf is not a finite number"),
                             ("+trian.seed=1", "trian: unknown key")]:
        failed = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", setting], cwd=repo, env=ENV,
                                capture_output=True, text=True)
        assert failed.returncode != 0 and message in failed.stdout + failed.stderr, setting
        (repo / "params.yaml").write_text(params_text)  # -S wrote the bad value there
        if workspace(repo) != before:
            # DVC removed the outputs of the stage it started (no output is persist, as the run-cache requires):
            # `dvc repro` of the params before restores every one of them from the run-cache, byte for byte
            restored = dvc(repo, "repro")
            assert "step " not in restored, setting  # nothing trained again
            restores += 1
        assert workspace(repo) == before, setting
    assert restores  # the train stage's refusals did start it
    sh(repo, "git", "checkout", "params.yaml")

    # The pull-request review of an experiment against main, with a planted regression: a learning rate too small
    # to learn anything in the toy's 6 steps.
    same = review(repo, "--base", "main", "--exp", "main")
    assert same.returncode == 0, same.stderr
    assert "no regressions" in same.stdout and len(same.stdout.strip().splitlines()) == 1
    assert "No params changed." in (repo / "review/review.md").read_text()
    # A change that moves only timings (the kept checkpoints) is no regression, though train ran again.
    dvc(repo, "exp", "run", "--temp", "--name", "keep-3", "-S", "train.save_total_limit=3")
    timing = review(repo, "--base", "main", "--exp", "keep-3", "--out", "review/keep-3.md")
    assert timing.returncode == 0, timing.stderr
    assert "no regressions" in timing.stdout
    report = (repo / "review/keep-3.md").read_text()
    assert "**Verdict: no regressions.**" in report and "| `train.save_total_limit` | 2 | 3 |" in report
    assert "| metrics/train.json | training.train_time_s |" in report  # shown, folded, not judged
    dvc(repo, "exp", "run", "--temp", "--name", "tiny-lr", "-S", "train.learning_rate=1e-7",
        "-S", "tracking.mlflow.enabled=true", "-S", "tracking.wandb.enabled=true")  # W&B offline
    done = review(repo, "--base", "main", "--exp", "tiny-lr", "--out", "review/tiny-lr.md")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("regression: ") and len(done.stderr) < 300 and "review/tiny-lr.md" in done.stderr
    report = (repo / "review/tiny-lr.md").read_text()
    assert report.splitlines()[0] == "## Fine-tuning review: `tiny-lr` (after) against `main` (before)"
    assert report.splitlines()[2].startswith("**Verdict: ") and "regression(s)**" in report.splitlines()[2]
    assert "| `train.learning_rate` | 0.005 | 1e-07 |" in report  # the params diff
    eval_loss = next(line for line in report.splitlines() if line.startswith("| eval_loss |"))
    assert "↑ worse ⚠ regression" in eval_loss  # the headline table: higher loss, an up arrow, worse, flagged
    assert report.index("| eval_loss |") < report.index("### Params") < report.index("<details>")
    assert "| finetuned.perplexity |" in report.split("### Every other metric")[1].split("<details>")[0]
    image = repo / "review/tiny-lr_plots/loss.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 5000
    assert "![training and validation loss" in report and "tiny-lr_plots/loss.png" in report
    differ = re.search(r"(\d+) of (\d+) test predictions of the fine-tuned model differ", report)
    assert differ and 0 < int(differ[1]) <= int(differ[2])
    assert "| prompt | reference | `main` (before) | `tiny-lr` (after) |" in report
    overlaid = json.loads(dvc(repo, "plots", "diff", "main", "tiny-lr", "--json"))["data"]["loss"][0]
    assert set(overlaid["revisions"]) == {"main", "tiny-lr"}  # dvc plots diff: both runs' loss curves on one chart
    # the trackers: a temporary experiment (run in a copy under .dvc/tmp/exps) logs to the repository's own stores
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns/mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dvc-finetune").experiment_id])
    assert run.info.run_name == "tiny-lr" and run.info.status == "FINISHED" and run.data.metrics["final/steps"] == 6
    assert run.data.params["train.learning_rate"] == "1e-07"
    assert len(list((repo / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    artifact_root = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifact_root.is_relative_to(repo / "mlruns") and (artifact_root / "adapter/adapter_config.json").exists()

    # thresholds wide enough for every regressed metric let the same change pass
    flagged = [line.split("|") for line in report.splitlines() if "⚠ regression (threshold" in line]
    regressed = {base_name(cells[2] if cells[1].strip().startswith("metrics/") else cells[1]).strip()
                 for cells in flagged}  # | file | metric | ... below, | metric | ... in the headline
    wide = [arg for name in regressed for arg in ("--threshold", f"{name}=1e9")]
    assert review(repo, "--base", "main", "--exp", "tiny-lr", *wide).returncode == 0

    # Checkpoints stay in the workspace for resume but never enter the DVC cache (so never a dvc push).
    optimizer = next((repo / "models/checkpoints").glob("checkpoint-*/optimizer.pt"))
    md5 = hashlib.md5(optimizer.read_bytes()).hexdigest()
    assert not (repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).exists()
    assert canary_hits(repo) == []


def workspace(repo: Path) -> dict[str, str]:
    """Every file of the workspace (git's and DVC's internals aside) with its digest."""
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(repo.rglob("*"))
            if p.is_file() and not p.relative_to(repo).parts[0] == ".git"
            and not p.relative_to(repo).as_posix().startswith(".dvc/tmp")}


def check_plots_page(repo: Path, screenshot: Path) -> None:
    """`dvc plots show` writes the page; in headless Chromium, it draws every plot that has data."""
    page = Path(dvc(repo, "plots", "show").strip().splitlines()[-1].removeprefix("file://"))
    assert page == repo / "dvc_plots/index.html"
    if not browser.chromium():
        assert os.environ.get("REQUIRE_BROWSER") != "1", "no Chromium: install Debian's chromium (see README)"
        warnings.warn("Chromium not found: dvc plots show's page was written but not opened in a browser")
        return
    plots, errors = browser.render(page, screenshot)
    assert errors == []
    assert browser.plots_with_data(page) == ["loss", "learning_rate", "grad_norm", "throughput",
                                             "metrics_compare_scores_json"]  # confusion: free-text toy data
    for plot_id in ("loss", "learning_rate", "grad_norm", "throughput"):
        drawn, coloured = plots[plot_id]
        assert drawn > 3000 and coloured > 300, (plot_id, plots[plot_id])  # axes, text and the coloured curves
    assert plots["metrics_compare_scores_json"][0] > 3000  # axes and labels (the toy's scores are near 0)
    assert plots["metrics_confusion_finetuned_json"][0] < 100  # an empty plot draws (almost) nothing


@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="about 6 minutes of DVC queue workers; RUN_SLOW=1")
def test_queued_experiments_in_parallel_match_sequential_runs(dvc_repo):
    repo = dvc_repo
    sh(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "toy pipeline")
    dvc(repo, "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    queued_runs_match_sequential_runs(repo)
    assert canary_hits(repo) == []


def queued_runs_match_sequential_runs(repo: Path) -> None:
    """Six queued experiments on two workers: three settings, each queued twice so that identical runs also race
    each other. All must succeed, twins must agree, and each must equal the same setting run on its own."""
    settings = [3, 4, 6] * 2
    for tokens in settings:
        dvc(repo, "exp", "run", "--queue", "-S", f"evaluate.max_new_tokens={tokens}")
    dvc(repo, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 900
    while "Queued" in (status := dvc(repo, "queue", "status")) or "Running" in status:
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert status.count("Success") == 6, status
    parallel: dict[int, list[dict]] = {}
    for run in find_runs(json.loads(dvc(repo, "exp", "show", "--json"))):
        tokens = run["data"]["params"]["params.yaml"]["data"]["evaluate"]["max_new_tokens"]
        if run.get("name") and tokens in settings:
            parallel.setdefault(tokens, []).append(run["data"]["metrics"]["metrics/compare.json"]["data"]["delta"])
    for tokens in sorted(set(settings)):  # one after another, in the workspace
        dvc(repo, "exp", "run", "-S", f"evaluate.max_new_tokens={tokens}")
        sequential = json.loads((repo / "metrics/compare.json").read_text())["delta"]
        assert len(parallel[tokens]) >= 2 and all(p == sequential for p in parallel[tokens]), tokens


def test_bundled_conversations_end_to_end(tmp_path):
    """The bundled model on the bundled conversations through `dvc repro`, offline: ChatML's tokens added and trained,
    the final turns answered far above the base, the merged export generating exactly as the adapter."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for folder in ("stages", "finetune", "tools", "models/base"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", "data/raw/conversations.jsonl"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["path"] = "data/raw/conversations.jsonl"
    params["prepare"].update(chat_template="chatml", max_length=160)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    copy_dvc_config(repo)
    dvc(repo, "repro")
    base = json.loads((repo / "metrics/eval_base.json").read_text())["base"]
    tuned = json.loads((repo / "metrics/eval_finetuned.json").read_text())["finetuned"]
    assert base["exact_match"] <= 5 and tuned["exact_match"] >= 50, (base["exact_match"], tuned["exact_match"])
    print(f"conversations: exact match {base['exact_match']} base, {tuned['exact_match']} fine-tuned")
    meta = json.loads((repo / "data/prepared/prepared.json").read_text())
    assert meta["format"] == "conversations" and sorted(meta["chat"]["added_tokens"]) == ["<|im_end|>",
                                                                                        "<|im_start|>"]
    first = json.loads((repo / "outputs/predictions_finetuned.jsonl").read_text().splitlines()[0])
    assert first["messages"][-1]["content"] == first["reference"] and first["prompt"].endswith("assistant\n")
    merge = json.loads((repo / "metrics/merge.json").read_text())["merge_check"]
    assert merge["greedy_agreement"] == 1.0
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(repo / "models/merged")
    assert saved.eos_token == "<|im_end|>" and "<|im_start|>assistant" in saved.apply_chat_template(
        first["messages"][:-1], tokenize=False, add_generation_prompt=True)
    # predict continues a conversation from a file exactly as evaluate answered its final turn
    chats = repo / "chats.jsonl"
    records = [json.loads(line) for line in (repo / "outputs/predictions_finetuned.jsonl").read_text().splitlines()]
    chats.write_text("".join(json.dumps({"messages": r["messages"][:-1]}) + "\n" for r in records[:8]))
    answers = sh(repo, sys.executable, "-m", "tools.predict", "--file", "chats.jsonl", "--jsonl")
    lines = [json.loads(line) for line in answers.splitlines() if line.startswith("{")]
    assert [a["prediction"] for a in lines] == [r["prediction"] for r in records[:8]]
