"""Faults injected into training: SIGKILL and resume, stale checkpoints, Ctrl-C, divergence; and determinism."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_prepare, run_train, stage_arguments

from finetune.config.params import load_params
from finetune.tracking.history import read_series
from finetune.training.callbacks import Diverged
from finetune.training.checkpoints import FINISHED, MARKER

# Long enough to be killed mid-run, aligned so that every checkpoint falls on a logging boundary.
RESUMABLE = {"max_steps": 40, "save_steps": 5, "logging_steps": 5, "eval_steps": 10, "save_total_limit": 3}
COMPARED = ("final_train_loss", "best_eval_loss", "final_eval_loss", "steps", "epochs", "tokens_trained")


def set_train(workdir: Path, **values) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["train"].update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def set_section(workdir: Path, section: str, **values) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    for key, value in values.items():
        params[section][key].update(value)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def start_train(workdir: Path) -> subprocess.Popen:
    # A shell that starts jobs in the background ignores SIGINT in them, and Python then keeps ignoring it;
    # restore the default so Ctrl-C reaches the stage as it would from a terminal.
    return subprocess.Popen([sys.executable, "-m", "stages.train", *stage_arguments("train")], cwd=workdir,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def train_to_end(workdir: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "stages.train", *stage_arguments("train")], cwd=workdir,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120, until=lambda path: True) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and until(path)):
        assert proc.poll() is None, f"training ended before {path} appeared:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def resumable(workdir):
    """A prepared workdir with resumable settings."""
    set_train(workdir, **RESUMABLE)
    run_prepare(load_params())
    return workdir


def test_killed_training_resumes_from_the_latest_complete_checkpoint_bit_exact(resumable, tmp_path_factory):
    workdir = resumable
    reference = tmp_path_factory.mktemp("reference")  # the same run, uninterrupted
    shutil.copytree(workdir, reference, dirs_exist_ok=True)
    train_to_end(reference)
    set_section(workdir, "tracking", mlflow={"enabled": True})  # tracked here (not part of what training does)
    proc = start_train(workdir)
    wait_for(workdir / "models/checkpoints/checkpoint-15" / MARKER, proc)
    # killed once step 20 is logged (so DVCLive holds rows past the checkpoint that will be resumed)
    wait_for(workdir / "models/checkpoints/live/plots/metrics/train/loss.tsv", proc,  # the run's own history
             until=lambda path: "\n20\t" in path.read_text())
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (workdir / "models/finetuned").exists() and not (workdir / "metrics/train.json").exists()
    for later in [p for p in (workdir / "models/checkpoints").glob("checkpoint-*") if p.name != "checkpoint-15"]:
        shutil.rmtree(later)  # so that the resume is from step 15, whatever the kill's timing
    # A checkpoint the kill cut short: the Trainer had started writing it, the marker never came.
    half = workdir / "models/checkpoints/checkpoint-20"
    half.mkdir()
    (half / "optimizer.pt").write_bytes(b"\0" * 10)

    out = train_to_end(workdir)
    assert "not resuming from models/checkpoints/checkpoint-20: half-written" in out
    assert "resuming from models/checkpoints/checkpoint-15:" in out

    adapter = "models/finetuned/adapter_model.safetensors"
    assert sha256(workdir / adapter) == sha256(reference / adapter)  # bit-exact weights
    ours = json.loads((workdir / "metrics/train.json").read_text())["training"]
    theirs = json.loads((reference / "metrics/train.json").read_text())["training"]
    assert {k: ours[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}
    # DVCLive kept the killed run's history up to the checkpoint and dropped what the resumed run replayed:
    # the same steps as the uninterrupted run, each once, with the same losses
    for series in ("train/loss", "eval/loss", "train/learning_rate"):
        assert read_series(workdir / "metrics/live", series) == read_series(reference / "metrics/live", series)
    elapsed = read_series(workdir / "metrics/live", "train/elapsed_s")
    assert [step for step, _ in elapsed] == list(range(5, 45, 5))
    assert all(a < b for (_, a), (_, b) in zip(elapsed, elapsed[1:]))  # the clock goes on across the resume
    # MLflow: the run the killed training started goes on, and the steps it had (15 to the kill) are not sent again:
    # every step once, the losses equal to DVCLive's. The clock of a step that MLflow got before the kill is the
    # killed run's, so for it only the steps are compared.
    (run,) = mlflow_runs(workdir)
    assert run.info.status == "FINISHED"
    for series in ("train/loss", "eval/loss", "train/learning_rate", "train/elapsed_s"):
        logged = [(m.step, m.value) for m in mlflow_client(workdir).get_metric_history(run.info.run_id, series)]
        live = read_series(workdir / "metrics/live", series)
        if series == "train/elapsed_s":
            logged, live = [step for step, _ in logged], [step for step, _ in live]
        assert sorted(logged) == live, series


def test_a_tracker_enabled_when_training_resumes_gets_the_history_so_far(resumable):
    run_train(load_params())  # untracked
    checkpoints = resumable / "models/checkpoints"
    (checkpoints / FINISHED).unlink()
    shutil.rmtree(checkpoints / "checkpoint-40")  # as if killed after step 35's checkpoint
    set_section(resumable, "tracking", mlflow={"enabled": True})
    run_train(load_params())  # resumes from step 35, now with MLflow
    (run,) = mlflow_runs(resumable)
    for series in ("train/loss", "eval/loss", "train/learning_rate"):
        logged = [(m.step, m.value) for m in mlflow_client(resumable).get_metric_history(run.info.run_id, series)]
        assert sorted(logged) == read_series(resumable / "metrics/live", series), series
    assert min(m.step for m in mlflow_client(resumable).get_metric_history(run.info.run_id, "train/loss")) == 5


def mlflow_client(workdir: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns/mlflow.db'}")


def mlflow_runs(workdir: Path) -> list:
    client = mlflow_client(workdir)
    return client.search_runs([client.get_experiment_by_name("dvc-finetune").experiment_id])


def test_checkpoints_of_other_params_are_never_resumed(resumable, capsys):
    params = load_params()
    run_train(params)
    (resumable / "models/checkpoints" / FINISHED).unlink()  # as if that run had been killed
    params.train.learning_rate = 1e-3  # another experiment now
    run_train(params)
    out = capsys.readouterr().out
    assert "from a run with other params, data or code; removing it" in out
    assert "starting fresh" in out and not re.search("^resuming from", out, re.M)


def test_a_finished_run_is_not_resumed(resumable, capsys):
    params = load_params()
    run_train(params)
    run_train(params)  # same params again, as dvc repro -f would
    out = capsys.readouterr().out
    assert "finished: starting fresh" in out and not re.search("^resuming from", out, re.M)


def test_ctrl_c_saves_nothing_final(resumable):
    workdir = resumable
    proc = start_train(workdir)
    wait_for(workdir / "models/checkpoints/checkpoint-10" / MARKER, proc)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate()[0]
    assert proc.returncode == 2 and "interrupted: nothing final was written" in output
    assert not (workdir / "models/finetuned").exists() and not (workdir / "metrics/train.json").exists()


def test_divergence_stops_training_naming_the_step(workdir):
    set_train(workdir, learning_rate=1e6, max_steps=30, save_steps=2, logging_steps=1)
    params = load_params()
    run_prepare(params)
    with pytest.raises(Diverged, match=r"training diverged at step (\d+): (training loss|gradient norm) is "
                                             r"(nan|inf).* Last good checkpoint: "):
        run_train(params)
    assert not (workdir / "models/finetuned").exists()


def test_same_seed_same_adapter_other_seed_other_adapter(workdir):
    params = load_params()
    run_prepare(params)
    digests = []
    for seed in (1, 1, 2):
        params.train.seed = seed
        metrics = run_train(params)
        digests.append((sha256(workdir / "models/finetuned/adapter_model.safetensors"),
                        {k: metrics[k] for k in COMPARED}))
    assert digests[0] == digests[1]
    assert digests[0][0] != digests[2][0] and digests[0][1] != digests[2][1]
