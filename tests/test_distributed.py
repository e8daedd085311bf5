"""Several training processes on PyTorch's own engine (gloo on CPU, one thread each): the train stage starting its
workers itself, one writer per file, the arithmetic of one process at the same global batch, kill and resume, and
FSDP2 sharding the model over them (LoRA and QLoRA). Each test starts several training processes:
RUN_MULTIPROCESS=1 (.ci/run sets it)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_evaluate, run_prepare, stage_arguments

from finetune.config.params import load_params

pytestmark = pytest.mark.skipif(os.environ.get("RUN_MULTIPROCESS") != "1",
                                reason="starts several training processes; RUN_MULTIPROCESS=1 (.ci/run sets it)")

# Every file a process opens for writing, one line per open (pid, path): a sitecustomize on PYTHONPATH adds the hook
AUDIT = '''
import os, sys
_log = os.environ.get("WRITES_LOG")
if _log:
    def _hook(event, args):
        if event != "open" or not isinstance(args[0], str) or os.path.abspath(args[0]) == _log:
            return
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)):
            with open(_log, "a") as out:
                out.write(f"{os.getpid()}\\t{os.path.abspath(args[0])}\\n")
    sys.addaudithook(_hook)
'''


def use(workdir: Path, **sections) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def environment(tmp: Path) -> dict:
    (tmp / "audit").mkdir(exist_ok=True)
    (tmp / "audit/sitecustomize.py").write_text(AUDIT)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp / 'audit'}{os.pathsep}{ROOT}",
            "WRITES_LOG": str(tmp / "writes.log")}


def train(workdir: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.train", *stage_arguments("train")], cwd=workdir, env=env,
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


def writers(log: Path, root: Path) -> dict[str, set[str]]:
    """Each file under `root` opened for writing -> the processes that did."""
    out: dict[str, set[str]] = {}
    for line in log.read_text().splitlines():
        pid, path = line.split("\t", 1)
        if path.startswith(str(root)) and "/.dvc/" not in path and "/.git/" not in path:
            out.setdefault(path, set()).add(pid)
    return out


@pytest.fixture
def prepared(workdir):
    use(workdir, train={"per_device_train_batch_size": 8, "logging_steps": 1})
    run_prepare(load_params())
    return workdir


def test_two_processes_equal_one_at_the_same_global_batch_each_file_one_writer(prepared, tmp_path):
    env = environment(tmp_path)
    # one process, 16 a step; 5 steps stay inside the first epoch (80 of the toy split's examples), where both
    # runs take the same examples a step (at an epoch's end, each process pads its share from the start)
    use(prepared, train={"per_device_train_batch_size": 16, "max_steps": 5})
    done = train(prepared, env)
    assert done.returncode == 0, done.stderr[-3000:]
    one, one_metrics = losses(prepared), json.loads((prepared / "metrics/train.json").read_text())["training"]
    one_eval, one_predictions = run_evaluate(load_params(), "finetuned")  # evaluate is one process, as in dvc.yaml

    use(prepared, train={"per_device_train_batch_size": 8}, distributed={"nproc_per_node": 2})  # 2 x 8
    for attempt in range(3):  # the same run again: no flaky start, rendezvous or save
        (tmp_path / "writes.log").unlink(missing_ok=True)
        done = train(prepared, env)
        assert done.returncode == 0, f"attempt {attempt}: " + done.stderr[-3000:]
        assert "starting 2 training processes" in done.stderr
        two = losses(prepared)
        metrics = json.loads((prepared / "metrics/train.json").read_text())["training"]
        assert metrics["processes"] == 2 and metrics["effective_batch_size"] == 16
        assert len(two) == len(one) == 5
        assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(two, one, strict=True)), (two, one)
        assert metrics["tokens_trained"] == one_metrics["tokens_trained"]
        files = writers(tmp_path / "writes.log", prepared)
        # the outputs are written to a temporary name, then swapped into place
        assert any(".train_config.json." in p for p in files) and any("/.train.json." in p for p in files)
        assert len(set.union(*files.values())) == 1  # one process wrote every file: the main one
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
    env = environment(tmp_path)
    # long enough (a toy step takes milliseconds) to be killed between its first checkpoint and its end
    use(prepared, train={"max_steps": 120, "save_steps": 4, "eval_steps": 40, "logging_steps": 10},
        distributed={"nproc_per_node": 2})
    done = train(prepared, env)
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = adapter_hash(prepared)
    subprocess.run(["rm", "-rf", "models/checkpoints", "models/finetuned", "metrics/train.json"], cwd=prepared)

    run = subprocess.Popen([sys.executable, "-m", "stages.train", *stage_arguments("train")], cwd=prepared, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = prepared / "models/checkpoints/checkpoint-4/fingerprint.json"
    deadline = time.time() + 600
    while not marker.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists() and run.poll() is None, "the run ended before its step-4 checkpoint"
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


def test_dvc_exp_run_with_two_processes(dvc_repo):
    """The real `dvc` CLI: an experiment that sets distributed.nproc_per_node=2 trains on two processes, evaluates
    on one, and shows in `dvc exp show` like any other."""
    from conftest import copy_dvc_config
    from test_pipeline_dvc import ENV

    env = {**ENV, "OMP_NUM_THREADS": "1"}

    def sh(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=dvc_repo, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    sh("git", "init", "-q", "-b", "main")
    sh("dvc", "init", "-q")
    copy_dvc_config(dvc_repo)
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "toy pipeline")
    out = sh("dvc", "exp", "run", "-S", "distributed.nproc_per_node=2", "--name", "two-processes")
    assert "starting 2 training processes" in out
    training = json.loads((dvc_repo / "metrics/train.json").read_text())["training"]
    assert training["processes"] == 2 and training["strategy"] == "ddp"
    assert json.loads((dvc_repo / "metrics/eval_finetuned.json").read_text())["finetuned"]["examples"] > 0
    shown = json.loads(sh("dvc", "exp", "show", "--json"))
    assert "two-processes" in json.dumps(shown)


def test_qlora_on_two_processes_places_each_4bit_model_on_its_own_device_and_fsdp_shards_it(prepared, tmp_path):
    """accelerate refuses device_map auto in a multi-process run: each process loads its 4-bit model onto its
    own device."""
    use(prepared, train={"method": "qlora"}, quantization={"bnb_4bit_compute_dtype": "float32"},
        distributed={"nproc_per_node": 2})
    done = train(prepared, environment(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((prepared / "metrics/train.json").read_text())["training"]
    assert metrics["processes"] == 2 and metrics["quantization"].startswith("4-bit") and metrics["steps"] == 6
    ddp = losses(prepared)

    # FSDP shards the 4-bit weights too (stored as floats: FSDP shards floating-point tensors only); the whole
    # model one unit, its activations recomputed by the Trainer's checkpointing (on for QLoRA)
    use(prepared, distributed={"strategy": "fsdp", "fsdp": {"auto_wrap": "none"}})
    done = train(prepared, environment(tmp_path))
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

    env = environment(tmp_path)
    use(prepared, train={"max_steps": 5, "save_steps": 3}, distributed={"nproc_per_node": 2})
    done = train(prepared, env)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp, ddp_metrics, ddp_adapter = losses(prepared), json.loads((prepared / "metrics/train.json").read_text()), \
        adapter(prepared)
    assert ddp_metrics["training"]["parameter_share_per_process"] == 1.0

    (tmp_path / "writes.log").unlink(missing_ok=True)
    use(prepared, distributed={"strategy": "fsdp", "fsdp": {"state_dict_type": "sharded"}})
    done = train(prepared, env)
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
    files = writers(tmp_path / "writes.log", prepared)
    assert files and all(len(pids) == 1 for pids in files.values())
    main = next(iter(pids for path, pids in files.items() if "/.train.json." in path))
    # the main process wrote every file but the other process's own shards of the sharded checkpoints
    others = sorted(Path(path).name for path, pids in files.items() if pids != main)
    assert others and all(name == "__1_0.distcp" for name in others), others

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
    done = train(prepared, environment(tmp_path))
    assert done.returncode == 2, done.stderr[-3000:]
    steps = re.findall(r"error: training diverged at step (\d+)", done.stderr)
    assert len(steps) == 2 and steps[0] == steps[1], done.stderr[-3000:]  # both processes, at the same step
    assert "the training processes stopped" in done.stderr
    assert not (prepared / "models/finetuned").exists() and not (prepared / "metrics/train.json").exists()
