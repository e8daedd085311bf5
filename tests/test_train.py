import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_prepare, run_train, setup_trainer, stage_arguments

from finetune.config.params import load_params
from finetune.config.train import TrainParams
from finetune.tracking.history import read_series
from finetune.training.precision import choose_precision


@pytest.mark.parametrize("cuda, flags, expected", [
    (False, {}, ("cpu", "fp32")),
    (False, {"bf16": True}, ("cpu", "bf16")),
    (True, {}, ("cuda", "fp32")),
    (True, {"fp16": True}, ("cuda", "fp16")),
    (True, {"bf16": True}, ("cuda", "bf16")),
])
def test_choose_precision(cuda, flags, expected):
    chosen = choose_precision(TrainParams(**flags), cuda=cuda)
    assert (chosen.device, chosen.dtype) == expected
    assert chosen.reason


def test_lora_weights_change_and_base_weights_do_not(workdir):
    params = load_params()
    run_prepare(params)
    trainer, _, _ = setup_trainer(params)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(after[n].requires_grad for n in lora)
    assert all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n or "lora_A" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)


def test_run_writes_adapter_tokenizer_config_and_metrics(workdir):
    params = load_params()
    run_prepare(params)
    metrics = run_train(params)
    adapter = workdir / params.train.finetuned_dir
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "tokenizer.json").exists()
    config = json.loads((adapter / "train_config.json").read_text())
    assert config["lora"]["r"] == params.lora.r and config["precision"] == "fp32"
    assert metrics["steps"] == 6 and metrics["effective_batch_size"] == 8
    assert metrics["device"] == "cpu" and metrics["precision"] == "fp32" and metrics["method"] == "lora"
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["tokens_trained"] > 6 * 8 * 10 and metrics["tokens_per_second"] > 0
    assert metrics["best_eval_loss"] <= metrics["final_eval_loss"]
    assert metrics["peak_memory_mb"] > 0 and metrics["wall_time_s"] >= metrics["train_time_s"] > 0
    checkpoints = sorted(p.name for p in (workdir / params.train.output_dir).glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]
    # DVCLive's step series (logging_steps 2, eval_steps 3) and their summaries in the metrics
    live = workdir / "metrics/live"
    assert [step for step, _ in read_series(live, "train/loss")] == [2, 4, 6]
    assert [step for step, _ in read_series(live, "eval/loss")] == [3, 6]
    for series in ("learning_rate", "grad_norm", "tokens_per_second", "elapsed_s", "epoch"):
        assert [step for step, _ in read_series(live, f"train/{series}")] == [2, 4, 6], series
    summary = metrics["summary"]
    assert set(summary) == {"train_loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch",
                            "elapsed_s"}
    assert summary["eval_loss"]["min"] == pytest.approx(metrics["best_eval_loss"], rel=1e-5)
    assert summary["eval_loss"]["last"] == pytest.approx(metrics["final_eval_loss"], rel=1e-5)
    assert summary["train_loss"]["last"] == pytest.approx(metrics["final_train_loss"], rel=1e-5)
    losses = [v for _, v in read_series(live, "train/loss")]
    assert summary["train_loss"]["mean"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert all(s["min"] <= s["mean"] <= s["max"] for s in summary.values())
    assert summary["learning_rate"]["max"] > summary["learning_rate"]["last"]  # linear decay after warmup


def test_the_launchers_environment_says_which_process_writes(monkeypatch):
    from finetune.training import ranks

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ranks.is_main() and ranks.world_size() == 1 and ranks.summed(3, 4) == [3, 4]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them, before the Trainer sets up the process group
    assert not ranks.is_main() and ranks.world_size() == 2


def test_ddp_does_not_search_for_unused_parameters():
    """peft models would make the Trainer turn on DDP's unused-parameter search: a graph traversal every step."""
    from finetune.training.precision import Precision, training_arguments

    args = training_arguments(TrainParams(method="lora"), Precision("cpu", "fp32", "test"))
    assert args.ddp_find_unused_parameters is False


@pytest.mark.parametrize("world, rank, cuda, placed", [
    ("2", "1", True, {"": 1}),  # one process of two on a GPU machine: its own GPU
    ("2", "1", False, {"": "cpu"}),
    ("1", "0", True, "auto"),  # alone: as quantization.device_map says
])
def test_each_process_loads_its_4bit_model_onto_its_own_device(toy_model_dir, monkeypatch, world, rank, cuda,
                                                               placed):
    """accelerate refuses device_map auto in a multi-process run: QLoRA's base goes to the process's own device."""
    from finetune import models
    from finetune.config.model import ModelParams, QuantizationParams

    class Loaded(Exception):
        pass

    class Recorder:
        @classmethod
        def from_pretrained(cls, name, **kwargs):
            raise Loaded(kwargs)

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with pytest.raises(Loaded) as loaded:
        models.load_base_model(ModelParams(model_name=str(toy_model_dir)), QuantizationParams(device_map="auto"),
                               "float32", Recorder)
    kwargs = loaded.value.args[0]
    assert kwargs["device_map"] == placed and kwargs["quantization_config"].load_in_4bit


@pytest.mark.skipif(os.environ.get("RUN_MULTIPROCESS") != "1",
                    reason="starts two training processes; RUN_MULTIPROCESS=1 (.ci/run sets it)")
def test_two_processes_train_with_one_writer(workdir):
    """torchrun with two CPU processes (gloo): both train, the main one alone writes, and the counts are the run's."""
    run_prepare(load_params())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # one core each
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "stages.train", *stage_arguments("train")], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("trained 6 steps") == 1  # one report, by the main process
    metrics = json.loads((workdir / "metrics/train.json").read_text())["training"]
    assert metrics["processes"] == 2 and metrics["effective_batch_size"] == 2 * 8 and metrics["steps"] == 6
    assert metrics["tokens_trained"] > metrics["effective_batch_size"] * 6  # both processes' tokens, summed
    checkpoints = sorted((workdir / "models/checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-3", "checkpoint-6"]
    assert all((c / "fingerprint.json").exists() for c in checkpoints)  # marked once both had written
    assert (workdir / "models/checkpoints/FINISHED").exists()
    assert (workdir / "models/finetuned/adapter_model.safetensors").exists()
    assert json.loads((workdir / "models/finetuned/train_config.json").read_text())["processes"] == 2


def test_a_pruned_trial_on_several_processes_is_refused_before_it_could_hang(workdir, monkeypatch):
    """Only the main process hears the study's pruner: the others would train on alone and wait for ever."""
    from finetune.errors import StageError
    from finetune.training import TRIAL_ENV

    run_prepare(load_params())
    monkeypatch.setenv(TRIAL_ENV, "{}")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(StageError, match="trains on one process; set pruner: none"):
        setup_trainer(load_params())
