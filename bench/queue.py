"""Two experiments through `dvc queue start -j 2` against the same two run one after the other, in one run.

    python -m bench --only queue
    python -m bench.queue --steps 100        # alone: prints the comparison, writes nothing

A copy of this repository runs its pipeline once (the baseline: prepare and the base model's evaluation are then
shared), then two experiments that differ in train.seed, each training `steps` steps and running everything
downstream (evaluate, merge, compare): first `dvc exp run --temp` one after the other, then, with DVC's run-cache
emptied each time so that nothing is restored instead of run, both queued and run by `dvc queue start -j 2`. The
wall times compare as a ratio; the queued experiments' metrics are set beside the sequential ones'. Each stage
process takes its share of the cores (params resources.threads: auto, finetune/resources.py): two at once, one core
each here. For comparison, the queue also ran with every process using a thread per core (resources.threads set to
the cores: what every stage did before it shared them), before the shared run. Each run's own training timings are
kept, which also shows that every run trained (a restored one would repeat another's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from finetune.resources import AUTO_ENV

ROOT = Path(__file__).resolve().parent.parent
QUEUE_AT_MOST = 0.8  # the queue's wall time over the sequential runs'
SEEDS = (1, 2)
COMPARED = ("training.final_train_loss", "training.final_eval_loss", "training.tokens_trained",
            "finetuned.exact_match", "finetuned.eval_loss", "finetuned.bleu")


def environment() -> dict:
    """This process's environment without a thread count (OMP_NUM_THREADS would be kept by every stage as the
    user's choice: the measurement is of the share the stages take themselves)."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS", AUTO_ENV)}


def dvc(repo: Path, *args: str) -> str:
    """`dvc args` in `repo`, in `environment()`."""
    done = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, env=environment())
    if done.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {repo}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


TIMINGS = ("training.tokens_per_second", "training.train_time_s")  # each run's own: none restored from another


def experiment_metrics(repo: Path, keys: tuple[str, ...] = COMPARED) -> dict[str, dict]:
    """name -> the metrics `keys`, of every experiment `dvc exp show` lists."""
    out = {}
    for baseline in json.loads(dvc(repo, "exp", "show", "--json")):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = (rev.get("data") or {}).get("metrics") or {}
                flat = {}
                for file in data.values():
                    for section, values in (file.get("data") or {}).items():
                        if isinstance(values, dict):
                            flat.update({f"{section}.{k}": v for k, v in values.items()})
                out[rev.get("name") or exp.get("name")] = {k: flat.get(k) for k in keys}
    return out


def wait_for_queue(repo: Path, poll_s: float = 1.0) -> None:
    while True:
        status = dvc(repo, "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            if "Failed" in status:
                raise RuntimeError(f"a queued experiment failed:\n{status}\n{dvc(repo, 'queue', 'logs', 'q1')}")
            return
        time.sleep(poll_s)


def bench_queue(tmp: Path, steps: int) -> dict:
    from bench.run import copy_repository
    from finetune.resources import cores

    repo = tmp / "queue-repo"
    repo.mkdir()
    copy_repository(repo)
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(max_steps=steps, eval_steps=steps, save_steps=steps)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "repro")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "baseline"],
                   cwd=repo, check=True)

    started = time.perf_counter()
    for seed in SEEDS:  # in a temporary copy, as queued ones run: the workspace stays the baseline they start from
        dvc(repo, "exp", "run", "--temp", "--name", f"seq-{seed}", "-S", f"train.seed={seed}")
    sequential = time.perf_counter() - started

    # as before the resources section: every stage process with a thread per core, however many run at once
    unshared = run_queue(repo, "u", "-S", f"resources.threads={cores()}")
    queued = run_queue(repo, "q")
    timings = experiment_metrics(repo, TIMINGS)

    metrics = experiment_metrics(repo)
    pairs = {seed: (metrics.get(f"seq-{seed}"), metrics.get(f"q{seed}")) for seed in SEEDS}
    return {"steps": steps, "cores": cores(), "sequential_s": round(sequential, 1), "queue_j2_s": round(queued, 1),
            "ratio": round(queued / sequential, 3), "target": QUEUE_AT_MOST,
            "queue_j2_unshared_s": round(unshared, 1), "unshared_ratio": round(unshared / sequential, 3),
            "metrics": {f"seed {seed}": {"sequential": a, "queued": b} for seed, (a, b) in pairs.items()},
            "identical_metrics": all(a is not None and a == b for a, b in pairs.values()),
            "timings": timings}


def run_queue(repo: Path, prefix: str, *settings: str) -> float:
    """The two experiments queued (named <prefix><seed>) and run by `dvc queue start -j 2`: the wall time from
    queueing the first to the end of both (queueing is part of the user's wait, as `--temp`'s copies are of the
    sequential runs')."""
    shutil.rmtree(repo / ".dvc/cache/runs", ignore_errors=True)  # nothing restored from earlier runs
    started = time.perf_counter()
    for seed in SEEDS:
        dvc(repo, "exp", "run", "--queue", "--name", f"{prefix}{seed}", "-S", f"train.seed={seed}", *settings)
    # the workers inherit `queue start`'s output: a pipe would stay open as long as they live (past the end of the
    # queue, should one hang on shutting down), so it goes to a file, and the queue's status says when it is done
    log = repo / ".dvc/tmp/queue-start.log"
    with log.open("w") as out:
        started_workers = subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=environment(),
                                         stdout=out, stderr=subprocess.STDOUT)
    if started_workers.returncode:
        raise RuntimeError(f"dvc queue start failed in {repo}:\n{log.read_text()[-3000:]}")
    wait_for_queue(repo)
    elapsed = time.perf_counter() - started
    stop_workers(repo)
    return elapsed


def stop_workers(repo: Path) -> None:
    """`dvc queue stop`, and any worker still there a minute later ended by its pid file."""
    try:
        subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=environment(), capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.time() + 60
    texts = [p.read_text().strip() for p in (repo / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid")]
    pids = [int(text) for text in texts if text.isdigit()]
    while pids and time.time() < deadline:
        pids = [pid for pid in pids if alive(pid)]
        time.sleep(1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.queue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
        result = bench_queue(Path(tmp), args.steps)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
