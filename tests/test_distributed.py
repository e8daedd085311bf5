"""Several training processes on PyTorch's own engine (gloo on CPU, one thread each): the train stage starting its
workers itself, one writer per file, the arithmetic of one process at the same global batch, kill and resume, and
FSDP2 sharding the model over them (LoRA and QLoRA). Each test starts several training processes:
RUN_MULTIPROCESS=1 (.ci/run sets it)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import writers
import yaml
from conftest import ROOT, run_evaluate, run_prepare, stage_arguments

from finetune.config.params import load_params

pytestmark = pytest.mark.skipif(os.environ.get("RUN_MULTIPROCESS") != "1",
                                reason="starts several training processes; RUN_MULTIPROCESS=1 (.ci/run sets it)")


def use(workdir: Path, **sections) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train(workdir: Path, env: dict, trace: Path | None = None) -> subprocess.CompletedProcess:
    """The train stage as dvc.yaml runs it; under strace, recording into `trace`, when one is given."""
    command = [sys.executable, "-m", "stages.train", *stage_arguments("train")]
    return subprocess.run(writers.traced(command, trace) if trace else command, cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=900)


def losses(workdir: Path) -> list[float]:
    rows = (workdir / "metrics/live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[-1]) for row in rows]


def adapter_hash(workdir: Path) -> str:
    return hashlib.sha256((workdir / "models/finetuned/adapter_model.safetensors").read_bytes()).hexdigest()


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    found = [int(c) for c in children.split()]
    return found + [d for c in found for d in descendants(c)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped; its parent has not collected it yet


def checkpointed(workdir: Path, run: subprocess.Popen) -> bool:
    """Wait until the run has marked a checkpoint complete (any: older ones are deleted as new ones come), and
    say whether it is still running then."""
    deadline = time.time() + 600
    while run.poll() is None and time.time() < deadline:
        if any((workdir / "models/checkpoints").glob("checkpoint-*/fingerprint.json")):
            return run.poll() is None
        time.sleep(0.02)
    return False


def one_writer_per_file(trace: Path, root: Path, only: str = "") -> tuple[dict[str, set[int]], int]:
    """Each file under `root` the traced run wrote, made or removed -> its writer, checked to be one process, and
    the main process: the one that wrote the run's outputs (metrics/train.json, and the fine-tuned model's folder,
    swapped into place whole). `only`: the processes whose command names it (the training's, under dvc)."""
    root = root.resolve()
    files, commands = writers.file_writers(trace, root)
    files = {path: kept for path, pids in files.items() if (kept := {p for p in pids if only in commands.get(p, "")})}
    several = {path: sorted(commands.get(pid, str(pid)) for pid in pids)
               for path, pids in files.items() if len(pids) > 1}
    assert files and not several, several
    main = files[str(root / "metrics/train.json")]
    assert main == files[str(root / "models/finetuned")]
    return files, next(iter(main))


@pytest.fixture(autouse=True)
def strace():
    if not writers.available():
        pytest.fail("strace is needed to see which process writes each file (apt-get install strace)")


@pytest.fixture
def prepared(workdir):
    use(workdir, train={"per_device_train_batch_size": 8, "logging_steps": 1})
    run_prepare(load_params())
    return workdir


def test_two_processes_equal_one_at_the_same_global_batch_each_file_one_writer(prepared, tmp_path):
    env = environment()
    # one process, 16 a step; 5 steps stay inside the first epoch (80 of the toy split's examples), where both
    # runs take the same examples a step (at an epoch's end, each process pads its share from the start)
    use(prepared, train={"per_device_train_batch_size": 16, "max_steps": 5})
    done = train(prepared, env)
    assert done.returncode == 0, done.stderr[-3000:]
    one, one_metrics = losses(prepared), json.loads((prepared / "metrics/train.json").read_text())["training"]
    one_eval, one_predictions = run_evaluate(load_params(), "finetuned")  # evaluate is one process, as in dvc.yaml

    use(prepared, train={"per_device_train_batch_size": 8}, distributed={"nproc_per_node": 2})  # 2 x 8
    for attempt in range(3):  # the same run again: no flaky start, rendezvous or save
        subprocess.run(["rm", "-rf", "models/checkpoints"], cwd=prepared, check=True)  # from the start
        done = train(prepared, env, trace=tmp_path / f"trace-{attempt}")
        assert done.returncode == 0, f"attempt {attempt}: " + done.stderr[-3000:]
        assert "starting 2 training processes" in done.stderr
        two = losses(prepared)
        metrics = json.loads((prepared / "metrics/train.json").read_text())["training"]
        assert metrics["processes"] == 2 and metrics["effective_batch_size"] == 16
        assert len(two) == len(one) == 5
        assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(two, one, strict=True)), (two, one)
        assert metrics["tokens_trained"] == one_metrics["tokens_trained"]
        files, main = one_writer_per_file(tmp_path / f"trace-{attempt}", prepared)
        # the main process wrote every file (the adapter's safetensors and the optimizer's state too) but the
        # other process's own random-number state in each checkpoint
        others = sorted(path for path, pids in files.items() if pids != {main})
        assert others and all(re.search(r"/checkpoint-\d+/rng_state_1\.pth$", path) for path in others), others
        assert any(path.endswith("/adapter_model.safetensors") for path in files)
    config = json.loads((prepared / "models/finetuned/train_config.json").read_text())
    assert config["processes"] == 2 and config["strategy"] == "ddp"
    # the adapter two processes trained evaluates as the one one process trained
    two_eval, two_predictions = run_evaluate(load_params(), "finetuned")
    assert [r["prediction"] for r in two_predictions] == [r["prediction"] for r in one_predictions]
    timing = ("seconds", "per_second", "_s")
    for key, value in one_eval.items():
        if isinstance(value, float) and not any(t in key for t in timing):
            assert two_eval[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_killed_two_process_run_resumes_to_the_same_adapter(prepared, tmp_path):
    env = environment()
    # long enough (a toy step takes milliseconds) to be killed between its first checkpoint and its end
    use(prepared, train={"max_steps": 120, "save_steps": 4, "eval_steps": 40, "logging_steps": 10},
        distributed={"nproc_per_node": 2})
    done = train(prepared, env)
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = adapter_hash(prepared)
    subprocess.run(["rm", "-rf", "models/checkpoints", "models/finetuned", "metrics/train.json"], cwd=prepared)

    run = subprocess.Popen([sys.executable, "-m", "stages.train", *stage_arguments("train")], cwd=prepared, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert checkpointed(prepared, run), "the run ended before its first checkpoint"
    tree = descendants(run.pid)
    assert len(tree) >= 3  # torchrun and its two workers
    run.kill()  # SIGKILL to the stage alone: torchrun and its workers must not train on without it
    run.wait()
    deadline = time.time() + 60
    while any(alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in tree), "workers outlived their killed launcher"
    assert not (prepared / "models/finetuned").exists() and not (prepared / "models/checkpoints/FINISHED").exists()

    done = train(prepared, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from models/checkpoints/checkpoint-" in done.stdout
    assert adapter_hash(prepared) == uninterrupted

    use(prepared, distributed={"nproc_per_node": 1})  # the same run on one process would change the batch
    subprocess.run(["rm", "-f", "models/checkpoints/FINISHED"], cwd=prepared)
    refused = train(prepared, env)
    assert refused.returncode == 2 and "was written by this run on 2 processes" in refused.stderr
    assert "distributed.nproc_per_node: 2" in refused.stderr


def test_dvc_exp_run_with_two_processes(dvc_repo, tmp_path):
    """The real `dvc` CLI: `dvc exp run -S distributed.nproc_per_node=2` trains on two processes, each file of the
    training written by one of them (strace), with the losses and tokens of one process at the same global batch
    and the same evaluation after it; and a run SIGKILLed mid-way (dvc, the stage, torchrun and both workers, all at
    once) resumes under `dvc exp run` and ends with the adapter of an uninterrupted run."""
    from conftest import copy_dvc_config
    from test_pipeline_dvc import ENV

    env = {**ENV, "OMP_NUM_THREADS": "1"}

    def sh(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=dvc_repo, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    def outcome() -> tuple[list[float], dict, dict, list[str]]:
        predictions = (dvc_repo / "outputs/predictions_finetuned.jsonl").read_text().splitlines()
        return (losses(dvc_repo), json.loads((dvc_repo / "metrics/train.json").read_text())["training"],
                json.loads((dvc_repo / "metrics/eval_finetuned.json").read_text())["finetuned"],
                [json.loads(line)["prediction"] for line in predictions])

    sh("git", "init", "-q", "-b", "main")
    sh("dvc", "init", "-q")
    copy_dvc_config(dvc_repo)
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "toy pipeline")
    # 5 steps of 16 examples stay inside the first epoch (see the test above)
    short = ("-S", "train.max_steps=5", "-S", "train.logging_steps=1")
    sh("dvc", "exp", "run", "--name", "one-process", *short, "-S", "train.per_device_train_batch_size=16")
    one, one_training, one_eval, one_predictions = outcome()
    out = sh(*writers.traced(["dvc", "exp", "run", "--name", "two-processes", *short,
                              "-S", "train.per_device_train_batch_size=8", "-S", "distributed.nproc_per_node=2"],
                             tmp_path / "trace"))
    assert "starting 2 training processes" in out
    two, training, evaluation, predictions = outcome()
    assert training["processes"] == 2 and training["strategy"] == "ddp" and training["effective_batch_size"] == 16
    assert len(two) == len(one) == 5
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(two, one, strict=True)), (two, one)
    assert training["tokens_trained"] == one_training["tokens_trained"]
    assert predictions == one_predictions and evaluation["examples"] > 0
    for key, value in one_eval.items():
        if isinstance(value, float) and not any(t in key for t in ("seconds", "per_second", "_s")):
            assert evaluation[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    files, main = one_writer_per_file(tmp_path / "trace", dvc_repo, only="stages.train")
    others = sorted(path for path, pids in files.items() if pids != {main})
    assert others and all(re.search(r"/checkpoint-\d+/rng_state_1\.pth$", path) for path in others), others
    shown = json.loads(sh("dvc", "exp", "show", "--json"))
    assert "two-processes" in json.dumps(shown) and "one-process" in json.dumps(shown)

    long = ("-S", "distributed.nproc_per_node=2", "-S", "train.max_steps=60", "-S", "train.save_steps=4",
            "-S", "train.eval_steps=20", "-S", "train.logging_steps=10")
    subprocess.run(["rm", "-rf", "models/checkpoints"], cwd=dvc_repo, check=True)  # the marker awaited is this run's
    log = (tmp_path / "killed.log").open("w")
    run = subprocess.Popen(["dvc", "exp", "run", "--name", "killed", *long], cwd=dvc_repo, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    assert checkpointed(dvc_repo, run), (tmp_path / "killed.log").read_text()[-3000:]
    tree = [run.pid, *descendants(run.pid)]
    assert len(tree) >= 5  # dvc, the stage, torchrun and its two workers
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):  # one that died with its parent already
            os.kill(pid, signal.SIGKILL)
    run.wait()
    deadline = time.time() + 60
    while any(alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in tree)
    assert not (dvc_repo / "models/finetuned").exists()
    assert not (dvc_repo / "models/checkpoints/FINISHED").exists()

    out = sh("dvc", "exp", "run", "--name", "resumed", *long)
    assert "resuming from models/checkpoints/checkpoint-" in out
    resumed = adapter_hash(dvc_repo)
    # the same run from the start: without its checkpoints, forced (nothing skipped or restored from the run-cache)
    subprocess.run(["rm", "-rf", "models/checkpoints"], cwd=dvc_repo, check=True)
    out = sh("dvc", "exp", "run", "--force", "--name", "uninterrupted", *long)
    assert "Running stage 'train'" in out and "resuming" not in out
    assert adapter_hash(dvc_repo) == resumed


def test_qlora_on_two_processes_places_each_4bit_model_on_its_own_device_and_fsdp_shards_it(prepared, tmp_path):
    """accelerate refuses device_map auto in a multi-process run: each process loads its 4-bit model onto its
    own device."""
    use(prepared, train={"method": "qlora"}, quantization={"bnb_4bit_compute_dtype": "float32"},
        distributed={"nproc_per_node": 2})
    done = train(prepared, environment())
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((prepared / "metrics/train.json").read_text())["training"]
    assert metrics["processes"] == 2 and metrics["quantization"].startswith("4-bit") and metrics["steps"] == 6
    ddp = losses(prepared)

    # FSDP shards the 4-bit weights too (stored as floats: FSDP shards floating-point tensors only); the whole
    # model one unit, its activations recomputed by the Trainer's checkpointing (on for QLoRA)
    use(prepared, distributed={"strategy": "fsdp", "fsdp": {"auto_wrap": "none"}})
    done = train(prepared, environment())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Excluding from FSDP2 sharding" not in done.stderr
    metrics = json.loads((prepared / "metrics/train.json").read_text())["training"]
    assert metrics["strategy"] == "fsdp" and metrics["parameter_share_per_process"] < 0.6
    fsdp = losses(prepared)
    assert all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(fsdp, ddp, strict=True)), (fsdp, ddp)



def adapter(workdir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(workdir / "models/finetuned/adapter_model.safetensors")


def test_fsdp_with_lora_matches_ddp_saves_a_loadable_adapter_and_resumes(prepared, tmp_path):
    """FSDP2 (fully_shard over gloo): the same losses as DDP, the base weights sharded (each process holds about
    half), one writer per file, an adapter that PEFT loads, and a resume from its sharded checkpoint."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    env = environment()
    use(prepared, train={"max_steps": 5, "save_steps": 3}, distributed={"nproc_per_node": 2})
    done = train(prepared, env)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp, ddp_metrics, ddp_adapter = losses(prepared), json.loads((prepared / "metrics/train.json").read_text()), \
        adapter(prepared)
    assert ddp_metrics["training"]["parameter_share_per_process"] == 1.0

    use(prepared, distributed={"strategy": "fsdp", "fsdp": {"state_dict_type": "sharded"}})
    subprocess.run(["rm", "-rf", "models/checkpoints"], cwd=prepared, check=True)  # only this run's files traced
    done = train(prepared, env, trace=tmp_path / "trace")
    assert done.returncode == 0, done.stderr[-3000:]
    fsdp, metrics = losses(prepared), json.loads((prepared / "metrics/train.json").read_text())["training"]
    assert metrics["strategy"] == "fsdp" and metrics["processes"] == 2
    assert metrics["parameter_share_per_process"] < 0.6  # the base's weights are split between the two
    assert len(fsdp) == len(ddp) == 5
    assert all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(fsdp, ddp, strict=True)), (fsdp, ddp)
    assert metrics["tokens_trained"] == ddp_metrics["training"]["tokens_trained"]
    shards = sorted(p.relative_to(prepared / "models/checkpoints/checkpoint-5").as_posix()
                    for p in (prepared / "models/checkpoints/checkpoint-5").rglob("*.distcp"))
    assert shards == [f"{what}_0/__{rank}_0.distcp" for what in ("optimizer", "pytorch_model_fsdp")
                      for rank in (0, 1)]  # each process's shards of the model and of the optimizer
    files, main = one_writer_per_file(tmp_path / "trace", prepared)
    # the main process wrote every file but the other process's own shards and random-number state in the
    # sharded checkpoints
    others = sorted(Path(path).name for path, pids in files.items() if pids != {main})
    assert others and all(name in ("__1_0.distcp", "rng_state_1.pth") for name in others), others

    trained = adapter(prepared)
    assert trained.keys() == ddp_adapter.keys()
    assert all(torch.allclose(trained[k], ddp_adapter[k], rtol=1e-3, atol=1e-6) for k in trained)
    config = json.loads((prepared / "models/finetuned/train_config.json").read_text())
    assert config["strategy"] == "fsdp" and config["distributed"]["fsdp"]["state_dict_type"] == "sharded"
    base = AutoModelForCausalLM.from_pretrained(config["model"]["model_name"])
    model = PeftModel.from_pretrained(base, prepared / "models/finetuned")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(trained) and all(
        torch.equal(loaded[k.replace(".weight", ".default.weight")], v) for k, v in trained.items())

    uninterrupted = adapter_hash(prepared)
    subprocess.run(["rm", "-rf", "models/checkpoints/checkpoint-5", "models/checkpoints/FINISHED"], cwd=prepared)
    done = train(prepared, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("resuming from models/checkpoints/checkpoint-3") == 1  # the main process says it
    assert adapter_hash(prepared) == uninterrupted

    # stopped after its last checkpoint, before its outputs: they are written from it, without training again
    subprocess.run(["rm", "-rf", "models/finetuned", "metrics/train.json", "models/checkpoints/FINISHED"],
                   cwd=prepared)
    done = train(prepared, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "holds the last training step" in done.stdout
    assert adapter_hash(prepared) == uninterrupted
    assert json.loads((prepared / "metrics/train.json").read_text())["training"]["strategy"] == "fsdp"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_divergence_stops_every_process_together(prepared, tmp_path, strategy):
    """A non-finite gradient stops both processes at the same step (under FSDP each sees only its shards, and the
    verdict is shared): the stage ends with the message instead of one process waiting for the other forever."""
    use(prepared, train={"learning_rate": 1e6, "max_steps": 30, "save_steps": 2},
        distributed={"nproc_per_node": 2, "strategy": strategy})
    done = train(prepared, environment())
    assert done.returncode == 2, done.stderr[-3000:]
    steps = re.findall(r"error: training diverged at step (\d+)", done.stderr)
    assert len(steps) == 2 and steps[0] == steps[1], done.stderr[-3000:]  # both processes, at the same step
    assert "the training processes stopped" in done.stderr
    assert not (prepared / "models/finetuned").exists() and not (prepared / "metrics/train.json").exists()
