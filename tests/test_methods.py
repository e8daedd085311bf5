"""QLoRA, full fine-tuning and merging, run for real at toy scale (bitsandbytes 4-bit layers run on CPU)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import prepared_rows, run_evaluate, run_merge, run_prepare, run_train, setup_trainer
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.config.evaluate import EvaluateParams
from finetune.config.params import load_params
from finetune.generation import generate


def use(workdir, **sections) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def lora_run(workdir):
    params = load_params()
    run_prepare(params)
    return run_train(params)


def test_merged_model_loads_without_peft_and_matches_the_adapter(workdir, lora_run, toy_model_dir):
    params = load_params()
    checked = run_merge(params)
    assert checked["greedy_agreement"] == 1.0 and checked["max_abs_logit_diff"] < 1e-4

    merged = AutoModelForCausalLM.from_pretrained(workdir / "models/merged").eval()  # plain transformers
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_model_dir),
                                        workdir / "models/finetuned").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "models/merged")
    prompts = [r["prompt"] for r in prepared_rows(workdir / "data/prepared", "test")]
    settings = EvaluateParams(batch_size=8, max_new_tokens=8)
    assert generate(merged, tokenizer, prompts, settings) == \
        generate(adapter, tokenizer, prompts, settings)


def test_qlora_trains_adapters_on_a_4bit_base(workdir, lora_run):
    use(workdir, train={"method": "qlora"}, quantization={"bnb_4bit_compute_dtype": "float32"})
    params = load_params()
    trainer, _, _ = setup_trainer(params)
    assert type(trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    metrics = run_train(params)
    assert metrics["method"] == "qlora" and metrics["quantization"] == "4-bit nf4 double-quant, float32 compute"
    assert metrics["base_weight_memory_mb"] < lora_run["base_weight_memory_mb"]
    assert metrics["trainable_params"] == lora_run["trainable_params"]
    config = json.loads((workdir / "models/finetuned/train_config.json").read_text())
    assert config["train"]["method"] == "qlora"

    scored, records = run_evaluate(params, "finetuned")  # loads the 4-bit base again, adapter on top
    assert scored["examples"] == len(records) > 0
    checked = run_merge(params)
    assert checked["method"] == "qlora"
    assert checked["greedy_agreement"] == 1.0  # merged vs adapter on the same unquantized base
    assert 0 <= checked["greedy_agreement_vs_4bit"] <= 1 and checked["max_abs_logit_diff_vs_4bit"] > 0


def test_full_fine_tuning_trains_every_weight(workdir, lora_run):
    use(workdir, train={"method": "full", "learning_rate": 1e-3})
    params = load_params()
    trainer, _, _ = setup_trainer(params)
    assert all(p.requires_grad for p in trainer.model.parameters())
    metrics = run_train(params)
    assert metrics["method"] == "full" and metrics["trainable_params"] == metrics["total_params"]
    assert (workdir / "models/finetuned/model.safetensors").exists()
    assert not (workdir / "models/finetuned/adapter_config.json").exists()
    scored, _ = run_evaluate(params, "finetuned")
    assert scored["eval_loss"] > 0
    assert run_merge(params)["greedy_agreement"] == 1.0
