import json

import pytest
import torch

from stages import prepare, train
from stages.params import TrainParams, load_params
from stages.tracking import read_series


@pytest.mark.parametrize("cuda, flags, expected", [
    (False, {}, ("cpu", "fp32")),
    (False, {"bf16": True}, ("cpu", "bf16")),
    (True, {}, ("cuda", "fp32")),
    (True, {"fp16": True}, ("cuda", "fp16")),
    (True, {"bf16": True}, ("cuda", "bf16")),
])
def test_choose_precision(cuda, flags, expected):
    chosen = train.choose_precision(TrainParams(**flags), cuda=cuda)
    assert (chosen.device, chosen.dtype) == expected
    assert chosen.reason


def test_lora_weights_change_and_base_weights_do_not(workdir):
    params = load_params()
    prepare.run(params)
    trainer, _, _ = train.setup(params)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(after[n].requires_grad for n in lora)
    assert all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n or "lora_A" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)


def test_run_writes_adapter_tokenizer_config_and_metrics(workdir):
    params = load_params()
    prepare.run(params)
    metrics = train.run(params)
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
