"""Sharing one machine between experiments running at once: each stage process's slot, its share of the cores, and
GPUs of its own, with real processes locking real files (the GPUs are fake ids: no GPU is needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from finetune import resources
from finetune.errors import StageError

WORKER = """
import sys, time
from finetune import resources
from finetune.errors import StageError
what = sys.argv[1]
if what == "gpu":
    print("got", ",".join(resources.take_gpus(int(sys.argv[2]), sys.argv[3].split(","), poll_s=0.05)), flush=True)
else:
    resources.hold_slot()
    print("holding", flush=True)
time.sleep(120)
"""


@pytest.fixture
def slots(tmp_path, monkeypatch):
    monkeypatch.setenv(resources.SLOTS_ENV, str(tmp_path / "slots"))
    monkeypatch.setattr(resources, "_held", {})
    return tmp_path / "slots"


def start(slots, *args: str) -> subprocess.Popen:
    env = {**os.environ, resources.SLOTS_ENV: str(slots), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def first_line(proc: subprocess.Popen) -> str:
    return proc.stdout.readline().strip()


def test_each_concurrent_run_gets_its_own_gpu_a_dead_runs_gpu_is_freed_and_one_too_many_waits(slots):
    a, b = start(slots, "gpu", "1", "0,1"), start(slots, "gpu", "1", "0,1")
    c = None
    try:
        got_a, got_b = first_line(a), first_line(b)
        assert {got_a, got_b} == {"got 0", "got 1"}  # two runs, two GPUs, one each
        c = start(slots, "gpu", "1", "0,1")
        waiting = c.stderr.readline()
        assert "waiting for 1 free GPU(s): the 2 of this machine are held by other running experiments" in waiting
        assert str(a.pid) in waiting and str(b.pid) in waiting
        time.sleep(0.5)
        assert c.poll() is None  # still waiting
        a.send_signal(signal.SIGKILL)  # a run that dies, however it dies, gives its GPU back
        a.wait()
        assert first_line(c) == got_a
        assert "free now: starting" in c.stderr.readline()
    finally:
        for proc in (a, b, c):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_a_run_needing_two_gpus_takes_two_free_ones_or_none(slots):
    a = start(slots, "gpu", "1", "0,1,2")
    b = None
    try:
        assert first_line(a) == "got 0"
        b = start(slots, "gpu", "2", "0,1,2")
        assert first_line(b) == "got 1,2"
        with pytest.raises(StageError, match="needs 4 GPUs and this machine shows 3"):
            resources.take_gpus(4, ["0", "1", "2"])
    finally:
        for proc in (a, b):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_running_stage_processes_share_the_cores_and_a_dead_ones_share_returns(slots, monkeypatch):
    monkeypatch.setattr(resources, "cores", lambda: 8)
    resources.hold_slot()
    assert resources.running() == 1 and resources.thread_share("auto") == 8
    others = [start(slots, "slot") for _ in range(3)]
    try:
        assert all(first_line(p) == "holding" for p in others)
        assert resources.running() == 4 and resources.thread_share("auto") == 2
        assert resources.thread_share("auto", per_process=2) == 1  # a launcher's two workers split its share
        assert resources.thread_share(3) == 3  # a number is a number
        others[0].send_signal(signal.SIGKILL)
        others[0].wait()
        assert resources.running() == 3 and len(list(slots.glob("*.slot"))) == 3  # its file is cleared
    finally:
        for proc in others:
            proc.kill()
            proc.wait()
    assert resources.running() == 1


def test_training_follows_the_share_as_runs_start_and_end(slots, monkeypatch):
    import torch

    monkeypatch.setattr(resources, "cores", lambda: 2)
    monkeypatch.setattr(resources, "RECHECK_S", 0.0)
    monkeypatch.setenv(resources.AUTO_ENV, "auto")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")
    before = torch.get_num_threads()
    resources.hold_slot()
    [share] = resources.shared_threads()
    other = start(slots, "slot")
    try:
        assert first_line(other) == "holding"
        share.on_step_begin(None, None, None)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        other.kill()
        other.wait()
        share.on_step_begin(None, None, None)
        assert torch.get_num_threads() == 2
    finally:
        other.kill()
        other.wait()
        torch.set_num_threads(before)


@pytest.mark.parametrize("params, omp, followed, threads", [
    ("", None, True, "2"),  # threads: auto, nothing set: the share (both cores, alone), followed as runs come and go
    ("", "1", False, "1"),  # threads: auto, OMP_NUM_THREADS set: the user's choice, kept, not followed
    ("resources:\n  threads: 1\n", None, False, "1"),  # a number: set, whatever runs beside it
])
def test_only_an_automatic_share_is_followed(slots, tmp_path, monkeypatch, params, omp, followed, threads):
    import torch

    (tmp_path / "params.yaml").write_text(params)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resources, "cores", lambda: 2)
    monkeypatch.setattr(resources, "visible_gpus", lambda: [])
    for name in (resources.AUTO_ENV, "LOCAL_RANK", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    if omp:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
        torch.set_num_threads(int(omp))
    resources.share_machine()
    assert os.environ["OMP_NUM_THREADS"] == threads and torch.get_num_threads() == int(threads)
    assert len(resources.shared_threads()) == (1 if followed else 0)


@pytest.mark.parametrize("text, message", [
    ("resources:\n  threads: 0\n", "resources.threads: 0 must be at least 1 (or auto)"),
    ("resources:\n  gpus: 0\n", "resources.gpus: 0 must be at least 1 (or auto, or all)"),
    ("resources:\n  gpus: some\n", "resources.gpus: 'some' is not"),
])
def test_bad_resources_are_refused_naming_the_key_and_line(text, message):
    from finetune.config.params import parse_params
    from finetune.config.schema import ParamsError

    with pytest.raises(ParamsError) as err:
        parse_params(text, sections=["resources"])
    said = "\n".join(err.value.problems)
    assert said.startswith("params.yaml:2: ") and message in said, said


SHARE = """
import os, torch
from finetune import resources
resources.share_machine(processes=int(os.environ["PROCESSES"]))
print(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), flush=True)
"""


@pytest.mark.parametrize("environment, params, expected", [
    ({"CUDA_VISIBLE_DEVICES": "3,5", "PROCESSES": "1"}, "", "3 "),  # the first free of those listed
    ({"CUDA_VISIBLE_DEVICES": "3,5", "PROCESSES": "2"}, "", "3,5 "),  # a training of two processes: both
    ({"CUDA_VISIBLE_DEVICES": "3,5", "PROCESSES": "1"}, "resources:\n  gpus: all\n", "3,5 "),  # shared: as it was
    ({"CUDA_VISIBLE_DEVICES": "3,5", "PROCESSES": "1", "OMP_NUM_THREADS": "1"}, "", "3 1 1"),  # the user's threads
    ({"CUDA_VISIBLE_DEVICES": "3,5", "PROCESSES": "1", "LOCAL_RANK": "0"}, "", "3,5 "),  # a launcher's worker
    ({"CUDA_VISIBLE_DEVICES": "3,5", "PROCESSES": "1"}, "resources:\n  threads: 1\n", "3 1 1"),
])
def test_a_stage_takes_its_share_as_params_say(slots, tmp_path, environment, params, expected):
    (tmp_path / "params.yaml").write_text(params)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_RANK")}
    env.update({resources.SLOTS_ENV: str(slots), "PYTHONPATH": str(ROOT), **environment})
    done = subprocess.run([sys.executable, "-c", SHARE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(expected), done.stdout
